"""Per-request block tables on top of the BlockPool, with prefix-cache lookups."""

from __future__ import annotations

from dataclasses import dataclass

from .block_pool import BlockPool, KVCacheBlock
from .request import Request


@dataclass
class PrefixCacheStats:
    """Running totals of prefix-cache lookups, in tokens."""

    num_queries: int = 0
    num_queried_tokens: int = 0
    num_hit_tokens: int = 0

    def record(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Add one lookup."""
        self.num_queries += 1
        self.num_queried_tokens += num_queried_tokens
        self.num_hit_tokens += num_hit_tokens

    @property
    def hit_rate(self) -> float:
        """Hit tokens over queried tokens (0.0 before any lookup)."""
        if self.num_queried_tokens == 0:
            return 0.0
        return self.num_hit_tokens / self.num_queried_tokens


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Owns each request's list of KV-cache blocks (its block table)."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool = True, num_host_blocks: int = 0
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be at least 0, got {num_host_blocks}")
        self._block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.stats = PrefixCacheStats()
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # The same tables as block ids, kept beside the blocks: the scheduler hands them to every step.
        self._req_to_block_ids: dict[str, list[int]] = {}
        # How many leading blocks of each request were already offered to the cache map.
        self._num_cached_blocks: dict[str, int] = {}
        # Host (CPU) blocks holding the KV of swapped-out requests: free ids, and each request's table.
        self.num_host_blocks = num_host_blocks
        self._free_host_blocks: list[int] = list(range(num_host_blocks - 1, -1, -1))  # pop(): lowest first
        self._req_to_host_blocks: dict[str, list[int]] = {}

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can be handed out (all but the null block)."""
        return self.block_pool.num_usable_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_cnt 0 (including free blocks that still hold a cached prefix)."""
        return self.block_pool.get_num_free_blocks()

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one request."""
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks in use."""
        return self.block_pool.get_usage()

    def get_computed_blocks(
        self, request: Request, record_stats: bool = True
    ) -> tuple[list[KVCacheBlock], int]:
        """Find the longest cached prefix of `request`.

        Only blocks lying entirely within the first `num_tokens - 1` tokens count: the last token
        must be computed to produce logits. Nothing is touched; pass the blocks to `allocate_slots`.
        A request with `skip_prefix_cache` gets no hit.

        Args:
            request: a request with no computed tokens.
            record_stats: add this lookup to `stats` (the scheduler records only successful admissions).

        Returns:
            (the cached blocks in order, the number of tokens they cover).
        """
        if not self.enable_caching or request.skip_prefix_cache:
            return [], 0
        max_num_hit_blocks = (request.num_tokens - 1) // self._block_size
        computed_blocks = []
        for block_hash in request.block_hashes[:max_num_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            computed_blocks.append(block)
        num_computed_tokens = len(computed_blocks) * self._block_size
        if record_stats:
            self.stats.record(request.num_tokens, num_computed_tokens)
        return computed_blocks, num_computed_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[KVCacheBlock] | None:
        """Make `request` own blocks for its computed tokens, the prefix hit and `num_new_tokens` more.

        Args:
            request: the request; `request.num_computed_tokens` is not changed here.
            num_new_tokens: tokens to be computed this step.
            new_computed_blocks: prefix-hit blocks from `get_computed_blocks` (first schedule only).

        Returns:
            The newly allocated blocks (possibly an empty list), or None when the pool is short;
            then nothing was allocated or touched. Test the result with `is None`.
        """
        req_blocks = self.req_to_blocks.get(request.request_id)
        if req_blocks is not None and not new_computed_blocks:
            # NOTE: the common decode step: the table has room and no block fills up to be cached.
            num_total_tokens = request.num_computed_tokens + num_new_tokens
            if num_total_tokens <= len(req_blocks) * self._block_size and (
                not self.enable_caching
                or num_total_tokens // self._block_size <= self._num_cached_blocks.get(request.request_id, 0)
            ):
                return []
        new_computed_blocks = new_computed_blocks or []
        assert not (new_computed_blocks and req_blocks), "prefix hits are only added to an empty table"
        num_computed_tokens = request.num_computed_tokens + len(new_computed_blocks) * self._block_size
        num_total_tokens = num_computed_tokens + num_new_tokens
        num_required_blocks = _cdiv(num_total_tokens, self._block_size)
        num_new_blocks = max(0, num_required_blocks - len(req_blocks or ()) - len(new_computed_blocks))
        new_blocks: list[KVCacheBlock] = []
        # NOTE: the common decode step (a table that has room, no prefix hit) takes nothing from the pool.
        if req_blocks is None or num_new_blocks or new_computed_blocks:
            # NOTE: touching a cached block with ref_cnt 0 pulls it out of the free queue, so it
            # costs a free block just like a new one.
            num_evictable_computed_blocks = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
            if num_new_blocks + num_evictable_computed_blocks > self.block_pool.get_num_free_blocks():
                return None
            # Touch first, so that get_new_blocks cannot evict the hit blocks.
            self.block_pool.touch(new_computed_blocks)
            req_blocks = self.req_to_blocks.setdefault(request.request_id, [])
            req_blocks.extend(new_computed_blocks)
            new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
            req_blocks.extend(new_blocks)
            block_ids = self._req_to_block_ids.setdefault(request.request_id, [])
            block_ids.extend(block.block_id for block in new_computed_blocks)
            block_ids.extend(block.block_id for block in new_blocks)

        if self.enable_caching:
            # A block is cached as soon as it will be full after this step; its hash exists only
            # if all of its tokens are known (a block the step fills always qualifies).
            num_full_blocks = min(num_total_tokens // self._block_size, len(request.block_hashes))
            num_cached_blocks = self._num_cached_blocks.get(request.request_id, 0)
            if num_full_blocks > num_cached_blocks:
                self.block_pool.cache_full_blocks(
                    req_blocks, request.block_hashes, num_cached_blocks, num_full_blocks
                )
                self._num_cached_blocks[request.request_id] = num_full_blocks
        return new_blocks

    def shared_prompt_blocks(self, request: Request) -> list[KVCacheBlock]:
        """The shared full prompt blocks of the request's ``prompt_group`` (``prompt_group.py``), to be
        passed to ``allocate_slots`` like a prefix hit; empty when there are none yet or the request takes
        no shared KV (``skip_prefix_cache``: it computes its whole prompt)."""
        group = request.prompt_group
        if group is None or group.blocks is None or request.skip_prefix_cache:
            return []
        return group.blocks

    def join_prompt_group(self, request: Request) -> None:
        """After a group member was admitted: it holds the group's blocks if its table starts with them
        (shared, or the same blocks found in the prefix cache)."""
        group = request.prompt_group
        assert group is not None
        if group.blocks is None:
            return
        table = self.req_to_blocks.get(request.request_id, [])
        if len(table) >= len(group.blocks) and all(a is b for a, b in zip(table, group.blocks, strict=False)):
            group.holder_ids.add(request.request_id)

    def plan_prompt_group(self, request: Request) -> None:
        """After a member without shared blocks was planned up to its ``num_computed_tokens``: once they
        cover the shared blocks, its first blocks become the group's (the others may take them in this
        same step: each layer writes the step's K/V before it attends); before that it is the group's
        leader, which the others wait for."""
        group = request.prompt_group
        assert group is not None and group.blocks is None
        request_id = request.request_id
        if request.num_computed_tokens >= group.num_shared_tokens:
            group.blocks = self.req_to_blocks[request_id][: group.num_shared_blocks]
            group.holder_ids = {request_id}
            group.leader_id = None
        elif group.leader_id is None:
            group.leader_id = request_id

    def _leave_prompt_group(self, request: Request) -> None:
        group = request.prompt_group
        assert group is not None
        request_id = request.request_id
        if group.leader_id == request_id:
            group.leader_id = None
        group.holder_ids.discard(request_id)
        if not group.holder_ids:
            group.blocks = None  # NOTE: no member holds them: they may be reused; compute them again

    @property
    def num_free_host_blocks(self) -> int:
        """Host blocks not holding a swapped-out request's KV."""
        return len(self._free_host_blocks)

    def is_swapped(self, request: Request) -> bool:
        """Whether the request's KV is in host blocks (swapped out, waiting to be swapped in)."""
        return request.request_id in self._req_to_host_blocks

    def can_swap_out(self, request: Request) -> bool:
        """Whether the host pool has room for all of the request's blocks (it has some)."""
        num_blocks = len(self.req_to_blocks.get(request.request_id, ()))
        return 0 < num_blocks <= len(self._free_host_blocks)

    def swap_out(self, request: Request) -> list[tuple[int, int]]:
        """Give the request host blocks for its KV and free its device blocks (check ``can_swap_out``).

        Returns:
            ``(device block id, host block id)`` per block of its table, in order: the copies to make
            before any later work reuses the device blocks.
        """
        device_ids = self.get_block_ids(request.request_id)
        host_ids = [self._free_host_blocks.pop() for _ in device_ids]
        pairs = list(zip(device_ids, host_ids, strict=True))
        self.free(request)
        self._req_to_host_blocks[request.request_id] = host_ids
        return pairs

    def swap_in(self, request: Request, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Give a swapped-out request device blocks for its ``num_computed_tokens`` and ``num_new_tokens``
        more, and free its host blocks; None (nothing changed) when the pool is short.

        Returns:
            ``(host block id, device block id)`` per host block, in table order: the copies to make before
            the step's forward.
        """
        host_ids = self._req_to_host_blocks[request.request_id]
        new_blocks = self.allocate_slots(request, num_new_tokens)
        if new_blocks is None:
            return None
        assert len(new_blocks) >= len(host_ids), "a swapped-in table is smaller than its host copy"
        self._release_host_blocks(request.request_id)
        return [(h, b.block_id) for h, b in zip(host_ids, new_blocks, strict=False)]

    def _release_host_blocks(self, request_id: str) -> None:
        host_ids = self._req_to_host_blocks.pop(request_id, None)
        if host_ids is not None:
            self._free_host_blocks.extend(reversed(host_ids))

    def free(self, request: Request) -> None:
        """Release all blocks of `request` (tail first; host blocks of a swapped-out one too) and forget it.
        Unknown requests are ignored."""
        self._release_host_blocks(request.request_id)
        if request.prompt_group is not None:
            self._leave_prompt_group(request)
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        self._req_to_block_ids.pop(request.request_id, None)
        if blocks is None:
            return
        # NOTE: reverse order puts the request's last blocks at the front of the eviction order:
        # later blocks of a prefix are less likely to be shared than earlier ones.
        self.block_pool.free_blocks(reversed(blocks))

    def get_blocks(self, request_id: str) -> list[KVCacheBlock]:
        """The block table of a request (empty if it has none). Do not mutate."""
        return self.req_to_blocks.get(request_id, [])

    def get_block_ids(self, request_id: str) -> list[int]:
        """The block ids of a request's block table (empty if it has none).

        The manager's own list, which grows as the request gets blocks: read it, never mutate it. A list
        handed out stays as it is once the request is freed (a later table is a new list).
        """
        return self._req_to_block_ids.get(request_id, [])

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only works when no request holds blocks. Returns success."""
        return self.block_pool.reset_prefix_cache()
