"""The llm model's logprob entries (``{"token_id", "logprob", "top": {id: logprob}}``) in OpenAI's shapes.

Token strings come from the checkpoint's tokenizer when the gateway can read it (the model's `model_path` on
this host); otherwise a token is written ``token_id:<id>`` (vLLM's `return_tokens_as_token_ids` form).
"""

from __future__ import annotations

from typing import Any


class TokenText:
    """id -> the token's text, memoised."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def _top(entry: dict[str, Any], k: int) -> list[tuple[int, float]]:
    pairs = [(int(t), float(v)) for t, v in (entry.get("top") or {}).items()]
    return sorted(pairs, key=lambda p: -p[1])[:k]


def chat_logprobs(entries: list[dict[str, Any] | None], k: int, text_of: TokenText) -> list[dict[str, Any]]:
    """`choices[].logprobs.content` items of the chat API."""
    content = []
    for entry in entries:
        if entry is None:
            continue
        token = text_of(int(entry["token_id"]))
        content.append(
            {
                "token": token,
                "logprob": float(entry["logprob"]),
                "bytes": list(token.encode("utf-8")),
                "top_logprobs": [
                    {"token": text_of(t), "logprob": v, "bytes": list(text_of(t).encode("utf-8"))}
                    for t, v in _top(entry, k)
                ],
            }
        )
    return content


class CompletionLogprobs:
    """`choices[].logprobs` of the completions API, built up token by token (`text_offset` runs on)."""

    def __init__(self, text_of: TokenText, k: int, start_offset: int = 0) -> None:
        self.text_of, self.k, self.offset = text_of, k, start_offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(
        self, entries: list[dict[str, Any] | None], first_prompt_text: str | None = None
    ) -> dict[str, Any]:
        """Append `entries` (a None entry is the prompt's first token, whose text is `first_prompt_text`);
        returns the part just added, in OpenAI's shape."""
        start = len(self.tokens)
        for entry in entries:
            if entry is None:
                token, logprob, top = first_prompt_text or "", None, None
            else:
                token, logprob = self.text_of(int(entry["token_id"])), float(entry["logprob"])
                top = {self.text_of(t): v for t, v in _top(entry, self.k)}
            self.tokens.append(token)
            self.token_logprobs.append(logprob)
            self.top_logprobs.append(top)
            self.text_offset.append(self.offset)
            self.offset += len(token)
        return self.since(start)

    def since(self, start: int) -> dict[str, Any]:
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }

    def whole(self) -> dict[str, Any]:
        return self.since(0)


def first_prompt_token_text(prompt: str, entries: list[dict[str, Any] | None], text_of: TokenText) -> str:
    """The prompt's first token's text: what the other prompt tokens' texts leave of the prompt (the llm
    model sends no entry for it)."""
    rest = "".join(text_of(int(e["token_id"])) for e in entries if e is not None)
    return prompt[: len(prompt) - len(rest)] if rest and prompt.endswith(rest) else ""
