"""Preemption: newest first, back to the front of the queue, recompute of prompt + outputs."""

from inflight.batching import Request, RequestStatus, ScheduledRequest, Scheduler, SchedulerConfig

from .test_scheduler import sample


def make_scheduler(
    enable_prefix_caching: bool = False, max_num_seqs: int = 8, num_host_blocks: int = 0
) -> Scheduler:
    """4 usable blocks of 4 tokens: room for exactly 16 tokens."""
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=64,
            max_model_len=16,
            block_size=4,
            num_blocks=5,
            enable_prefix_caching=enable_prefix_caching,
            num_host_blocks=num_host_blocks,
        )
    )


def free_ids(sched: Scheduler) -> list[int]:
    return [b.block_id for b in sched.kv_cache_manager.block_pool.free_block_queue.get_all_free_blocks()]


def test_newest_running_request_is_preempted_and_recomputed_first() -> None:
    sched = make_scheduler()
    a, b, c = (
        Request(rid, list(range(base, base + 4)), 4) for rid, base in (("a", 10), ("b", 20), ("c", 30))
    )
    for req in (a, b, c):
        sched.add_request(req)
    out1 = sched.schedule()
    assert [s.block_ids for s in out1.scheduled] == [[1], [2], [3]]
    assert free_ids(sched) == [4]
    sample(sched, out1, {"a": 14, "b": 24, "c": 34})

    # a takes the last free block; b needs one too, so c (the newest) is preempted.
    out2 = sched.schedule()
    assert out2.scheduled == [
        ScheduledRequest("a", [14], 4, [1, 4], True),
        ScheduledRequest("b", [24], 4, [2, 3], True),
    ]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and sched.num_preemptions_total == 1
    assert sched.kv_cache_manager.get_block_ids("c") == []
    assert list(sched.waiting) == [c] and sched.running == [a, b]
    sample(sched, out2, {"a": 15, "b": 25})

    out3 = sched.schedule()  # c needs 2 blocks for its 5 tokens; none are free
    assert [s.request_id for s in out3.scheduled] == ["a", "b"] and sched.running == [a, b]
    assert c.status == RequestStatus.PREEMPTED
    sched.finish_requests("a", RequestStatus.FINISHED_STOPPED)
    assert free_ids(sched) == [4, 1]
    sample(sched, out3, {"a": 16, "b": 26})  # a's late token is dropped
    assert a.output_token_ids == [14, 15]

    out4 = sched.schedule()
    assert out4.scheduled == [
        ScheduledRequest("b", [26], 6, [2, 3], True),
        ScheduledRequest("c", [30, 31, 32, 33, 34], 0, [4, 1], True),  # prompt + its output
    ]
    assert sched.get_request("a") is None and a.status == RequestStatus.FINISHED_STOPPED
    assert c.status == RequestStatus.RUNNING and c.num_computed_tokens == 5
    assert sched.running == [b, c]


def test_several_preemptions_in_one_step_newest_first_and_queue_order() -> None:
    sched = make_scheduler(max_num_seqs=4)
    reqs = {rid: Request(rid, [i] * 4, 4) for i, rid in enumerate("abcd")}
    for req in reqs.values():
        sched.add_request(req)
    e = Request("e", [9, 9], 4)
    sched.add_request(e)
    out1 = sched.schedule()
    assert [s.block_ids for s in out1.scheduled] == [[1], [2], [3], [4]]
    assert list(sched.waiting) == [e]  # max_num_seqs
    sample(sched, out1, {rid: 100 + i for i, rid in enumerate("abcd")})

    out2 = sched.schedule()
    assert out2.scheduled == [
        ScheduledRequest("a", [100], 4, [1, 4], True),
        ScheduledRequest("b", [101], 4, [2, 3], True),
    ]
    assert reqs["c"].status == reqs["d"].status == RequestStatus.PREEMPTED
    # The older preempted request goes in front; both before the request that was already waiting.
    assert [r.request_id for r in sched.waiting] == ["c", "d", "e"]
    assert sched.running == [reqs["a"], reqs["b"]]
    assert sched.num_preemptions_total == 2

    sample(sched, out2, {"a": 1, "b": 2})
    sched.finish_requests(["a", "b"], RequestStatus.FINISHED_STOPPED)
    assert free_ids(sched) == [4, 1, 3, 2]
    out3 = sched.schedule()
    assert out3.scheduled == [
        ScheduledRequest("c", [2, 2, 2, 2, 102], 0, [4, 1], True),
        ScheduledRequest("d", [3, 3, 3, 3, 103], 0, [3, 2], True),
    ]
    assert sched.running == [reqs["c"], reqs["d"]] and sched.requests.keys() == {"c", "d", "e"}
    assert [r.request_id for r in sched.waiting] == ["e"]  # needs 1 block, none left


