"""The engine: admits requests, runs scheduled steps on the executor, turns sampled tokens into outputs.

``add_request`` / ``abort`` / ``step`` are the whole interface; ``inflight.LLM`` loops ``step`` for offline
use and the Triton model drives it from its engine thread, streaming the per-step deltas. A step reads as
nano-vllm's: schedule (``batching.Scheduler``), execute (``ModelExecutor``: forward and sampling, launched on
the device), update (read the tokens, detokenize, decide the finish). With ``async_scheduling`` (the
default) step N's update comes after step N+1's launch, so the host's work overlaps the device's
(``overlap.StepOverlap`` says when each step is read). The engine holds no tensors: the executor hands it
token ids and log-probabilities as lists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from inflight.backend.engine.args import EngineArgs
from inflight.backend.engine.detokenizer import IncrementalDetokenizer
from inflight.backend.engine.guided import GuidedDecoding
from inflight.backend.engine.outputs import RequestOutput, TokenLogprob
from inflight.backend.engine.overlap import StepOverlap
from inflight.backend.engine.prompt_logprobs import PromptLogprobsState
from inflight.backend.engine.prompts import Prompt, PromptProcessor
from inflight.backend.engine.sampling_params import SamplingParams
from inflight.backend.engine.sequence_state import SequenceState
from inflight.backend.engine.sequences import RequestSequences, sequence_id, sequence_params
from inflight.backend.executor.executor import (
    EngineDeadError,
    MemoryFigures,
    ModelExecutor,
    SamplingRows,
    StepHandle,
    StepObserver,
)
from inflight.backend.executor.model_config import ModelConfig
from inflight.batching import (
    PromptGroup,
    QueueFullError,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    SchedulerStats,
)

logger = logging.getLogger("inflight")

__all__ = ["EngineDeadError", "LLMEngine"]

_FINISH_STATUS = {
    "stop": RequestStatus.FINISHED_STOPPED,
    "length": RequestStatus.FINISHED_LENGTH,
    "abort": RequestStatus.FINISHED_ABORTED,
    "error": RequestStatus.FINISHED_ERROR,
}


class LLMEngine:
    """In-flight batching over a paged KV cache for one model on one device."""

    def __init__(self, args: EngineArgs) -> None:
        from transformers import AutoTokenizer

        self.args = args
        self.model_config = cfg = ModelConfig.from_pretrained(args.model)
        self.max_model_len = args.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len must be at most the checkpoint's max_position_embeddings "
                f"({cfg.max_position_embeddings}), got {self.max_model_len}"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        self.prompts = PromptProcessor(self.tokenizer, cfg.vocab_size, self.max_model_len)
        self.executor = ModelExecutor(args.executor_config(self.max_model_len), cfg)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_batched_tokens(self.max_model_len),
                max_model_len=self.max_model_len,
                block_size=args.block_size,
                num_blocks=self.executor.num_blocks,
                enable_prefix_caching=args.enable_prefix_caching,
                enable_chunked_prefill=args.enable_chunked_prefill,
                max_queue_size=args.max_queue_size,
                num_host_blocks=self.executor.num_host_blocks,
            )
        )
        self.eos_token_ids = self.executor.eos_token_ids
        self.guided = GuidedDecoding(self.tokenizer, cfg.vocab_size, self.eos_token_ids)
        self._guided_ids: set[str] = set()  # sequences with a grammar
        self._requests: dict[str, SequenceState] = {}  # by sequence id (the request id when n == 1)
        self._sequences: dict[str, RequestSequences] = {}  # requests with n > 1, by request id
        self._pending: list[RequestOutput] = []  # finals of aborted requests, returned by the next step
        self._overlap = StepOverlap(args.async_scheduling, args.async_scheduling_min_batch)
        self._history_ids: set[str] = set()  # requests whose sampling reads their output tokens
        self._prompt_logprob_ids: set[str] = set()  # requests whose prompt logprobs are not complete
        self._arrivals = 0

    # ----------------------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> int:
        """Validate and queue a request; returns its prompt length. Raises ValueError for bad input and
        ``QueueFullError`` when the waiting queue is full."""
        return self.add_checked_request(request_id, self.prompts.token_ids(prompt), params)

    def add_checked_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams | None = None
    ) -> int:
        """``add_request`` for prompt ids that ``self.prompts.token_ids`` returned: not checked again (callers
        that need the ids themselves, or check every prompt before queuing any, have done it).

        With ``params.n`` > 1 the request is n sequences (ids ``sequence_id(request_id, i)``) that share the
        prompt's full KV blocks (``batching.PromptGroup``); all n are queued or none."""
        if request_id in self._requests or request_id in self._sequences:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params or SamplingParams()
        self.check_params(params)
        if params.n == 1:
            self._add_sequence(request_id, request_id, 0, prompt_ids, params, None, None)
            return len(prompt_ids)
        ids = [sequence_id(request_id, i) for i in range(params.n)]
        if any(i in self._requests for i in ids):
            raise ValueError(f"request_id {request_id!r}: its sequence ids {ids[0]!r}... are already in use")
        max_queue_size = self.scheduler.config.max_queue_size
        if max_queue_size is not None and self.scheduler.num_waiting + params.n > max_queue_size:
            raise QueueFullError(
                f"waiting queue is full: no room for n={params.n} sequences (max_queue_size={max_queue_size})"
            )
        sequences = RequestSequences(ids, params.n)
        group = PromptGroup.for_prompt(request_id, len(prompt_ids), self.args.block_size)
        for i, seq_id in enumerate(ids):
            self._add_sequence(
                seq_id, request_id, i, prompt_ids, sequence_params(params, i), sequences, group
            )
        self._sequences[request_id] = sequences
        return len(prompt_ids)

    def _add_sequence(
        self,
        request_id: str,
        parent_id: str,
        index: int,
        prompt_ids: list[int],
        params: SamplingParams,
        sequences: RequestSequences | None,
        group: PromptGroup | None,
    ) -> None:
        # NOTE: the scheduler clamps max_output_tokens to the room the prompt leaves (max_model_len). Prompt
        # logprobs come from computed positions only: such a request takes no prefix-cache hit.
        want_prompt = params.prompt_logprobs is not None
        request = Request(request_id, prompt_ids, self.args.block_size, arrival_index=self._arrivals,
                          max_output_tokens=params.max_tokens, skip_prefix_cache=want_prompt,
                          prompt_group=group)  # fmt: skip
        state = SequenceState(
            request=request,
            params=params,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer,
                prompt_ids,
                params.skip_special_tokens,
                params.stop,
                params.include_stop_str_in_output,
            ),
            stop_token_ids=frozenset(params.stop_token_ids)
            | (frozenset() if params.ignore_eos else self.eos_token_ids),
            parent_id=parent_id,
            index=index,
            sequences=sequences,
            bad_words_token_ids=[
                self.tokenizer.encode(w, add_special_tokens=False) for w in params.bad_words
            ],
            prompt_logprobs=PromptLogprobsState(prompt_ids, params.prompt_logprobs) if want_prompt else None,
            guided=self.guided.matcher(params.guided_decoding),  # one per sequence
        )
        self.scheduler.add_request(request)  # may raise QueueFullError; nothing is registered then
        self._arrivals += 1
        self._requests[request_id] = state
        if state.bad_words_token_ids or params.uses_penalties:
            self._history_ids.add(request_id)
        if state.prompt_logprobs is not None and not state.prompt_logprobs.complete:
            self._prompt_logprob_ids.add(request_id)
        if state.guided is not None:
            self._guided_ids.add(request_id)

    def check_params(self, params: SamplingParams) -> None:
        """Refuse sampling parameters past this engine's limits (``SamplingParams`` checks the rest)."""
        if params.max_tokens is not None and params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens is {params.max_tokens}, more than max_model_len ({self.max_model_len}) can "
                f"ever hold"
            )
        max_n = min(self.args.max_num_seqs, self.scheduler.config.max_queue_size or self.args.max_num_seqs)
        if params.n > max_n:
            raise ValueError(f"n must be in [1, {max_n}] (max_num_seqs and max_queue_size), got {params.n}")
        if params.logit_bias:
            vocab_size = self.model_config.vocab_size
            for token_id in params.logit_bias:
                if token_id >= vocab_size:
                    raise ValueError(
                        f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab_size})"
                    )
        self.guided.check(params.guided_decoding)  # a grammar that does not compile, named

    def abort(self, request_id: str) -> bool:
        """Stop a request (all of its sequences) and free its blocks; the final outputs come with the next
        ``step``."""
        outputs = self._end_request(request_id, "abort")
        self._pending += outputs
        return bool(outputs)

    def _end_request(
        self, request_id: str, finish_reason: str, error: str | None = None
    ) -> list[RequestOutput]:
        """End every unfinished sequence of a request (abort, a failed step): their last outputs."""
        sequences = self._sequences.get(request_id)
        outputs = []
        for seq_id in sequences.sequence_ids if sequences is not None else (request_id,):
            state = self._requests.get(seq_id)
            if state is not None:
                finished = self._end(state, finish_reason)
                outputs.append(state.output([], [], finish_reason, None, finished, error))
        return outputs

    def _end(self, state: SequenceState, finish_reason: str) -> bool:
        """Finish one sequence and free its blocks; True when it was its request's last."""
        request_id = state.request.request_id
        self._forget(request_id)
        self.scheduler.finish_requests(request_id, _FINISH_STATUS[finish_reason])
        sequences = state.sequences
        if sequences is None:
            return True
        sequences.num_unfinished -= 1
        if sequences.num_unfinished:
            return False
        del self._sequences[state.parent_id]
        return True

    def _forget(self, request_id: str) -> SequenceState | None:
        self._history_ids.discard(request_id)
        self._prompt_logprob_ids.discard(request_id)
        self._guided_ids.discard(request_id)
        return self._requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending) or self._overlap.in_flight is not None

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    @property
    def num_waiting(self) -> int:
        """Requests queued for their first (or, preempted, next) step."""
        return self.scheduler.num_waiting

    @property
    def max_batched_tokens(self) -> int:
        """The most tokens one step computes."""
        return self.scheduler.config.max_num_batched_tokens

    @property
    def num_kv_blocks(self) -> int:
        """The KV cache's usable blocks (the null block left out)."""
        return self.scheduler.kv_cache_manager.num_usable_blocks

    def stats(self) -> SchedulerStats:
        """Queue sizes, KV-cache usage, prefix-cache hit rate, preemptions and swaps now."""
        return self.scheduler.get_stats()

    @property
    def memory(self) -> MemoryFigures:
        """What the model's memory holds (weights, activation peak, KV cache, longest sequence), from load."""
        return self.executor.memory

    @property
    def memory_by_rank(self) -> list[MemoryFigures]:
        """Every tensor-parallel rank's memory figures, rank 0 first (one entry without tensor parallelism)."""
        return self.executor.memory_by_rank

    def add_death_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(reason)`` (from another thread) when a tensor-parallel worker dies: the engine cannot
        step any more; the serving layer ends its requests and turns the model not ready."""
        self.executor.add_death_listener(listener)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; nothing to do with one process)."""
        self.executor.shutdown()

    def add_step_observer(self, observer: StepObserver) -> None:
        """Call ``observer`` around each step's device work (GPU timing in the benchmarks; the reliability
        suite's fault injection, whose ``before_forward`` may raise like a real fault)."""
        self.executor.observers.append(observer)

    # ------------------------------------------------------------------------------------------- a step
    def step(self, while_gpu_runs: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Run one step; returns a delta for every request that produced a token or finished.

        With ``async_scheduling`` the tokens returned are those of the step launched by the previous call
        (see ``overlap``); otherwise those of this call's step. ``while_gpu_runs`` is called once the step
        is launched, before the host waits for tokens: host work there overlaps the GPU's.
        """
        outputs, self._pending = self._pending, []
        # NOTE: penalties and bad words read the output tokens: then the step in flight is read first.
        read_first, previous = self._overlap.begin(must_read_first=bool(self._history_ids))
        if read_first is not None:
            outputs += self._update(read_first)
        scheduled = self.scheduler.schedule()
        # NOTE: here, not in the launch: a swapped-out request is not part of the step, and the copies
        # must be queued even when the step fails or schedules nothing.
        self.executor.swap(scheduled.swap_out, scheduled.swap_in)
        launched = self._execute(scheduled, previous, outputs) if scheduled.scheduled else None
        read_now = self._overlap.launched(launched)
        if while_gpu_runs is not None:
            while_gpu_runs()
        if previous is not None:
            outputs += self._update(previous)
        if read_now is not None:
            outputs += self._update(read_now)
        return outputs

    def wait_for_small_step(self) -> list[RequestOutput]:
        """Wait until the device has finished the step in flight if it has fewer than
        ``async_scheduling_min_batch`` requests (see ``overlap``); the serving loop calls this before taking
        in new requests. Its tokens are read by the next ``step``, after that step's launch, unless it
        sampled a request's first token: then they are read now, so that first token goes out without
        waiting for the next step's planning (TTFT)."""
        step = self._overlap.wait_if_small()
        return self._update(step) if step is not None else []

    def _execute(
        self, scheduled: SchedulerOutput, previous: StepHandle | None, outputs: list[RequestOutput]
    ) -> StepHandle | None:
        """Launch a step on the executor; a failure ends the step's requests (in ``outputs``)."""
        try:
            states = [self._requests[r.request_id] for r in scheduled.scheduled if r.needs_sample]
            wanted = self._prompt_logprob_ids
            prompt = {
                r.request_id: state.executor_request()
                for r in scheduled.scheduled
                if r.request_id in wanted and (state := self._requests[r.request_id].prompt_logprobs)
            } if wanted else None  # fmt: skip
            rows = self._sampling_rows(states) if states else None
            if rows is not None and self._guided_ids:
                # NOTE: the masks are built inside the launch, after the forward; tokens of ``previous`` that
                # guided rows were planned without are accepted first (guided.py, docs/structured-output.md).
                rows.guided_masks = self.guided.mask_source(states, previous, self._requests)
            return self.executor.execute(scheduled, rows, previous, prompt or None)
        except EngineDeadError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed step ends its own requests, not the engine
            logger.exception("engine step failed")
            error = f"{type(exc).__name__}: {exc}"
            for entry in scheduled.scheduled:
                state = self._requests.get(entry.request_id)
                if state is not None:  # NOTE: the whole request ends, its other sequences too
                    outputs += self._end_request(state.parent_id, "error", error)
            return None

    @staticmethod
    def _sampling_rows(states: list[SequenceState]) -> SamplingRows:
        return SamplingRows(
            params=[s.params for s in states],
            prompt_token_ids=[s.request.prompt_token_ids for s in states],
            output_token_ids=[s.request.output_token_ids for s in states],
            # outputs before this step's token: the known ones and those still being sampled
            num_output_tokens=[
                s.request.num_output_tokens + s.request.num_pending_tokens - 1 for s in states
            ],
            bad_words_token_ids=[s.bad_words_token_ids for s in states],
        )

    def _update(self, step: StepHandle) -> list[RequestOutput]:
        """Read a launched step's tokens (waiting for it) and turn them into the requests' deltas."""
        sampled = step.read()
        token_ids, sampled_lp, top_lp, top_ids = (
            sampled.token_ids, sampled.logprobs, sampled.top_logprobs, sampled.top_token_ids
        )  # fmt: skip
        self.scheduler.append_sampled_tokens(step.sample_ids, token_ids)
        outputs = []
        requests, process = self._requests, self._process_token
        for part in sampled.prompt_logprobs or ():
            state = requests.get(part.request_id)
            if state is not None and state.prompt_logprobs is not None:
                state.prompt_logprobs.add(part)
                if state.prompt_logprobs.complete:
                    self._prompt_logprob_ids.discard(part.request_id)
        for i, (request_id, token_id) in enumerate(zip(step.sample_ids, token_ids, strict=True)):
            state = requests.get(request_id)
            if state is None:
                continue  # finished or aborted while the step ran: its token is dropped
            logprob = None
            if sampled_lp is not None and (n := state.params.logprobs) is not None:
                top = (
                    tuple(zip(top_ids[i][:n], top_lp[i][:n], strict=True))
                    if top_ids is not None and n
                    else ()
                )
                logprob = TokenLogprob(token_id, sampled_lp[i], top)
            outputs.append(process(state, token_id, logprob))
        return outputs

    def _process_token(
        self, state: SequenceState, token_id: int, logprob: TokenLogprob | None
    ) -> RequestOutput:
        finish_reason, stop_reason = state.take_token(token_id, logprob)
        finished = finish_reason is not None and self._end(state, finish_reason)
        guided = state.guided  # a token the grammar refused: a bug, said
        return state.output([token_id], [logprob] if logprob else [], finish_reason, stop_reason, finished,
                            guided.error if guided is not None else None)  # fmt: skip
