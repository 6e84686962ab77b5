"""KVCacheManager: block tables, prefix hits (never covering the last token), atomic allocation."""

import pytest

from inflight.batching import KVCacheManager, Request


def free_ids(manager: KVCacheManager) -> list[int]:
    return [b.block_id for b in manager.block_pool.free_block_queue.get_all_free_blocks()]


def ref_cnts(manager: KVCacheManager, block_ids: list[int]) -> list[int]:
    return [manager.block_pool.blocks[i].ref_cnt for i in block_ids]


def admit(manager: KVCacheManager, req: Request, num_new_tokens: int | None = None) -> int:
    """Look up the prefix, allocate, advance num_computed_tokens (as the scheduler does); returns hit."""
    blocks, num_hit = manager.get_computed_blocks(req)
    num_new = req.num_tokens - num_hit if num_new_tokens is None else num_new_tokens
    assert manager.allocate_slots(req, num_new, blocks) is not None
    req.num_computed_tokens = num_hit + num_new
    return num_hit


def test_first_allocation_caches_only_full_blocks() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=4)
    req = Request("a", list(range(10)), block_size=4)
    blocks, num_hit = manager.get_computed_blocks(req)
    assert (blocks, num_hit) == ([], 0)
    new_blocks = manager.allocate_slots(req, 10)
    assert [b.block_id for b in new_blocks] == [1, 2, 3]
    assert manager.get_block_ids("a") == [1, 2, 3]
    pool = manager.block_pool
    assert pool.blocks[1].block_hash == req.block_hashes[0]
    assert pool.blocks[2].block_hash == req.block_hashes[1]
    assert pool.blocks[3].block_hash is None  # holds tokens 8, 9 only
    assert (manager.num_free_blocks, manager.num_used_blocks, manager.num_usable_blocks) == (6, 3, 9)
    assert manager.usage == 3 / 9
    assert manager.block_size == 4


def test_prefix_hit_shares_blocks_and_counts_references() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=4)
    a = Request("a", list(range(10)), block_size=4)
    admit(manager, a)
    b = Request("b", list(range(8)) + [100, 101, 102], block_size=4)  # 11 tokens, shares 2 blocks
    assert admit(manager, b) == 8
    assert manager.get_block_ids("b") == [1, 2, 4]
    assert ref_cnts(manager, [1, 2, 3, 4]) == [2, 2, 1, 1]
    assert free_ids(manager) == [5, 6, 7, 8, 9]

    manager.free(a)
    assert ref_cnts(manager, [1, 2, 3, 4]) == [1, 1, 0, 1]
    assert free_ids(manager) == [5, 6, 7, 8, 9, 3]
    manager.free(b)
    assert free_ids(manager) == [5, 6, 7, 8, 9, 3, 4, 2, 1]
    assert manager.get_block_ids("a") == [] and manager.get_block_ids("b") == []


def test_a_request_that_skips_the_prefix_cache_gets_no_hit_but_caches_its_blocks() -> None:
    """``Request.skip_prefix_cache`` (the engine's prompt_logprobs): every token is computed, in blocks of
    its own; they are not entered twice, and the copy cached first stays the one others hit."""
    manager = KVCacheManager(num_blocks=10, block_size=4)
    admit(manager, Request("a", list(range(10)), block_size=4))  # blocks 1, 2 cached
    b = Request("b", list(range(10)), block_size=4, skip_prefix_cache=True)
    assert admit(manager, b) == 0
    assert manager.get_block_ids("b") == [4, 5, 6]
    assert ref_cnts(manager, [1, 2]) == [1, 1]
    assert manager.block_pool.blocks[4].block_hash is None  # a duplicate of block 1: left uncached
    c = Request("c", list(range(12)) + [7], block_size=4, skip_prefix_cache=True)
    manager.free(b)
    assert admit(manager, c) == 0
    # Block 3 of c (tokens 8..11) was cached by nobody before: c's copy is, and a plain request hits it.
    blocks, num_hit = manager.get_computed_blocks(Request("d", list(range(12)) + [8], block_size=4))
    assert [b.block_id for b in blocks] == [1, 2, manager.get_block_ids("c")[2]] and num_hit == 12


