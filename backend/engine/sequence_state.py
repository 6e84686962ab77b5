"""The engine's side of one sequence: its parameters, detokenizer and grammar, and what each token does to it."""

from __future__ import annotations

from dataclasses import dataclass, field

from inflight.backend.engine.detokenizer import IncrementalDetokenizer
from inflight.backend.engine.finish import check_stop
from inflight.backend.engine.guided import GuidedMatcher
from inflight.backend.engine.outputs import RequestOutput, TokenLogprob
from inflight.backend.engine.prompt_logprobs import PromptLogprobsState
from inflight.backend.engine.sampling_params import SamplingParams
from inflight.backend.engine.sequences import RequestSequences
from inflight.batching import Request


@dataclass
class SequenceState:
    """One sequence of a request (the scheduler keeps the token bookkeeping, ``max_output_tokens`` included,
    in ``request``). With n == 1 the sequence is the request: same id."""

    request: Request
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stop_token_ids: frozenset[int]
    parent_id: str  # the caller's request id
    index: int = 0  # the sequence's index in its request
    sequences: RequestSequences | None = None  # its request's sequences when n > 1
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    prompt_logprobs: PromptLogprobsState | None = None  # when asked (see prompt_logprobs.py)
    guided: GuidedMatcher | None = None  # structured output: this sequence's grammar state (guided.py)

    def take_token(self, token_id: int, logprob: TokenLogprob | None) -> tuple[str | None, str | int | None]:
        """Account a sampled token (already appended to ``request``): ``(finish_reason, stop_reason)``, both
        None while the sequence goes on."""
        request = self.request
        if logprob is not None:
            self.cumulative_logprob += logprob.logprob
        stop_string = self.detokenizer.add_token(token_id)
        finish = check_stop(token_id, stop_string, len(request.output_token_ids), self.stop_token_ids,
                            request.max_output_tokens)  # fmt: skip
        finish_reason, stop_reason = finish or (None, None)
        if self.guided is not None and finish_reason is None:
            # NOTE: a grammar that is complete ends the sequence ("stop"); the token was accepted early when
            # the next step's mask needed it (then this skips it).
            index = len(request.output_token_ids) - 1
            finish_reason, stop_reason = self.guided.finish(index, token_id) or (None, None)
        return finish_reason, stop_reason

    def output(
        self,
        token_ids: list[int],
        logprobs: list[TokenLogprob],
        finish_reason: str | None,
        stop_reason: str | int | None,
        finished: bool,
        error: str | None = None,
    ) -> RequestOutput:
        """This sequence's delta; ``finished``: the request's last (its other sequences finished)."""
        request = self.request
        with_logprobs = self.params.logprobs is not None
        prompt = self.prompt_logprobs
        # NOTE: positional: keyword arguments made this 3x slower (1 us an output, 1,024 of them a step).
        return RequestOutput(
            self.parent_id,
            token_ids,
            self.detokenizer.get_delta(finish_reason is not None),
            finished,
            finish_reason,
            len(request.prompt_token_ids),
            len(request.output_token_ids),
            self.cumulative_logprob if with_logprobs else None,
            logprobs if with_logprobs else None,
            stop_reason,
            error,
            prompt.take() if prompt is not None and token_ids else None,  # once, on the first token's delta
            self.index,
        )
