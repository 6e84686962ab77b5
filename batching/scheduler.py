"""Token-budget scheduler with chunked prefill, prefix caching and recompute preemption.

Each step hands out `max_num_batched_tokens`: running requests first (arrival order), then waiting
ones (FIFO; preempted requests are at the front). A request gets its uncomputed tokens capped by the
budget, so a decode is a request with one uncomputed token and a long prompt spreads over steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .kv_cache_manager import KVCacheManager
from .request import Request, RequestStatus
from .scheduler_types import (
    PENDING_TOKEN_ID,
    QueueFullError,
    ScheduledRequest,
    SchedulerConfig,
    SchedulerOutput,
    SchedulerStats,
)

__all__ = [
    "PENDING_TOKEN_ID",
    "QueueFullError",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
]


class Scheduler:
    """Decides, step by step, which tokens of which requests to compute."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv_cache_manager = KVCacheManager(
            num_blocks=config.num_blocks,
            block_size=config.block_size,
            enable_caching=config.enable_prefix_caching,
            num_host_blocks=config.num_host_blocks,
        )
        self.requests: dict[str, Request] = {}  # unfinished requests only
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions_total = 0
        self.num_swapped_out_total = 0

    # ---- requests in and out -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request at the back of the waiting queue and set its `max_output_tokens` to the
        room its prompt leaves (``max_model_len - num_prompt_tokens``), or to the given limit if smaller.

        Raises:
            QueueFullError: the waiting queue holds `max_queue_size` requests (or more: preempted
                requests return to the queue regardless of the limit).
            ValueError: the request is not new, its id is in use, its block size differs, its prompt
                leaves no room to generate (it has `max_model_len` tokens or more), or its
                `max_output_tokens` is below 1.
        """
        max_queue_size = self.config.max_queue_size
        if max_queue_size is not None and len(self.waiting) >= max_queue_size:
            raise QueueFullError(f"waiting queue is full (max_queue_size={max_queue_size})")
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if request.status != RequestStatus.WAITING or request.num_computed_tokens != 0:
            raise ValueError(f"request {request.request_id!r} was already scheduled")
        if request.block_size != self.config.block_size:
            raise ValueError(
                f"request {request.request_id!r}: block_size {request.block_size} != "
                f"scheduler block_size {self.config.block_size}"
            )
        max_model_len = self.config.max_model_len
        if request.num_tokens >= max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: prompt_token_ids has {request.num_tokens} tokens, but "
                f"max_model_len is {max_model_len}: a prompt may have at most {max_model_len - 1} tokens "
                "(one must be left to generate)"
            )
        given = request.max_output_tokens
        if given is not None and given < 1:
            raise ValueError(
                f"request {request.request_id!r}: max_output_tokens must be at least 1, got {given}"
            )
        room = max_model_len - request.num_prompt_tokens
        request.max_output_tokens = room if given is None else min(given, room)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish (stop, abort, ...) waiting or running requests and free their blocks.

        Unknown or already finished ids are ignored.
        """
        if not status.is_finished:
            raise ValueError(f"status must be a FINISHED_* status, got {status.name}")
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self.kv_cache_manager.free(request)
            request.status = status

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self.requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        """Requests in the running set."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Requests in the waiting queue (new and preempted)."""
        return len(self.waiting)

    # ---- scheduling ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan one step and advance each scheduled request's `num_computed_tokens`."""
        config = self.config
        budget = config.max_num_batched_tokens
        chunked = config.enable_chunked_prefill
        kv = self.kv_cache_manager
        running = self.running
        scheduled: list[ScheduledRequest] = []
        preempted = False
        swap_out: list[tuple[int, int]] = []
        swap_in: list[tuple[int, int]] = []

        # 1. Running requests, oldest first.
        # NOTE: each is planned at once: a preemption only ever takes requests behind it in the list.
        req_index = 0
        while req_index < len(running) and budget > 0:
            request = running[req_index]
            num_uncomputed = self._num_schedulable(request) - request.num_computed_tokens
            # NOTE: nothing to compute means its last token is being sampled by the step in flight (and,
            # with that token pending, it is either the request's last one or its KV is computed).
            if num_uncomputed <= 0 or (not chunked and num_uncomputed > budget):
                req_index += 1
                continue
            num_new_tokens = min(num_uncomputed, budget)
            while kv.allocate_slots(request, num_new_tokens) is None:
                # NOTE: the newest request is always behind `request` in the running list, so it
                # has not been scheduled this step; preempting it drops no planned work.
                victim = running.pop()
                swap_out += self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break  # `request` preempted itself: nothing left to take blocks from
            scheduled.append(self._plan(request, request.num_computed_tokens, num_new_tokens))
            budget -= num_new_tokens
            req_index += 1

        # 2. Waiting requests, FIFO. NOTE: none in a step that preempted: the pool is short, and
        # admitting would just preempt again next step.
        while not preempted and self.waiting and budget > 0 and len(running) < config.max_num_seqs:
            request = self.waiting[0]
            if request.num_pending_tokens:
                break  # preempted while its token was sampled: re-admitted once the token is known
            if kv.is_swapped(request):
                # Its KV comes back from host blocks; it goes on from where it was.
                start = request.num_computed_tokens
                num_new_tokens = min(self._num_schedulable(request) - start, budget)
                assert num_new_tokens > 0, f"{request!r}: swapped out with nothing left to compute"
                copies = kv.swap_in(request, num_new_tokens)
                if copies is None:
                    break
                swap_in += copies
            else:
                assert request.num_computed_tokens == 0
                group = request.prompt_group
                if group is not None and group.leader_id not in (None, request.request_id):
                    if not request.skip_prefix_cache:
                        break  # NOTE: another sequence of its prompt computes the shared blocks: wait, share
                computed_blocks, num_hit_tokens = kv.get_computed_blocks(request, record_stats=False)
                # NOTE: the prompt's blocks, held by another of its sequences; on a tie too: a prefix-cache
                # copy of them as long (left when a swapped-in sequence's private blocks became the group's)
                # may be free, each of its blocks then costing a free block the shared ones do not.
                if group is not None and len(shared := kv.shared_prompt_blocks(request)) >= len(
                    computed_blocks
                ):
                    computed_blocks = shared
                start = len(computed_blocks) * config.block_size  # the hits are computed already
                # NOTE: all its known tokens: fewer than max_output_tokens are outputs (the engine finishes
                # a request when it reads the token that reaches the limit), so its last token is not one.
                num_new_tokens = request.num_tokens - start
                if not chunked and num_new_tokens > budget:
                    break
                num_new_tokens = min(num_new_tokens, budget)
                if kv.allocate_slots(request, num_new_tokens, computed_blocks) is None:
                    break
                # NOTE: stats count admissions only, so a request that waits for blocks over several
                # steps is not counted once per attempt.
                kv.stats.record(request.num_tokens, num_hit_tokens)
                if request.num_cached_tokens is None:
                    request.num_cached_tokens = num_hit_tokens
            if request.prompt_group is not None:
                kv.join_prompt_group(request)
            self.waiting.popleft()
            running.append(request)
            request.status = RequestStatus.RUNNING
            scheduled.append(self._plan(request, start, num_new_tokens))
            budget -= num_new_tokens

        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=config.max_num_batched_tokens - budget,
            swap_out=swap_out,
            swap_in=swap_in,
        )

    def _plan(self, request: Request, start: int, num_new_tokens: int) -> ScheduledRequest:
        """Compute tokens ``start .. start + num_new_tokens - 1`` of ``request`` this step (its blocks are
        allocated): advances its ``num_computed_tokens`` and, if the chunk ends its tokens, its pending
        count."""
        end = start + num_new_tokens
        request.num_computed_tokens = end
        if request.prompt_group is not None and request.prompt_group.blocks is None:
            self.kv_cache_manager.plan_prompt_group(request)
        all_token_ids = request.all_token_ids
        num_known = len(all_token_ids)
        token_ids = all_token_ids[start:end]
        # NOTE: at most one token can be pending when a step is planned, and only as the chunk's last.
        pending = end > num_known
        if pending:
            assert end == num_known + 1, f"{request!r}: {end - num_known} pending tokens in one chunk"
            token_ids.append(PENDING_TOKEN_ID)
        needs_sample = end == num_known + request.num_pending_tokens
        if needs_sample:
            request.num_pending_tokens += 1
        return ScheduledRequest(
            request.request_id,
            token_ids,
            start,
            self.kv_cache_manager.get_block_ids(request.request_id),
            needs_sample,
            pending,
        )

    def _num_schedulable(self, request: Request) -> int:
        """How far a running request may be computed: its known tokens and its first pending token (the
        runner takes that id from the step just before this one), but never the request's last token,
        the one that reaches ``max_output_tokens`` (its KV is never needed: the engine finishes the
        request when it reads that token). A prompt is always whole: ``max_output_tokens`` >= 1."""
        num_tokens = len(request.all_token_ids) + (1 if request.num_pending_tokens else 0)
        return min(num_tokens, request.num_prompt_tokens + request.max_output_tokens - 1)

    def _preempt(self, request: Request) -> list[tuple[int, int]]:
        """Free a running request's device blocks and put it at the front of the waiting queue: its KV
        swapped out to host blocks if they have room (it resumes where it was), else to be recomputed.
        Returns the swap-out copies (see ``SchedulerOutput.swap_out``), none when it is recomputed."""
        kv = self.kv_cache_manager
        copies: list[tuple[int, int]] = []
        if kv.can_swap_out(request):
            copies = kv.swap_out(request)
            self.num_swapped_out_total += 1
        else:
            kv.free(request)
            request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)
        return copies

    def append_sampled_tokens(self, request_ids: list[str], token_ids: list[int]) -> None:
        """Append a step's sampled tokens: ``token_ids[i]`` to request ``request_ids[i]`` (a step's
        `needs_sample` requests in order). Ids no longer live (finished or aborted while the step ran)
        are skipped. Nothing is finished here: the engine ends a request whose output count reaches its
        `max_output_tokens` (the scheduler never plans past it).

        Raises:
            ValueError: the two lists differ in length.
        """
        requests = self.requests
        for request_id, token_id in zip(request_ids, token_ids, strict=True):
            request = requests.get(request_id)
            if request is not None:
                request.append_output_token(token_id)

    # ---- stats ---------------------------------------------------------------------------------

    def get_stats(self) -> SchedulerStats:
        """A snapshot of queue sizes, KV-cache usage, prefix-cache hit rate and preemptions."""
        kv = self.kv_cache_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_kv_blocks_used=kv.num_used_blocks,
            num_kv_blocks_free=kv.num_free_blocks,
            num_kv_blocks_total=kv.num_usable_blocks,
            kv_cache_usage=kv.usage,
            prefix_cache_hit_rate=kv.stats.hit_rate,
            num_preemptions_total=self.num_preemptions_total,
            num_swapped_out_total=self.num_swapped_out_total,
        )

    @property
    def stats(self) -> SchedulerStats:
        """Same as `get_stats()`."""
        return self.get_stats()
