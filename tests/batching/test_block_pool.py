"""FreeBlockQueue and BlockPool: exact ids, free-queue order, ref counts and lazy eviction."""

import pytest

from inflight.batching.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock, hash_block_tokens


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]


HA = hash_block_tokens(None, [1, 1])
HB = hash_block_tokens(HA, [2, 2])
HC = hash_block_tokens(HB, [3, 3])


# ---- FreeBlockQueue --------------------------------------------------------------------------------


def test_free_queue_popleft_append_remove_keep_order() -> None:
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert [b.block_id for b in queue.get_all_free_blocks()] == [0, 1, 2, 3, 4]
    assert queue.popleft() is blocks[0]
    assert blocks[0].prev_free_block is None and blocks[0].next_free_block is None
    queue.remove(blocks[2])  # middle
    assert [b.block_id for b in queue.get_all_free_blocks()] == [1, 3, 4]
    queue.append(blocks[0])
    assert [b.block_id for b in queue.get_all_free_blocks()] == [1, 3, 4, 0]
    queue.remove(blocks[1])  # front
    queue.remove(blocks[0])  # tail
    assert [b.block_id for b in queue.get_all_free_blocks()] == [3, 4]
    assert len(queue) == 2 and queue.num_free_blocks == 2
    assert queue.popleft() is blocks[3]
    assert queue.popleft() is blocks[4]
    assert queue.get_all_free_blocks() == []
    with pytest.raises(ValueError):
        queue.popleft()
    queue.append(blocks[2])
    assert queue.popleft() is blocks[2]


def test_free_queue_rejects_double_append_and_removing_a_used_block() -> None:
    blocks = [KVCacheBlock(i) for i in range(2)]
    queue = FreeBlockQueue(blocks)
    with pytest.raises(AssertionError):
        queue.append(blocks[0])
    queue.popleft()
    with pytest.raises(AssertionError):
        queue.remove(blocks[0])


# ---- BlockPool -------------------------------------------------------------------------------------


def test_pool_initial_state_and_null_block_never_handed_out() -> None:
    pool = BlockPool(num_blocks=6, enable_caching=True)
    assert pool.null_block.block_id == 0 and pool.null_block is pool.blocks[0]
    assert free_ids(pool) == [1, 2, 3, 4, 5]
    assert pool.num_usable_blocks == 5 and pool.get_num_free_blocks() == 5
    assert pool.get_usage() == 0.0
    assert [b.block_id for b in pool.get_new_blocks(5)] == [1, 2, 3, 4, 5]
    assert pool.get_usage() == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    assert pool.null_block.ref_cnt == 0


def test_get_new_blocks_pops_front_and_fails_without_side_effects() -> None:
    pool = BlockPool(num_blocks=6, enable_caching=False)
    blocks = pool.get_new_blocks(2)
    assert [b.block_id for b in blocks] == [1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1]
    assert free_ids(pool) == [3, 4, 5]
    assert pool.get_usage() == pytest.approx(0.4)
    with pytest.raises(ValueError):
        pool.get_new_blocks(4)
    assert free_ids(pool) == [3, 4, 5]  # nothing was popped by the failed call
    assert pool.get_new_blocks(0) == []


def test_free_blocks_appends_in_given_order_and_counts_references() -> None:
    pool = BlockPool(num_blocks=6, enable_caching=False)
    b1, b2, b3 = pool.get_new_blocks(3)
    pool.touch([b2])  # a second owner
    assert b2.ref_cnt == 2
    pool.free_blocks([b3, b2, b1])  # a request's blocks, reversed
    assert (b1.ref_cnt, b2.ref_cnt, b3.ref_cnt) == (0, 1, 0)
    assert free_ids(pool) == [4, 5, 3, 1]  # b2 still referenced: not free
    pool.free_blocks([b2])
    assert free_ids(pool) == [4, 5, 3, 1, 2]
    with pytest.raises(AssertionError):
        pool.free_blocks([b2])  # freed more often than taken


def test_lazy_eviction_keeps_hashes_until_reuse_in_free_order() -> None:
    pool = BlockPool(num_blocks=6, enable_caching=True)
    blocks = pool.get_new_blocks(3)  # [1, 2, 3]
    pool.cache_full_blocks(blocks, [HA, HB, HC], num_cached_blocks=0, num_full_blocks=2)
    assert (blocks[0].block_hash, blocks[1].block_hash, blocks[2].block_hash) == (HA, HB, None)
    assert pool.get_cached_block(HC) is None

    pool.free_blocks(reversed(blocks))
    assert free_ids(pool) == [4, 5, 3, 2, 1]
    assert pool.get_cached_block(HA) is blocks[0]  # free but still cached
    assert pool.get_cached_block(HB) is blocks[1]

    assert [b.block_id for b in pool.get_new_blocks(3)] == [4, 5, 3]
    assert pool.get_cached_block(HB) is blocks[1]
    reused = pool.get_new_blocks(1)  # block 2: the request's tail goes first
    assert [b.block_id for b in reused] == [2]
    assert reused[0].block_hash is None and reused[0].ref_cnt == 1
    assert pool.get_cached_block(HB) is None
    assert pool.get_cached_block(HA) is blocks[0]
    assert free_ids(pool) == [1]


