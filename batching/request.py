"""A request's token bookkeeping: what the scheduler and the KV-cache manager need, nothing more."""

from __future__ import annotations

import enum

from .block_hash import BlockHash, compute_block_hashes, hash_block_tokens
from .prompt_group import PromptGroup


class RequestStatus(enum.Enum):
    """Where a request is in its life. The FINISHED_* members are terminal."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        """True for the terminal statuses."""
        return self in _FINISHED_STATUSES


_FINISHED_STATUSES = frozenset(
    {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR,
    }
)


class Request:
    """Token bookkeeping of one generation request.

    `num_computed_tokens` counts the tokens whose KV is in the cache or is being written by a step
    in flight. `num_pending_tokens` counts the output tokens that steps in flight are sampling (the
    scheduler plans the next step before the engine has read them: it may compute a pending token's
    KV, the runner taking its id on the device). `block_hashes` holds the chained hashes of the full
    blocks of `all_token_ids` and is extended as output tokens fill blocks.

    `max_output_tokens` is the caller's limit (None: as many as fit) until `Scheduler.add_request`
    admits the request; from then on it is always an int, the most output tokens the request may have:
    the given limit clamped to the room its prompt leaves (``max_model_len - num_prompt_tokens``). The
    sequence cap `max_model_len` is expressed only through it: the scheduler never plans the KV of the
    token that reaches it, and the engine finishes the request when it reads that token.

    `skip_prefix_cache` makes the request take no prefix-cache hits (it computes every token; its own full
    blocks are still cached for others): the engine sets it for a request that wants the log-probabilities
    of its prompt, which come only from computed positions.

    `prompt_group` makes it one of the n sequences of a prompt that share the prompt's full blocks
    (``prompt_group.py``); None for a request of its own.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        block_size: int,
        arrival_index: int = 0,
        max_output_tokens: int | None = None,
        skip_prefix_cache: bool = False,
        prompt_group: PromptGroup | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: prompt_token_ids must not be empty")
        if block_size <= 0:
            raise ValueError(f"request {request_id!r}: block_size must be positive, got {block_size}")
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # NOTE: prompt + output kept as one list that grows with each output token, so reading
        # all_token_ids is O(1) instead of concatenating two lists every step.
        self._all_token_ids: list[int] = list(prompt_token_ids)
        self.block_size = block_size
        self.arrival_index = arrival_index
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.max_output_tokens = max_output_tokens
        self.skip_prefix_cache = skip_prefix_cache
        self.prompt_group = prompt_group
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        # Prefix-cache hit (in tokens) found when the request was first scheduled.
        self.num_cached_tokens: int | None = None
        self.block_hashes: list[BlockHash] = compute_block_hashes(self._all_token_ids, block_size)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens known so far."""
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Number of prompt tokens."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Number of output tokens appended so far."""
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output token ids. This is the request's own list: read it, never mutate it."""
        return self._all_token_ids

    @property
    def is_finished(self) -> bool:
        """True once the request reached a terminal status."""
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        """Append one sampled token (a pending one, if any); extends `block_hashes` when it completes a
        block."""
        if self.num_pending_tokens:
            self.num_pending_tokens -= 1
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        num_full_blocks = len(self._all_token_ids) // self.block_size
        if num_full_blocks > len(self.block_hashes):
            # Exactly one block can become full per appended token.
            parent = self.block_hashes[-1] if self.block_hashes else None
            start = (num_full_blocks - 1) * self.block_size
            self.block_hashes.append(hash_block_tokens(parent, self._all_token_ids[start:]))

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, num_tokens={self.num_tokens}, "
            f"num_computed_tokens={self.num_computed_tokens})"
        )