def test_hit_never_covers_the_last_token() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=4)
    admit(manager, Request("a", list(range(12)), block_size=4))  # blocks 1, 2, 3 all cached
    # A prompt of exactly 2 full blocks hits only 1: its last token must be computed.
    blocks, num_hit = manager.get_computed_blocks(Request("b", list(range(8)), block_size=4))
    assert [b.block_id for b in blocks] == [1] and num_hit == 4
    # One more token and both blocks lie before the last token.
    blocks, num_hit = manager.get_computed_blocks(Request("c", list(range(9)), block_size=4))
    assert [b.block_id for b in blocks] == [1, 2] and num_hit == 8
    # The whole cached prompt again: 3 blocks cached, only 2 usable.
    blocks, num_hit = manager.get_computed_blocks(Request("d", list(range(12)), block_size=4))
    assert [b.block_id for b in blocks] == [1, 2] and num_hit == 8
    # A one-token prompt never hits.
    assert manager.get_computed_blocks(Request("e", [0], block_size=4)) == ([], 0)
    # A miss in the middle stops the run.
    blocks, num_hit = manager.get_computed_blocks(Request("f", [0, 1, 2, 3, 9, 9, 9, 9, 8, 9], 4))
    assert [b.block_id for b in blocks] == [1] and num_hit == 4

    stats = manager.stats
    assert stats.num_queries == 6  # a + b..f
    assert stats.num_queried_tokens == 12 + 8 + 9 + 12 + 1 + 10
    assert stats.num_hit_tokens == 4 + 8 + 8 + 4
    assert stats.hit_rate == 24 / 52


def test_allocation_counts_touched_free_blocks_and_is_atomic() -> None:
    manager = KVCacheManager(num_blocks=5, block_size=4)  # usable blocks 1..4
    a = Request("a", list(range(8)), block_size=4)
    admit(manager, a)
    assert manager.get_block_ids("a") == [1, 2]
    manager.free(a)
    assert free_ids(manager) == [3, 4, 2, 1]

    # 17 tokens = 5 blocks: 2 hits (both free, so touching them uses 2 free blocks) + 3 new > 4.
    big = Request("big", list(range(8)) + [50] * 9, block_size=4)
    blocks, num_hit = manager.get_computed_blocks(big)
    assert [b.block_id for b in blocks] == [1, 2] and num_hit == 8
    assert manager.allocate_slots(big, 9, blocks) is None
    assert free_ids(manager) == [3, 4, 2, 1]
    assert ref_cnts(manager, [1, 2, 3, 4]) == [0, 0, 0, 0]
    assert manager.get_block_ids("big") == []

    # 15 tokens = 4 blocks: 2 touched + 2 new fits exactly; touching first protects the hits.
    fits = Request("fits", list(range(8)) + [50] * 7, block_size=4)
    blocks, num_hit = manager.get_computed_blocks(fits)
    new_blocks = manager.allocate_slots(fits, 7, blocks)
    assert [b.block_id for b in new_blocks] == [3, 4]
    assert manager.get_block_ids("fits") == [1, 2, 3, 4]
    assert manager.block_pool.get_cached_block(a.block_hashes[1]).block_id == 2
    assert manager.num_free_blocks == 0


def test_lazy_eviction_evicts_the_tail_of_a_freed_request_first() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=4)
    a = Request("a", list(range(12)), block_size=4)
    admit(manager, a)
    manager.free(a)
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 3, 2, 1]
    probe = Request("probe", list(range(13)), block_size=4)  # may hit all 3 blocks
    assert manager.get_computed_blocks(probe)[1] == 12

    filler = Request("filler", [77] * 28, block_size=4)  # 7 blocks: 4..9 then 3
    admit(manager, filler)
    assert manager.get_block_ids("filler") == [4, 5, 6, 7, 8, 9, 3]
    blocks, num_hit = manager.get_computed_blocks(probe)
    assert [b.block_id for b in blocks] == [1, 2] and num_hit == 8