def test_request_that_must_preempt_itself_stops_the_step() -> None:
    sched = make_scheduler()
    a, b = Request("a", list(range(6)), 4), Request("b", list(range(10, 18)), 4)
    sched.add_request(a)
    sched.add_request(b)
    out1 = sched.schedule()
    assert [s.block_ids for s in out1.scheduled] == [[1, 2], [3, 4]]
    sample(sched, out1, {"a": 6, "b": 18})
    out2 = sched.schedule()  # a fits in its blocks; b (the newest) needs a 3rd block
    assert out2.scheduled == [ScheduledRequest("a", [6], 6, [1, 2], True)]
    assert b.status == RequestStatus.PREEMPTED
    assert list(sched.waiting) == [b] and b.num_computed_tokens == 0
    assert free_ids(sched) == [4, 3]


def test_preempted_request_hits_its_own_surviving_cached_blocks() -> None:
    sched = make_scheduler(enable_prefix_caching=True)
    a, b = Request("a", list(range(100, 108)), 4), Request("b", list(range(200, 208)), 4)
    sched.add_request(a)
    sched.add_request(b)
    out1 = sched.schedule()
    assert [s.block_ids for s in out1.scheduled] == [[1, 2], [3, 4]]
    sample(sched, out1, {"a": 108, "b": 208})

    out2 = sched.schedule()  # b's blocks go back reversed (4, 3); a reuses 4, evicting b's block 1
    assert out2.scheduled == [ScheduledRequest("a", [108], 8, [1, 2, 4], True)]
    assert b.status == RequestStatus.PREEMPTED and list(sched.waiting) == [b]
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_cached_block(b.block_hashes[0]) is pool.blocks[3]
    assert pool.get_cached_block(b.block_hashes[1]) is None

    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert free_ids(sched) == [3, 4, 2, 1]
    out3 = sched.schedule()
    # 9 tokens may hit 2 blocks, but only b's first survived: recompute from position 4.
    assert out3.scheduled == [ScheduledRequest("b", [204, 205, 206, 207, 208], 4, [3, 4, 2], True)]
    assert b.num_cached_tokens == 0  # the hit at its first schedule
    assert b.num_preemptions == 1
    assert pool.get_cached_block(a.block_hashes[0]) is pool.blocks[1]
    assert pool.get_cached_block(a.block_hashes[1]) is None  # block 2 was reused by b
    assert pool.blocks[4].block_hash == b.block_hashes[1]
    stats = sched.kv_cache_manager.stats
    assert (stats.num_queried_tokens, stats.num_hit_tokens) == (8 + 8 + 9, 4)
    assert sched.get_stats().num_preemptions_total == 1


