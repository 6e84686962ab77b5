"""The scheduler's configuration and its outputs (re-exported by `scheduler`)."""

from __future__ import annotations

from dataclasses import dataclass, field

# The placeholder a scheduled chunk carries for a token that the step in flight is still sampling.
PENDING_TOKEN_ID = -1


class QueueFullError(Exception):
    """The waiting queue already holds `max_queue_size` requests."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of the scheduler and the size of the KV cache it manages.

    Attributes:
        max_num_seqs: most requests in the running set.
        max_num_batched_tokens: token budget of one step.
        max_model_len: most tokens (prompt + output) a request may reach: a prompt may have at most
            ``max_model_len - 1`` (one must be left to generate), and the cap reaches each request only
            through its ``max_output_tokens`` (set to at most the room its prompt leaves when added).
        block_size: tokens per KV-cache block.
        num_blocks: KV-cache blocks, including the reserved null block 0.
        enable_prefix_caching: reuse cached full blocks across requests.
        enable_chunked_prefill: split prompts that do not fit in the budget over several steps.
        max_queue_size: most requests in the waiting queue (None: unbounded).
        num_host_blocks: host (CPU) blocks for the KV of preempted requests: a preempted request whose
            blocks fit there is swapped out and later back in instead of recomputed (0: always recompute).
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_queue_size: int | None = None
    num_host_blocks: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is reserved), got {self.num_blocks}")
        if self.max_queue_size is not None and self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be at least 1 or None, got {self.max_queue_size}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is disabled"
            )
        # NOTE: a request that cannot fit in the whole pool on its own would be preempted forever.
        max_num_cached_tokens = (self.num_blocks - 1) * self.block_size
        if max_num_cached_tokens < self.max_model_len:
            raise ValueError(
                f"num_blocks ({self.num_blocks}) too small: {self.num_blocks - 1} usable blocks of "
                f"{self.block_size} tokens hold {max_num_cached_tokens} tokens < max_model_len "
                f"({self.max_model_len})"
            )


# NOTE: not frozen (a frozen dataclass sets each field through object.__setattr__: 2.3 instead of 0.5 ms for
# 1,024 decodes a step); nothing changes one after the scheduler made it.
@dataclass(slots=True)
class ScheduledRequest:
    """What the model runner computes for one request in one step.

    Attributes:
        request_id: the request.
        token_ids: the tokens to compute this step (their KV is written, positions start_position...).
        start_position: the request's num_computed_tokens before this step.
        block_ids: the request's whole block table.
        needs_sample: this chunk reaches the request's last token: sample one token.
        last_token_pending: the chunk's last token is the one the step in flight samples (its id is
            not known on the host yet: ``token_ids[-1]`` is ``PENDING_TOKEN_ID``, and the runner takes
            the id from the previous step's sampled tokens on the device).
    """

    request_id: str
    token_ids: list[int]
    start_position: int
    block_ids: list[int]
    needs_sample: bool
    last_token_pending: bool = False

    @property
    def num_tokens(self) -> int:
        """Tokens computed for this request this step."""
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    """One step's plan: the only thing the model runner receives from the scheduler.

    Attributes:
        scheduled: the requests to compute, running ones first, in running order.
        num_batched_tokens: sum of the scheduled token counts.
        swap_out: ``(device block, host block)`` copies of the requests swapped out by this call; the
            device blocks may be handed out in this same step, so they are copied before its forward.
        swap_in: ``(host block, device block)`` copies of the requests swapped back in, before the forward.
    """

    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """Nothing to compute and no KV to copy (a request that preempted itself may leave swap-out
        copies and nothing scheduled)."""
        return not (self.scheduled or self.swap_out or self.swap_in)

    @property
    def num_scheduled_requests(self) -> int:
        """Requests to compute this step (0 is possible with swap-out copies to make)."""
        return len(self.scheduled)


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler for metrics."""

    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_free: int
    num_kv_blocks_total: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    num_preemptions_total: int
    num_swapped_out_total: int = 0  # preemptions that swapped the KV to host blocks (not recomputed)