def test_blocks_are_cached_when_the_step_fills_them() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=4)
    pool = manager.block_pool
    req = Request("r", list(range(10)), block_size=4)
    assert [b.block_id for b in manager.allocate_slots(req, 5)] == [1, 2]  # chunk: tokens 0..4
    req.num_computed_tokens = 5
    assert pool.blocks[1].block_hash == req.block_hashes[0]
    assert pool.blocks[2].block_hash is None  # its hash is known but the block is not computed yet
    assert [b.block_id for b in manager.allocate_slots(req, 5)] == [3]  # tokens 5..9
    req.num_computed_tokens = 10
    assert pool.blocks[2].block_hash == req.block_hashes[1]
    assert pool.blocks[3].block_hash is None

    req.append_output_token(10)  # 11 tokens
    assert manager.allocate_slots(req, 1) == []  # empty list, not None: success
    req.num_computed_tokens = 11
    assert pool.blocks[3].block_hash is None
    req.append_output_token(11)  # 12 tokens: block 3 full, hash known
    assert manager.allocate_slots(req, 1) == []
    req.num_computed_tokens = 12
    assert pool.blocks[3].block_hash == req.block_hashes[2]
    req.append_output_token(12)
    assert [b.block_id for b in manager.allocate_slots(req, 1)] == [4]
    assert manager.get_block_ids("r") == [1, 2, 3, 4]


def test_caching_disabled_never_hits_or_hashes_blocks() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=4, enable_caching=False)
    admit(manager, Request("a", list(range(12)), block_size=4))
    b = Request("b", list(range(12)), block_size=4)
    assert manager.get_computed_blocks(b) == ([], 0)
    admit(manager, b)
    assert manager.get_block_ids("b") == [4, 5, 6]
    assert all(block.block_hash is None for block in manager.block_pool.blocks)
    assert manager.stats.num_queries == 0 and manager.stats.hit_rate == 0.0


def test_free_is_idempotent_and_ignores_unknown_requests() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=2)
    req = Request("a", [1, 2, 3], block_size=2)
    admit(manager, req)
    manager.free(req)
    manager.free(req)
    manager.free(Request("never-seen", [1], block_size=2))
    assert free_ids(manager) == [3, 2, 1]
    assert ref_cnts(manager, [1, 2, 3]) == [0, 0, 0]


def test_reset_prefix_cache_through_the_manager() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=2)
    req = Request("a", [1, 2, 3], block_size=2)
    admit(manager, req)
    assert manager.reset_prefix_cache() is False
    manager.free(req)
    assert manager.reset_prefix_cache() is True
    assert manager.get_computed_blocks(Request("b", [1, 2, 3], block_size=2)) == ([], 0)


def test_manager_validation_messages_and_host_pool_defaults() -> None:
    with pytest.raises(ValueError, match="^block_size must be positive, got 0$"):
        KVCacheManager(num_blocks=4, block_size=0)
    with pytest.raises(ValueError, match="^num_host_blocks must be at least 0, got -1$"):
        KVCacheManager(num_blocks=4, block_size=2, num_host_blocks=-1)
    manager = KVCacheManager(num_blocks=4, block_size=2)  # no host pool unless asked for
    assert manager.num_host_blocks == 0 and manager.num_free_host_blocks == 0
    manager = KVCacheManager(num_blocks=4, block_size=2, num_host_blocks=3)
    assert manager.num_host_blocks == 3 and manager.num_free_host_blocks == 3


def test_unknown_request_has_an_empty_table_and_nothing_to_swap_out() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=2)
    req = Request("r", [1, 2, 3], block_size=2)
    assert manager.get_blocks("r") == [] and manager.get_block_ids("r") == []
    assert not manager.can_swap_out(req)  # no host blocks, and no blocks to move


def test_swap_out_and_in_move_whole_tables_with_exact_block_ids() -> None:
    manager = KVCacheManager(num_blocks=7, block_size=4, num_host_blocks=3)  # device 1..6, host 0..2
    a = Request("a", list(range(6)), block_size=4)  # 2 blocks
    b = Request("b", list(range(100, 109)), block_size=4)  # 3 blocks
    assert not manager.can_swap_out(a)  # no blocks yet: nothing to swap
    admit(manager, a)
    admit(manager, b)
    assert manager.get_block_ids("a") == [1, 2] and manager.get_block_ids("b") == [3, 4, 5]
    assert manager.can_swap_out(a) and manager.can_swap_out(b)  # 2 and 3 blocks, 3 host blocks free

    assert manager.swap_out(a) == [(1, 0), (2, 1)]  # host blocks lowest first
    assert manager.is_swapped(a) and manager.num_free_host_blocks == 1
    assert manager.get_block_ids("a") == [] and free_ids(manager) == [6, 2, 1]
    assert not manager.can_swap_out(b)  # 3 blocks, 1 host block left

    # Back in with one more token: 7 tokens, 2 blocks, taken from the front of the free queue.
    assert manager.swap_in(a, 1) == [(0, 6), (1, 2)]
    assert not manager.is_swapped(a) and manager.num_free_host_blocks == 3
    assert manager.get_block_ids("a") == [6, 2] and free_ids(manager) == [1]