def test_no_request_is_admitted_in_a_step_that_preempted() -> None:
    sched = Scheduler(
        SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=8,
            max_model_len=16,
            block_size=4,
            num_blocks=5,
            enable_prefix_caching=False,
        )
    )
    a, b = Request("a", [1, 2, 3, 4], 4), Request("b", list(range(100, 112)), 4)
    sched.add_request(a)
    sched.add_request(b)
    out1 = sched.schedule()
    assert [(s.request_id, len(s.token_ids), s.block_ids) for s in out1.scheduled] == [
        ("a", 4, [1]),
        ("b", 4, [2]),
    ]
    sample(sched, out1, {"a": 40})

    # a's decode takes block 3; b's next chunk (7 tokens) needs two more blocks, one is free: b (the newest)
    # is preempted. Blocks 4, 2 and 7 tokens of budget are then left, enough for a chunk of b, but a step
    # that preempted admits nobody.
    out2 = sched.schedule()
    assert out2.scheduled == [ScheduledRequest("a", [40], 4, [1, 3], True)]
    assert b.status == RequestStatus.PREEMPTED and sorted(free_ids(sched)) == [2, 4]
    sample(sched, out2, {"a": 41})
    out3 = sched.schedule()
    assert out3.scheduled == [
        ScheduledRequest("a", [41], 5, [1, 3], True),
        ScheduledRequest("b", list(range(100, 107)), 0, [4, 2], False),
    ]


def test_a_victim_that_fits_in_host_blocks_is_swapped_out_and_back_in() -> None:
    sched = make_scheduler(num_host_blocks=2)
    kv = sched.kv_cache_manager
    a, b, c = (
        Request(rid, list(range(base, base + 4)), 4) for rid, base in (("a", 10), ("b", 20), ("c", 30))
    )
    for req in (a, b, c):
        sched.add_request(req)
    out1 = sched.schedule()
    assert out1.swap_out == [] and out1.swap_in == []
    sample(sched, out1, {"a": 14, "b": 24, "c": 34})

    # As in the recompute case c is the victim, but its one block goes to host block 0: c keeps its 4
    # computed tokens, and device block 3 is handed to b in the same step (copied out before the forward).
    out2 = sched.schedule()
    assert list(sched.waiting) == [c] and out2.swap_out == [(3, 0)]
    assert [s.block_ids for s in out2.scheduled] == [[1, 4], [2, 3]]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 4 and kv.is_swapped(c)
    assert kv.get_block_ids("c") == [] and kv.num_free_host_blocks == 1
    assert sched.num_swapped_out_total == 1 and sched.num_preemptions_total == 1
    sample(sched, out2, {"a": 15, "b": 25})

    # a ends: its 2 blocks come free, and c comes back into them: host block 0 into the first of its new
    # blocks; it goes on with its output token (not its prompt again).
    sched.finish_requests("a", RequestStatus.FINISHED_STOPPED)
    out3 = sched.schedule()
    assert out3.swap_in == [(0, 4)] and out3.swap_out == []
    assert out3.scheduled == [
        ScheduledRequest("b", [25], 5, [2, 3], True),
        ScheduledRequest("c", [34], 4, [4, 1], True),
    ]
    assert not kv.is_swapped(c) and kv.num_free_host_blocks == 2
    assert c.status == RequestStatus.RUNNING and c.num_computed_tokens == 5


def test_a_victim_too_big_for_the_host_pool_is_recomputed_and_an_abort_frees_host_blocks() -> None:
    sched = make_scheduler(num_host_blocks=1)
    kv = sched.kv_cache_manager
    a = Request("a", list(range(10, 16)), 4)  # 2 blocks
    b = Request("b", list(range(20, 26)), 4)  # 2 blocks
    for req in (a, b):
        sched.add_request(req)
    out1 = sched.schedule()
    assert [s.block_ids for s in out1.scheduled] == [[1, 2], [3, 4]]
    sample(sched, out1, {"a": 16, "b": 26})
    sample(sched, sched.schedule(), {"a": 17, "b": 27})
    sample(sched, sched.schedule(), {"a": 18, "b": 28})  # 8 tokens each: 2 full blocks
    out4 = sched.schedule()  # a needs a third block: b (2 blocks, 1 host block) is recomputed
    assert b.status == RequestStatus.PREEMPTED and out4.swap_out == []
    assert b.num_computed_tokens == 0 and not kv.is_swapped(b) and kv.num_free_host_blocks == 1

    c = Request("c", [40, 41, 42], 4)  # 1 block: fits in the host pool
    sched2 = make_scheduler(num_host_blocks=1)
    kv2 = sched2.kv_cache_manager
    big = Request("big", list(range(50, 61)), 4)  # 3 blocks
    for req in (big, c):
        sched2.add_request(req)
    out = sched2.schedule()
    sample(sched2, out, {"big": 61, "c": 43})
    sample(sched2, sched2.schedule(), {"big": 62, "c": 44})  # both blocks full: 12 and 4
    out = sched2.schedule()  # big needs a fourth block: c (one block) is swapped out
    assert c.status == RequestStatus.PREEMPTED and out.swap_out == [(4, 0)] and kv2.is_swapped(c)
    sched2.finish_requests("c", RequestStatus.FINISHED_ABORTED)
    assert not kv2.is_swapped(c) and kv2.num_free_host_blocks == 1 and list(sched2.waiting) == []