def test_touch_takes_a_free_cached_block_out_of_the_middle_of_the_queue() -> None:
    pool = BlockPool(num_blocks=6, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks, [HA, HB, HC], 0, 3)
    pool.free_blocks(reversed(blocks))
    assert free_ids(pool) == [4, 5, 3, 2, 1]
    hit = pool.get_cached_block(HB)
    assert hit is not None and hit.block_id == 2
    pool.touch([hit])
    assert hit.ref_cnt == 1
    assert free_ids(pool) == [4, 5, 3, 1]
    assert pool.get_num_free_blocks() == 4
    pool.touch([hit])  # already in use: only the count changes
    assert hit.ref_cnt == 2 and free_ids(pool) == [4, 5, 3, 1]


def test_duplicate_hash_keeps_the_first_cached_block() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    first = pool.get_new_blocks(1)
    second = pool.get_new_blocks(1)
    pool.cache_full_blocks(first, [HA], 0, 1)
    pool.cache_full_blocks(second, [HA], 0, 1)
    assert pool.get_cached_block(HA) is first[0]
    assert second[0].block_hash is None
    pool.free_blocks(first)
    assert [b.block_id for b in pool.get_new_blocks(2)] == [3, 1]  # evicts HA via block 1
    assert pool.get_cached_block(HA) is None


def test_cache_full_blocks_is_a_no_op_without_caching() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=False)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [HA, HB], 0, 2)
    assert pool.get_cached_block(HA) is None and blocks[0].block_hash is None


def test_reset_prefix_cache_only_when_all_blocks_free() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [HA, HB], 0, 2)
    pool.free_blocks(blocks[1:])
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(HA) is blocks[0] and pool.get_cached_block(HB) is blocks[1]
    pool.free_blocks(blocks[:1])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(HA) is None and pool.get_cached_block(HB) is None
    assert blocks[0].block_hash is None and blocks[1].block_hash is None
    assert free_ids(pool) == [3, 2, 1]


def test_pool_needs_a_usable_block() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(num_blocks=1, enable_caching=True)


def test_pool_of_two_blocks_is_the_smallest_and_the_error_states_the_limit() -> None:
    """num_blocks=2 is the null block plus one usable block: accepted; 1 is refused with the limit."""
    pool = BlockPool(num_blocks=2, enable_caching=True)
    assert free_ids(pool) == [1] and pool.num_usable_blocks == 1
    with pytest.raises(ValueError, match=r"^num_blocks must be at least 2 \(block 0 is reserved\), got 1$"):
        BlockPool(num_blocks=1, enable_caching=True)


def test_get_new_blocks_error_states_the_request_and_the_free_count() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=False)
    with pytest.raises(ValueError, match="^cannot get 4 blocks: only 3 are free$"):
        pool.get_new_blocks(4)


def test_empty_free_queue_lists_nothing_and_popleft_says_why() -> None:
    queue = FreeBlockQueue([])
    assert queue.get_all_free_blocks() == [] and len(queue) == 0
    with pytest.raises(ValueError, match="^no free blocks$"):
        queue.popleft()
    block = KVCacheBlock(7)
    queue.append(block)
    assert queue.get_all_free_blocks() == [block]
    assert queue.popleft() is block


def test_free_queue_rejects_a_block_with_only_one_link() -> None:
    """A block is in a queue exactly when both links are set: append refuses a block with either link
    set, remove a block with either link missing (before it touches any neighbour)."""
    queue = FreeBlockQueue([KVCacheBlock(1)])
    neighbour = KVCacheBlock(9)
    with pytest.raises(AssertionError, match="^block 7 is already free$"):
        queue.append(KVCacheBlock(7, next_free_block=neighbour))
    with pytest.raises(AssertionError, match="^block 8 is not free$"):
        queue.remove(KVCacheBlock(8, prev_free_block=neighbour))
    assert neighbour.prev_free_block is None and neighbour.next_free_block is None
    assert [b.block_id for b in queue.get_all_free_blocks()] == [1]


def test_cache_full_blocks_enters_only_the_blocks_from_num_cached_blocks_on() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks, [HA, HB, HC], num_cached_blocks=1, num_full_blocks=2)
    assert [b.block_hash for b in blocks] == [None, HB, None]
    assert pool.get_cached_block(HA) is None and pool.get_cached_block(HB) is blocks[1]


def test_a_duplicate_block_is_skipped_and_the_blocks_after_it_are_still_cached() -> None:
    pool = BlockPool(num_blocks=5, enable_caching=True)
    first = pool.get_new_blocks(1)
    pool.cache_full_blocks(first, [HA], 0, 1)
    second = pool.get_new_blocks(3)  # computed the first block again, then two new ones
    pool.cache_full_blocks(second, [HA, HB, HC], 0, 3)
    assert pool.get_cached_block(HA) is first[0] and second[0].block_hash is None
    assert pool.get_cached_block(HB) is second[1] and pool.get_cached_block(HC) is second[2]


def test_cache_full_blocks_checks_both_lengths_before_caching_anything() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    blocks = pool.get_new_blocks(1)
    with pytest.raises(AssertionError):
        pool.cache_full_blocks(blocks, [HA, HB], 0, 2)  # two hashes, a table of one block
    assert pool.get_cached_block(HA) is None and blocks[0].block_hash is None
    with pytest.raises(AssertionError):
        pool.cache_full_blocks(pool.get_new_blocks(2), [HA], 0, 2)  # two blocks, one hash
    assert pool.get_cached_block(HA) is None
