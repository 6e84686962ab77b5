"""The engine: admits requests, runs scheduled steps on the model, samples, detokenizes, finishes.

``add_request`` / ``abort`` / ``step`` are the whole interface; ``inflight.LLM`` loops ``step`` for offline
use and the Triton model drives it from its engine thread, streaming the per-step deltas.

With ``async_scheduling`` (the default) a step overlaps the host's work with the device's::

    step() call k:   schedule N+1 ─ launch N+1 (forward + sample) ─ wait for N's tokens ─ detokenize N, outputs
    device:          ... N running ...............│ N+1 running ........................................

Step N+1 is planned before N's tokens are on the host: a decode whose input is N's token carries a
placeholder that the runner fills from N's sampled tensor on the device. A request N finishes (a stop
token) may then be computed once more for nothing; requests whose sampling reads their output history
(penalties, bad words) make the engine read N's tokens before it plans N+1.

Planned that early, N+1 cannot take in a request that arrives while N runs: it waits for N+2, a whole
step more to its first token. So the serving loop calls ``wait_for_small_step`` before it takes in new
requests: a step of fewer than ``async_scheduling_min_batch`` requests (where the host's planning is
short) is waited for on the device first, then N+1 is planned with whatever arrived, launched, and only
then are N's tokens detokenized and turned into outputs, while N+1 runs::

    small steps:     wait for N ─ take in arrivals ─ schedule N+1 ─ launch N+1 ─ detokenize N, outputs
    device:          N running ─┘ (idle while N+1 is planned)    │ N+1 running .......................

A small step that ended a prompt is read right after the wait instead, so the request's first token does
not wait for N+1's planning and launch (once per request, the device idles that much longer).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from inflight.backend.engine.args import DEFAULT_CPU_KV_CACHE_BYTES, EngineArgs
from inflight.backend.engine.detokenizer import IncrementalDetokenizer
from inflight.backend.engine.finish import check_stop
from inflight.backend.engine.outputs import RequestOutput, TokenLogprob
from inflight.backend.engine.prompts import Prompt, PromptProcessor
from inflight.backend.engine.sampling_params import SamplingParams
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.model_runner import ModelRunner, PendingTokens, kv_cache_bytes_per_block
from inflight.backend.executor.sampler import Sampler, SamplerOutput, SamplingBatch
from inflight.backend.executor.weight_loader import load_model
from inflight.batching import Request, RequestStatus, Scheduler, SchedulerConfig, SchedulerOutput

logger = logging.getLogger("inflight")


class EngineDeadError(RuntimeError):
    """A fault the engine cannot recover from: ``step`` re-raises it and the serving layer reports not ready
    (any other exception inside a step ends only that step's requests)."""


_FINISH_STATUS = {
    "stop": RequestStatus.FINISHED_STOPPED,
    "length": RequestStatus.FINISHED_LENGTH,
    "abort": RequestStatus.FINISHED_ABORTED,
    "error": RequestStatus.FINISHED_ERROR,
}


@dataclass
class _StepInFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    scheduled: SchedulerOutput
    sample_ids: list[str]  # the request of each sampled row
    sampled: torch.Tensor  # [len(sample_ids)] int64 on the device: the next step's pending inputs
    rows: dict[str, int]  # request id -> row of `sampled`
    host: _HostTokens


class _HostTokens:
    """The device-to-host copies of a step's sampler output, started at launch and read once."""

    def __init__(self, out: SamplerOutput, device: torch.device) -> None:
        tensors = [out.sampled_token_ids, out.logprobs, out.top_logprobs, out.top_token_ids]
        self._event = None
        if device.type == "cuda":
            # NOTE: pinned buffers and non_blocking copies: the host does not wait for the step here.
            copies = []
            for t in tensors:
                if t is None:
                    copies.append(None)
                    continue
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                copies.append(host)
            tensors = copies
            self._event = torch.cuda.Event()
            self._event.record()
        self._tensors = tensors
        self.waited = False  # the host has waited for the step: its tokens can be read at no cost
        self._lists: tuple | None = None

    def wait(self) -> None:
        """Until the step and its copies are done on the device."""
        if self._event is not None:
            self._event.synchronize()
        self.waited = True

    def read(self) -> tuple[list[int], list[float] | None, list[list[float]] | None, list[list[int]] | None]:
        """Waits for the copies (the step's one host synchronisation) and returns them as lists."""
        if self._lists is None:
            self.wait()
            self._lists = tuple(None if t is None else t.tolist() for t in self._tensors)
        return self._lists  # type: ignore[return-value]


@dataclass
class _RequestState:
    """The engine's side of a request (the scheduler keeps the token bookkeeping in ``request``)."""

    request: Request
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stop_token_ids: frozenset[int]
    max_tokens: int
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    cumulative_logprob: float = 0.0


class LLMEngine:
    """In-flight batching over a paged KV cache for one model on one device."""

    def __init__(self, args: EngineArgs) -> None:
        from transformers import AutoTokenizer

        self.args = args
        self.model_config = cfg = ModelConfig.from_pretrained(args.model)
        self.device = _resolve_device(args.device)
        self.dtype = _resolve_dtype(args.dtype, self.device, cfg.checkpoint_dtype)
        self.max_model_len = args.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len must be at most the checkpoint's max_position_embeddings "
                f"({cfg.max_position_embeddings}), got {self.max_model_len}"
            )
        batched = args.max_num_batched_tokens or (8192 if args.enable_chunked_prefill else self.max_model_len)
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        self.prompts = PromptProcessor(self.tokenizer, cfg.vocab_size, self.max_model_len)

        bytes_per_block = kv_cache_bytes_per_block(cfg, args.block_size, self.dtype, cfg.num_kv_heads)
        if self.device.type == "cpu":
            # NOTE: on CPU the budget is known before loading, so a configuration that cannot work fails fast.
            num_blocks = self._num_blocks(
                args.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES, bytes_per_block
            )
        model = load_model(cfg, self.dtype, self.device, self.max_model_len)
        self.runner = ModelRunner(model, self.device, args.block_size, self.dtype, self.max_model_len)
        if self.device.type == "cuda":
            num_blocks = self._num_blocks(self._gpu_kv_budget(batched), bytes_per_block)
        self.runner.allocate_kv_cache(num_blocks)
        num_host_blocks = args.swap_space_bytes // bytes_per_block
        self.runner.allocate_host_cache(num_host_blocks)
        host_bytes = num_host_blocks * bytes_per_block
        if self.device.type == "cuda" and host_bytes & (host_bytes - 1):
            # NOTE: torch's pinned-memory allocator rounds an allocation up to a power of two.
            logger.warning("swap space: %d host blocks take %.1f GiB, pinned as %.1f GiB (torch rounds pinned "
                           "allocations up to a power of two; ask for a power of two)", num_host_blocks,
                           host_bytes / 2**30, (1 << (host_bytes - 1).bit_length()) / 2**30)  # fmt: skip
        if self.device.type == "cuda" and args.enable_cuda_graphs:
            self.runner.capture_cuda_graphs(min(args.max_num_seqs, args.max_cuda_graph_batch_size),
                                            args.max_cuda_graph_prefill_tokens, args.max_num_seqs)  # fmt: skip
        if self.device.type == "cuda":
            self.runner.warm_logits(args.max_num_seqs, self.dtype)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=batched,
                max_model_len=self.max_model_len,
                block_size=args.block_size,
                num_blocks=num_blocks,
                enable_prefix_caching=args.enable_prefix_caching,
                enable_chunked_prefill=args.enable_chunked_prefill,
                max_queue_size=args.max_queue_size,
                num_host_blocks=num_host_blocks,
            )
        )
        self.sampler = Sampler()
        torch.manual_seed(args.seed)  # unseeded sampled requests draw from the global generator
        self.eos_token_ids = frozenset(cfg.eos_token_ids)
        self._requests: dict[str, _RequestState] = {}
        self._pending: list[RequestOutput] = []  # finals of aborted requests, returned by the next step
        self._inflight: _StepInFlight | None = None
        self._history_ids: set[str] = set()  # requests whose sampling reads their output tokens
        # (start, end, is_decode, num_tokens) per step while timing (benchmarks)
        self._step_events: list[tuple[torch.cuda.Event, torch.cuda.Event, bool, int]] | None = None
        self._arrivals = 0
        # NOTE: test-only fault injection (the reliability suite): called with each step's SchedulerOutput
        # inside the step, before the forward; whatever it raises is handled like a real fault there.
        self.fault_hook: Callable[[SchedulerOutput], None] | None = None
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d; %d host blocks to swap to",
            num_blocks,
            args.block_size,
            num_blocks * bytes_per_block / 2**20,
            self.max_model_len,
            num_host_blocks,
        )

    def _gpu_kv_budget(self, max_batched_tokens: int) -> int:
        """KV bytes on the GPU: a fraction of the memory free after a profiling pass of the largest step."""
        if self.args.kv_cache_memory_bytes is not None:
            return self.args.kv_cache_memory_bytes
        peak = self.runner.profile_peak_bytes(max_batched_tokens, self.args.max_num_seqs)
        free, _ = torch.cuda.mem_get_info(self.device)
        # NOTE: the activation peak of the largest step (and the decode graphs' pool, which is smaller)
        # must still fit beside the cache.
        budget = int(free * self.args.kv_cache_memory_fraction) - peak
        logger.info("GPU memory: %.2f GiB free after loading, step peak %.2f GiB -> KV budget %.2f GiB",
                    free / 2**30, peak / 2**30, budget / 2**30)  # fmt: skip
        return max(budget, 0)

    def _num_blocks(self, budget: int, bytes_per_block: int) -> int:
        """Blocks (the null block included) that ``budget`` bytes hold; fails if one request cannot fit."""
        num_blocks = budget // bytes_per_block
        usable = max(num_blocks - 1, 0)
        needed = math.ceil(self.max_model_len / self.args.block_size)
        # NOTE: blocks beyond what max_num_seqs full-length requests can hold would only ever serve the
        # prefix cache; cap there so a generous budget does not allocate memory nothing can use.
        num_blocks = min(num_blocks, self.args.max_num_seqs * needed + 1)
        if usable < needed:
            bs, length = self.args.block_size, self.max_model_len
            raise ValueError(
                f"KV cache too small: one request of max_model_len={length} tokens needs {needed} blocks of "
                f"{bs} tokens, but the KV budget of {budget} bytes holds only {usable} usable blocks "
                f"({bytes_per_block} bytes each). The largest max_model_len that fits is {usable * bs}; "
                f"lower max_model_len or raise kv_cache_memory_bytes / kv_cache_memory_fraction."
            )
        return num_blocks

    # ----------------------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> int:
        """Validate and queue a request; returns its prompt length. Raises ValueError for bad input and
        ``QueueFullError`` when the waiting queue is full."""
        return self.add_checked_request(request_id, self.prompts.token_ids(prompt), params)

    def add_checked_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams | None = None
    ) -> int:
        """``add_request`` for prompt ids that ``self.prompts.token_ids`` returned: not checked again (callers
        that need the ids themselves, or check every prompt before queuing any, have done it)."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params or SamplingParams()
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        request = Request(request_id, prompt_ids, self.args.block_size, arrival_index=self._arrivals,
                          max_output_tokens=max_tokens)  # fmt: skip
        state = _RequestState(
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
            max_tokens=max_tokens,
            bad_words_token_ids=[
                self.tokenizer.encode(w, add_special_tokens=False) for w in params.bad_words
            ],
        )
        self.scheduler.add_request(request)  # may raise QueueFullError; nothing is registered then
        self._arrivals += 1
        self._requests[request_id] = state
        if state.bad_words_token_ids or params.uses_penalties:
            self._history_ids.add(request_id)
        return len(prompt_ids)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; its final output comes with the next ``step``."""
        state = self._forget(request_id)
        if state is None:
            return False
        self.scheduler.finish_requests(request_id, RequestStatus.FINISHED_ABORTED)
        self._pending.append(self._output(state, [], [], "abort", None, finished=True))
        return True

    def _forget(self, request_id: str) -> _RequestState | None:
        self._history_ids.discard(request_id)
        return self._requests.pop(request_id, None)

    def start_gpu_timing(self) -> None:
        """Record CUDA events around each step's device work (benchmarks: see ``gpu_step_breakdown``)."""
        self._step_events = [] if self.device.type == "cuda" else None

    def gpu_step_breakdown(self) -> dict[str, dict[str, float]] | None:
        """Per kind of step ("decode": one token per sequence; "prefill_or_mixed"): steps, tokens and device
        seconds since ``start_gpu_timing``; None on CPU.

        NOTE: a step's events bracket its work on the stream, so the sum leaves out the time the device
        sat idle waiting for the host: wall time minus this is the host-bound part of a run.
        """
        if self._step_events is None:
            return None
        torch.cuda.synchronize(self.device)
        kinds: dict[str, dict[str, float]] = {}
        for start, end, is_decode, num_tokens in self._step_events:
            kind = kinds.setdefault("decode" if is_decode else "prefill_or_mixed",
                                    {"steps": 0, "tokens": 0, "gpu_seconds": 0.0})  # fmt: skip
            kind["steps"] += 1
            kind["tokens"] += num_tokens
            kind["gpu_seconds"] += start.elapsed_time(end) / 1e3
        return kinds

    def gpu_idle_gaps(self, top: int = 5) -> dict[str, Any] | None:
        """Where the device sat idle between the timed steps (benchmarks; None on CPU): the total, the
        gaps of a millisecond or more, and the ``top`` largest with the step after them.

        NOTE: a step's start event runs on the stream once the work before it is done, so the time from
        one step's end event to the next one's start is the device waiting for the host (a step's
        sampling-input copies fall in between too; they take microseconds).
        """
        if self._step_events is None:
            return None
        torch.cuda.synchronize(self.device)
        events = self._step_events
        gaps = [
            (events[i - 1][1].elapsed_time(events[i][0]), i, events[i][2], events[i][3])
            for i in range(1, len(events))
        ]
        return {
            "steps": len(events),
            "idle_between_steps_s": round(sum(g for g, *_ in gaps) / 1e3, 4),
            "gaps_over_1ms": sum(1 for g, *_ in gaps if g >= 1.0),
            "idle_in_gaps_over_1ms_s": round(sum(g for g, *_ in gaps if g >= 1.0) / 1e3, 4),
            "largest": [
                {
                    "ms": round(g, 2),
                    "before_step": i,
                    "kind": "decode" if d else "prefill_or_mixed",
                    "tokens": n,
                }
                for g, i, d, n in sorted(gaps, reverse=True)[:top]
            ],
        }

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending) or self._inflight is not None

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------------------------------------- a step
    def step(self, while_gpu_runs: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Run one step; returns a delta for every request that produced a token or finished.

        With ``async_scheduling`` the tokens returned are those of the step launched by the previous call
        (see the module docstring); otherwise those of this call's step. ``while_gpu_runs`` is called once
        the step is launched, before the host waits for tokens: host work there overlaps the GPU's.
        """
        outputs, self._pending = self._pending, []
        previous, self._inflight = self._inflight, None
        if previous is not None and self._history_ids:
            outputs += self._read_step(previous)  # penalties and bad words need the tokens on the host
            previous = None
        scheduled = self.scheduler.schedule()
        if scheduled.swap_out or scheduled.swap_in:
            # NOTE: here, not in the step's launch: a swapped-out request is not part of the step, and the
            # copies must be queued even when the step fails or schedules nothing.
            self.runner.swap(scheduled.swap_out, scheduled.swap_in)
        if scheduled.scheduled:
            self._inflight = self._launch(scheduled, previous, outputs)
        if while_gpu_runs is not None:
            while_gpu_runs()
        if previous is not None:
            outputs += self._read_step(previous)
        if self._inflight is not None and not self.args.async_scheduling:
            outputs += self._read_step(self._inflight)
            self._inflight = None
        return outputs

    def wait_for_small_step(self) -> list[RequestOutput]:
        """Wait until the device has finished the step in flight if it has fewer than
        ``async_scheduling_min_batch`` requests (see the module docstring); the serving loop calls this
        before taking in new requests. Its tokens are read by the next ``step``, after that step's launch,
        unless it sampled a request's first token (it ended a prompt): then it is read now and its outputs
        returned, so that first token goes out without waiting for the next step's planning (TTFT)."""
        step = self._inflight
        if step is None or len(step.scheduled.scheduled) >= self.args.async_scheduling_min_batch:
            return []
        step.host.wait()
        if not any(e.needs_sample and len(e.token_ids) > 1 for e in step.scheduled.scheduled):
            return []
        self._inflight = None
        return self._read_step(step)

    def _launch(
        self, scheduled: SchedulerOutput, previous: _StepInFlight | None, outputs: list[RequestOutput]
    ) -> _StepInFlight | None:
        """Start the forward and the sampler of a step; a failure ends the step's requests (in ``outputs``)."""
        try:
            states = [self._requests[r.request_id] for r in scheduled.scheduled if r.needs_sample]
            # NOTE: built before the forward, so its host-to-device copies do not wait for the GPU.
            batch = self._sampling_batch(states) if states else None
            if self.fault_hook is not None:
                self.fault_hook(scheduled)
            pending = None
            if previous is not None:
                # NOTE: a step the host waited for (small) gives its tokens from the host: no device gather.
                known = previous.host.read()[0] if previous.host.waited else None
                pending = PendingTokens(previous.rows, previous.sampled, known)
            if self._step_events is not None:
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
            model_output = self.runner.execute(scheduled, pending)
            out = self.sampler(model_output.logits, batch) if batch is not None else None
            if self._step_events is not None:
                events[1].record()
                num_tokens = scheduled.num_batched_tokens
                self._step_events.append((*events, num_tokens == len(scheduled.scheduled), num_tokens))
            if out is None:
                return None
            ids = model_output.request_ids
            return _StepInFlight(scheduled, ids, out.sampled_token_ids, {rid: i for i, rid in enumerate(ids)},
                                 _HostTokens(out, self.device))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a failed step ends its own requests, not the engine
            if isinstance(exc, EngineDeadError):
                raise
            logger.exception("engine step failed")
            for entry in scheduled.scheduled:
                state = self._forget(entry.request_id)
                if state is not None:
                    self.scheduler.finish_requests(entry.request_id, RequestStatus.FINISHED_ERROR)
                    outputs.append(
                        self._output(
                            state, [], [], "error", None, finished=True, error=f"{type(exc).__name__}: {exc}"
                        )
                    )
            return None

    def _read_step(self, step: _StepInFlight) -> list[RequestOutput]:
        """Read a launched step's tokens (waiting for it) and turn them into the requests' deltas."""
        token_ids, sampled_lp, top_lp, top_ids = step.host.read()
        self.scheduler.append_sampled_tokens(step.sample_ids, token_ids)
        outputs = []
        requests, process = self._requests, self._process_token
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

    def _sampling_batch(self, states: list[_RequestState]) -> SamplingBatch:
        return SamplingBatch.build(
            [s.params for s in states],
            [s.request.prompt_token_ids for s in states],
            [s.request.output_token_ids for s in states],
            # outputs before this step's token: the known ones and those still being sampled
            num_output_tokens=[
                s.request.num_output_tokens + s.request.num_pending_tokens - 1 for s in states
            ],
            vocab_size=self.model_config.vocab_size,
            device=self.device,
            eos_token_ids=self.eos_token_ids,
            bad_words_token_ids=[s.bad_words_token_ids for s in states],
        )

    def _process_token(
        self, state: _RequestState, token_id: int, logprob: TokenLogprob | None
    ) -> RequestOutput:
        request = state.request
        if logprob is not None:
            state.cumulative_logprob += logprob.logprob
        stop_string = state.detokenizer.add_token(token_id)
        finish = check_stop(
            token_id,
            stop_string,
            len(request.output_token_ids),
            request.num_tokens,
            state.stop_token_ids,
            state.max_tokens,
            self.max_model_len,
        )
        finish_reason, stop_reason = finish or (None, None)
        if finish_reason is not None:
            self._forget(request.request_id)
            self.scheduler.finish_requests(request.request_id, _FINISH_STATUS[finish_reason])
        return self._output(
            state,
            [token_id],
            [logprob] if logprob else [],
            finish_reason,
            stop_reason,
            finish_reason is not None,
        )

    def _output(
        self,
        state: _RequestState,
        token_ids: list[int],
        logprobs: list[TokenLogprob],
        finish_reason: str | None,
        stop_reason: str | int | None,
        finished: bool,
        error: str | None = None,
    ) -> RequestOutput:
        request = state.request
        with_logprobs = state.params.logprobs is not None
        # NOTE: positional: keyword arguments made this 3x slower (1 us an output, 1,024 of them a step).
        return RequestOutput(
            request.request_id,
            token_ids,
            state.detokenizer.get_delta(finished),
            finished,
            finish_reason,
            len(request.prompt_token_ids),
            len(request.output_token_ids),
            state.cumulative_logprob if with_logprobs else None,
            logprobs if with_logprobs else None,
            stop_reason,
            error,
        )


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA GPU is available")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return resolved


def _resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
