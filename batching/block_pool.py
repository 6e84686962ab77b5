"""The pool of KV-cache blocks: reference counts, an O(1) free queue and the prefix-cache map.

```
blocks:      [0 null][1][2][3][4][5] ...            block 0 is never handed out
free queue:  head <-> 3 <-> 5 <-> 1 <-> tail        popleft takes 3; freed blocks go to the tail
cache map:   {hash_a: block 5, hash_b: block 2}     block 2 is in use (ref_cnt > 0), 5 is free but cached
```
A freed block keeps its hash and stays in the cache map until it is popped for reuse (lazy
eviction), so a later request with the same prefix can take it back with `touch`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .block_hash import BlockHash, compute_block_hashes, hash_block_tokens

__all__ = [
    "BlockHash",
    "BlockPool",
    "FreeBlockQueue",
    "KVCacheBlock",
    "compute_block_hashes",
    "hash_block_tokens",
]


@dataclass(eq=False, slots=True)
class KVCacheBlock:
    """One block of the paged KV cache, with intrusive links for the free queue."""

    block_id: int
    ref_cnt: int = 0
    # Set while the block is in the cache map (full, and its contents known).
    block_hash: BlockHash | None = None
    prev_free_block: KVCacheBlock | None = field(default=None, repr=False)
    next_free_block: KVCacheBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks threaded through the blocks themselves.

    popleft, append and remove (from anywhere) are O(1), with no allocation. A block is in the queue
    exactly when its links are set.
    """

    def __init__(self, blocks: Sequence[KVCacheBlock]) -> None:
        # NOTE: two sentinel nodes (never handed out) remove every head/tail special case.
        self._head = KVCacheBlock(block_id=-1)
        self._tail = KVCacheBlock(block_id=-1)
        self._head.next_free_block = self._tail
        self._tail.prev_free_block = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        """Remove and return the block at the front (the next to be reused)."""
        if self.num_free_blocks == 0:
            raise ValueError("no free blocks")
        block = self._head.next_free_block
        assert block is not None
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink `block` from wherever it is in the queue."""
        prev_block, next_block = block.prev_free_block, block.next_free_block
        assert prev_block is not None and next_block is not None, f"block {block.block_id} is not free"
        prev_block.next_free_block = next_block
        next_block.prev_free_block = prev_block
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Put `block` at the tail (the last to be reused)."""
        assert block.prev_free_block is None and block.next_free_block is None, (
            f"block {block.block_id} is already free"
        )
        last = self._tail.prev_free_block
        assert last is not None
        last.next_free_block = block
        block.prev_free_block = last
        block.next_free_block = self._tail
        self._tail.prev_free_block = block
        self.num_free_blocks += 1

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """The free blocks from front to tail (O(n); for tests and debugging)."""
        blocks = []
        block = self._head.next_free_block
        while block is not self._tail:
            assert block is not None
            blocks.append(block)
            block = block.next_free_block
        return blocks


class BlockPool:
    """All KV-cache blocks of one cache: allocation, reference counting and the prefix-cache map.

    Invariant: `block.block_hash is not None` exactly when the cache map holds that block under that
    hash. A block with ref_cnt 0 is in the free queue (cached or not); block 0 never is.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(block_id=i) for i in range(num_blocks)]
        # NOTE: block 0 is the null block: padded block-table entries point at it, so it is never
        # handed out. ref_cnt stays 0 and it is never in the free queue.
        self.null_block = self.blocks[0]
        self.free_block_queue = FreeBlockQueue(self.blocks[1:])
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can be handed out (all but the null block)."""
        return self.num_blocks - 1

    def get_num_free_blocks(self) -> int:
        """Blocks with ref_cnt 0, cached or not (a cached free block can still be reused)."""
        return self.free_block_queue.num_free_blocks

    def get_usage(self) -> float:
        """Fraction of the usable blocks in use (ref_cnt > 0)."""
        return (self.num_usable_blocks - self.get_num_free_blocks()) / self.num_usable_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        """The block cached under `block_hash`, or None."""
        return self.cached_block_hash_to_block.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` blocks from the front of the free queue, evicting their cached hashes.

        Raises:
            ValueError: fewer than `num_blocks` blocks are free.
        """
        if num_blocks > self.get_num_free_blocks():
            raise ValueError(f"cannot get {num_blocks} blocks: only {self.get_num_free_blocks()} are free")
        new_blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            assert block.ref_cnt == 0, f"free block {block.block_id} has ref_cnt {block.ref_cnt}"
            self._evict(block)
            block.ref_cnt = 1
            new_blocks.append(block)
        return new_blocks

    def _evict(self, block: KVCacheBlock) -> None:
        """Drop `block` from the cache map (lazy eviction: only when the block is reused)."""
        if block.block_hash is None:
            return
        cached = self.cached_block_hash_to_block.pop(block.block_hash)
        assert cached is block
        block.block_hash = None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling free ones out of the free queue."""
        for block in blocks:
            assert block is not self.null_block
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 go to the free-queue tail in order.

        Callers pass a request's blocks in reverse so that its last blocks (the least likely to be
        shared) are evicted first. Freed blocks keep their hash.
        """
        for block in blocks:
            assert block is not self.null_block
            assert block.ref_cnt > 0, f"block {block.block_id} freed more often than taken"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def cache_full_blocks(
        self,
        blocks: Sequence[KVCacheBlock],
        block_hashes: Sequence[BlockHash],
        num_cached_blocks: int,
        num_full_blocks: int,
    ) -> None:
        """Enter `blocks[num_cached_blocks:num_full_blocks]` into the cache map.

        Args:
            blocks: a request's block table.
            block_hashes: the request's chained block hashes (at least `num_full_blocks` of them).
            num_cached_blocks: blocks of the table already handled by an earlier call.
            num_full_blocks: blocks of the table that are full once the step in flight is done.
        """
        if not self.enable_caching:
            return
        assert num_full_blocks <= len(block_hashes) and num_full_blocks <= len(blocks)
        for i in range(num_cached_blocks, num_full_blocks):
            block, block_hash = blocks[i], block_hashes[i]
            if block.block_hash is not None:
                # A prefix hit: already cached under the same hash.
                assert block.block_hash == block_hash
                continue
            # NOTE: when two requests computed the same block independently, the first one stays
            # the cached copy; the duplicate is left uncached and becomes a plain block when freed.
            if block_hash in self.cached_block_hash_to_block:
                continue
            block.block_hash = block_hash
            self.cached_block_hash_to_block[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only allowed when every block is free; returns whether it reset."""
        if self.get_num_free_blocks() != self.num_usable_blocks:
            return False
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True