def test_two_victims_swapped_out_in_one_step_are_both_counted() -> None:
    sched = make_scheduler(max_num_seqs=4, num_host_blocks=2)
    reqs = [Request(rid, [i] * 4, 4) for i, rid in enumerate("abcd")]
    for req in reqs:
        sched.add_request(req)
    out1 = sched.schedule()
    assert [s.block_ids for s in out1.scheduled] == [[1], [2], [3], [4]]
    sample(sched, out1, {rid: 100 + i for i, rid in enumerate("abcd")})

    # a needs a block: d (newest) goes to host block 0; b needs one: c goes to host block 1.
    out2 = sched.schedule()
    assert [r.request_id for r in sched.waiting] == ["c", "d"] and out2.swap_out == [(4, 0), (3, 1)]
    assert [s.block_ids for s in out2.scheduled] == [[1, 4], [2, 3]]
    stats = sched.get_stats()
    assert (stats.num_preemptions_total, stats.num_swapped_out_total) == (2, 2)
    assert (sched.num_preemptions_total, sched.num_swapped_out_total) == (2, 2)
    assert stats.num_kv_blocks_used == 4 and stats.num_waiting == 2


def test_a_request_preempted_twice_counts_both_preemptions() -> None:
    sched = make_scheduler()
    a = Request("a", list(range(7)), 4)  # blocks 1, 2
    x = Request("x", list(range(10, 14)), 4)  # block 3
    b = Request("b", list(range(20, 23)), 4)  # block 4
    for req in (a, x, b):
        sched.add_request(req)
    out1 = sched.schedule()
    assert [s.block_ids for s in out1.scheduled] == [[1, 2], [3], [4]]
    sample(sched, out1, {"a": 7, "x": 14, "b": 23})

    out2 = sched.schedule()  # a's token 8 fits block 2; x's token 5 needs a block: b is preempted
    assert b.status == RequestStatus.PREEMPTED and b.num_preemptions == 1
    sample(sched, out2, {"a": 8, "x": 15})
    sched.finish_requests("x", RequestStatus.FINISHED_ABORTED)
    assert free_ids(sched) == [4, 3]

    out3 = sched.schedule()  # a's token 9 takes block 4; b (prompt + output: 4 tokens) comes back in block 3
    assert out3.scheduled == [
        ScheduledRequest("a", [8], 8, [1, 2, 4], True),
        ScheduledRequest("b", [20, 21, 22, 23], 0, [3], True),
    ]
    sample(sched, out3, {"a": 9, "b": 24})

    out4 = sched.schedule()  # b's token 5 needs a second block, none is free: b preempts itself
    assert out4.scheduled == [ScheduledRequest("a", [9], 9, [1, 2, 4], True)]
    assert b.status == RequestStatus.PREEMPTED and list(sched.waiting) == [b]
    assert b.num_preemptions == 2 and sched.num_preemptions_total == 2
    assert sched.get_stats().num_preemptions_total == 2
