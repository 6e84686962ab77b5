"""Bad-word strings on the real SmolLM2: a banned word's token sequence never appears in the output.

The engine tokenizes each bad word as given (``tokenizer.encode(word, add_special_tokens=False)``) and bans
the word's last token whenever the output ends with the word's other tokens (vLLM's semantics), so a word
mid-sentence is banned by asking for its leading-space spelling too. The reference is HF transformers'
greedy ``generate`` with ``bad_words_ids`` (the same rule, checked against prompt + output: the tests keep
each word's prefix off the prompt's end, where the two would differ).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
import torch

from inflight import LLM, SamplingParams

PROMPT = "Once upon a time"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM(str(smollm2_path), max_model_len=128)


@pytest.fixture(scope="module")
def hf_greedy_banning(smollm2_path):
    """HF greedy new tokens for ``prompt_ids`` with the token sequences ``bad_words_ids`` banned."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()

    @torch.no_grad()
    def generate(prompt_ids: list[int], bad_words_ids: list[list[int]]) -> list[int]:
        ids = torch.tensor([prompt_ids])
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            bad_words_ids=bad_words_ids or None,
        )
        return out[0, len(prompt_ids) :].tolist()

    return generate


def _find(tokens: Sequence[int], word: Sequence[int]) -> int:
    """The index where ``word`` first appears contiguously in ``tokens``, or -1."""
    n = len(word)
    return next((i for i in range(len(tokens) - n + 1) if list(tokens[i : i + n]) == list(word)), -1)


def _greedy(llm: LLM, bad_words: list[str]):
    (out,) = llm.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, bad_words=bad_words))
    return out


def _assert_prefixes_off_the_prompt_end(prompt_ids: list[int], words_ids: list[list[int]]) -> None:
    for ids in words_ids:
        prefix = ids[:-1]
        assert not prefix or prompt_ids[-len(prefix) :] != prefix, "HF would ban right after the prompt"


def test_banned_word_never_appears_in_either_spelling(llm: LLM, hf_greedy_banning) -> None:
    free = _greedy(llm, [])
    encode = llm.tokenizer.encode
    assert free.token_ids == hf_greedy_banning(free.prompt_token_ids, [])

    # A word of the greedy output whose bare spelling takes several tokens.
    word = next(
        (w for w in re.findall(r"[A-Za-z]+", free.text) if len(encode(w, add_special_tokens=False)) >= 2),
        None,
    )
    assert word is not None, f"no multi-token word in the greedy output {free.text!r}"
    spellings = {s: encode(s, add_special_tokens=False) for s in (word, " " + word)}
    where = [i for i in (_find(free.token_ids, ids) for ids in spellings.values()) if i >= 0]
    assert where, f"the greedy output {free.token_ids} holds no spelling of {word!r} as tokens {spellings}"
    first = min(where)

    banned = _greedy(llm, list(spellings))
    for spelling, ids in spellings.items():
        assert _find(banned.token_ids, ids) == -1, f"{spelling!r} ({ids}) in {banned.token_ids}"
    assert word not in banned.text
    # Greedy: the bans change nothing before the word, and the token that began it is replaced there.
    assert banned.token_ids[:first] == free.token_ids[:first]
    assert banned.token_ids[first] != free.token_ids[first]
    _assert_prefixes_off_the_prompt_end(free.prompt_token_ids, list(spellings.values()))
    assert banned.token_ids == hf_greedy_banning(free.prompt_token_ids, list(spellings.values()))


def _pair_repeating_its_last_token(tokens: list[int], tokenizer) -> int:
    """The first k whose token also came earlier after another token, with (tokens[k-1], tokens[k]) the
    tokenizer's own encoding of their text; -1 if none."""
    for k in range(2, len(tokens)):
        earlier = [
            m for m in range(k - 1) if tokens[m] == tokens[k] and (m == 0 or tokens[m - 1] != tokens[k - 1])
        ]
        pair = tokens[k - 1 : k + 1]
        if earlier and tokenizer.encode(tokenizer.decode(pair), add_special_tokens=False) == pair:
            return k
    return -1


def test_multi_token_word_is_banned_only_after_its_prefix(llm: LLM, hf_greedy_banning) -> None:
    """A word of two tokens bans its last token only right after its first: the same last token earlier in
    the output, and the first token alone, are still generated."""
    free = _greedy(llm, [])
    k = _pair_repeating_its_last_token(free.token_ids, llm.tokenizer)
    assert k > 0, f"no token of {free.token_ids} repeats after a different token"
    pair = free.token_ids[k - 1 : k + 1]
    banned = _greedy(llm, [llm.tokenizer.decode(pair)])
    assert banned.token_ids[:k] == free.token_ids[:k]  # holds the last token elsewhere, and the first
    assert banned.token_ids[k] != free.token_ids[k]  # the last token right after the first is banned
    assert _find(banned.token_ids, pair) == -1
    _assert_prefixes_off_the_prompt_end(free.prompt_token_ids, [pair])
    assert banned.token_ids == hf_greedy_banning(free.prompt_token_ids, [pair])
