"""A request's prompt log-probabilities (``SamplingParams.prompt_logprobs``), gathered over its prompt's steps.

The executor returns those of the positions each step computes (``PromptLogprobs``, one per request and
step: a prompt in chunks gives several); they are appended in position order. A prompt computed again
(preempted and recomputed, or a step planned before the previous one was read) gives positions already
held: they are skipped, so each prompt token has exactly one entry. The list is complete when the step
that samples the first token is read (that step computes the prompt's last chunk), and goes out once, on
that first delta (``take``).
"""

from __future__ import annotations

from inflight.backend.engine.outputs import TokenLogprob
from inflight.backend.executor.executor import PromptLogprobRequest, PromptLogprobs


class PromptLogprobsState:
    """The entries of one request so far: ``entries[i]`` is prompt token i's (entry 0 is None)."""

    def __init__(self, prompt_token_ids: list[int], num_top: int) -> None:
        self.prompt_token_ids = prompt_token_ids
        self.num_top = num_top
        self.entries: list[TokenLogprob | None] = [None]
        self.sent = False

    @property
    def complete(self) -> bool:
        return len(self.entries) == len(self.prompt_token_ids)

    def executor_request(self) -> PromptLogprobRequest:
        """What the executor needs for a step of this request: positions from the first one not held."""
        return PromptLogprobRequest(self.num_top, self.prompt_token_ids, len(self.entries) - 1)

    def add(self, part: PromptLogprobs) -> None:
        """Append a step's positions ``part.start ...``, skipping those held already."""
        held = len(self.entries) - 1  # positions 0 .. held - 1 have given their next token's entry
        if part.start > held:
            raise AssertionError(f"prompt logprobs from position {part.start}, expected at most {held}")
        prompt, k = self.prompt_token_ids, self.num_top
        for j in range(held - part.start, len(part.logprobs)):
            position = part.start + j
            top = tuple(zip(part.top_token_ids[j][:k], part.top_logprobs[j][:k], strict=True))
            self.entries.append(TokenLogprob(prompt[position + 1], part.logprobs[j], top))

    def take(self) -> list[TokenLogprob | None] | None:
        """The whole list the first time it is asked for once complete; None before and after."""
        if self.sent or not self.complete:
            return None
        self.sent = True
        return self.entries
