"""What the engine returns: per-step deltas (streamed by the Triton model) and whole completions.

Prompt log-probabilities (``SamplingParams.prompt_logprobs``) are one list per request, one entry per prompt
token: entry 0 is None (nothing precedes the first token), entry i a ``TokenLogprob`` of prompt token i as
predicted at position i - 1 (its ``top``: the k best tokens there). They come whole, once, on the request's
first delta (the one with its first token), and ``CompletionOutput.prompt_logprobs`` keeps them.

A request with ``SamplingParams.n`` > 1 generates n sequences: each delta is one sequence's (``index``
0 .. n-1), a sequence's last delta has its ``finish_reason``, and ``finished`` is set on the request's last
delta only (every sequence finished). With n == 1 the two coincide. ``LLM.generate`` returns, per prompt,
sequence 0's ``CompletionOutput``, whose ``outputs`` lists all n (vLLM's ``RequestOutput.outputs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one generated (or prompt) token and, if asked, its top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), most likely first


@dataclass
class RequestOutput:
    """One step's news for one sequence of a request (``index``). ``finish_reason`` is set on exactly one
    output per sequence, ``finished`` on exactly one output per request (its last)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error" once the sequence finished
    num_input_tokens: int
    num_output_tokens: int
    cumulative_logprob: float | None = None
    new_logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # whole, on the first delta only (see above)
    index: int = 0  # the sequence (0 .. n-1)


@dataclass
class CompletionOutput:
    """A finished sequence of a request, as ``LLM.generate`` returns it (sequence 0; ``outputs`` has all)."""

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when asked: [None, prompt token 1's, ...]
    index: int = 0  # the sequence (0 .. n-1)
    sequences: list[CompletionOutput] | None = field(default=None, repr=False)  # all n, on sequence 0

    @property
    def outputs(self) -> list[CompletionOutput]:
        """The request's n sequences in index order (vLLM's ``RequestOutput.outputs``): ``[self]`` for n == 1."""
        return self.sequences if self.sequences is not None else [self]

    @property
    def num_input_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)

    def add(self, delta: RequestOutput) -> None:
        """Fold a step's delta into the completion."""
        self.text += delta.new_text
        self.token_ids.extend(delta.new_token_ids)
        if delta.new_logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.new_logprobs
        self.cumulative_logprob = delta.cumulative_logprob
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