def test_a_block_filled_after_a_chunk_without_full_blocks_is_cached() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=4)
    req = Request("r", list(range(10)), block_size=4)
    assert [b.block_id for b in manager.allocate_slots(req, 3)] == [1]  # tokens 0..2: nothing full
    req.num_computed_tokens = 3
    assert manager.block_pool.get_cached_block(req.block_hashes[0]) is None
    assert manager.allocate_slots(req, 1) == []  # token 3 fills block 1, which the table has
    req.num_computed_tokens = 4
    assert manager.block_pool.get_cached_block(req.block_hashes[0]) is manager.block_pool.blocks[1]


def test_prefix_hits_are_refused_for_a_request_that_already_has_blocks() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=4)
    admit(manager, Request("a", list(range(8)), block_size=4))  # blocks 1, 2 cached
    b = Request("b", list(range(9)), block_size=4)
    hits, num_hit = manager.get_computed_blocks(b)
    assert [block.block_id for block in hits] == [1, 2] and num_hit == 8
    assert [block.block_id for block in manager.allocate_slots(b, 2)] == [3]  # computed without the hits
    b.num_computed_tokens = 2
    with pytest.raises(AssertionError, match="^prefix hits are only added to an empty table$"):
        manager.allocate_slots(b, 1, hits)
    assert manager.get_block_ids("b") == [3] and ref_cnts(manager, [1, 2, 3]) == [1, 1, 1]


def test_block_id_list_handed_out_after_a_zero_token_allocation_grows_with_the_table() -> None:
    """get_block_ids returns the manager's own list, which grows as the request gets blocks."""
    manager = KVCacheManager(num_blocks=6, block_size=4)
    req = Request("r", list(range(6)), block_size=4)
    assert manager.allocate_slots(req, 0) == []
    block_ids = manager.get_block_ids("r")
    assert block_ids == [] and free_ids(manager) == [1, 2, 3, 4, 5]
    assert [b.block_id for b in manager.allocate_slots(req, 6)] == [1, 2]
    assert block_ids == [1, 2] and manager.get_block_ids("r") is block_ids


def test_a_duplicate_block_stays_uncached_after_the_cached_copy_is_evicted() -> None:
    """Blocks are offered to the cache map once, when they fill: b's copy of a's first block is a duplicate
    then and stays a plain block, even once a's copy is evicted by b's own later chunks."""
    manager = KVCacheManager(num_blocks=4, block_size=4)  # usable blocks 1..3
    pool = manager.block_pool
    a = Request("a", [0, 1, 2, 3, 9], block_size=4)
    assert [block.block_id for block in manager.allocate_slots(a, 5)] == [1, 2]
    b = Request("b", [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 14], block_size=4)
    assert [block.block_id for block in manager.allocate_slots(b, 4)] == [3]  # no lookup: a duplicate
    b.num_computed_tokens = 4
    assert pool.get_cached_block(b.block_hashes[0]) is pool.blocks[1] and pool.blocks[3].block_hash is None
    manager.free(a)
    assert free_ids(manager) == [2, 1]
    assert [block.block_id for block in manager.allocate_slots(b, 4)] == [2]
    b.num_computed_tokens = 8
    assert [block.block_id for block in manager.allocate_slots(b, 4)] == [1]  # evicts a's cached block
    b.num_computed_tokens = 12
    assert pool.get_cached_block(b.block_hashes[0]) is None and pool.blocks[3].block_hash is None
    assert pool.get_cached_block(b.block_hashes[1]) is pool.blocks[2]
    assert pool.get_cached_block(b.block_hashes[2]) is pool.blocks[1]
    assert manager.get_computed_blocks(Request("c", [0, 1, 2, 3, 4], block_size=4)) == ([], 0)
