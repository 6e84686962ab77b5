"""Scheduler: token budget, chunked prefill, prefix hits, max_num_seqs, queue limit, aborts, length cap
(max_output_tokens set at admission)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from inflight.batching import (
    PENDING_TOKEN_ID,
    QueueFullError,
    Request,
    RequestStatus,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    SchedulerStats,
)

BASE = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32, block_size=4, num_blocks=10)


def make_scheduler(**overrides: object) -> Scheduler:
    return Scheduler(SchedulerConfig(**{**BASE, **overrides}))


def make_request(request_id: str, token_ids: list[int] | range, **kwargs: object) -> Request:
    return Request(request_id, list(token_ids), block_size=4, **kwargs)


def sample(scheduler: Scheduler, out: SchedulerOutput, tokens: dict[str, int]) -> None:
    """The engine's read of a step: ``tokens[id]`` appended to each of its `needs_sample` requests, in order."""
    request_ids = [s.request_id for s in out.scheduled if s.needs_sample]
    scheduler.append_sampled_tokens(request_ids, [tokens[r] for r in request_ids])


def finish_at_limit(scheduler: Scheduler, request_ids: list[str]) -> list[str]:
    """The engine's length check: FINISHED_LENGTH for the live requests whose outputs reach max_output_tokens."""
    live = [scheduler.get_request(r) for r in request_ids]
    ended = [r.request_id for r in live if r is not None and r.num_output_tokens == r.max_output_tokens]
    scheduler.finish_requests(ended, RequestStatus.FINISHED_LENGTH)
    return ended


def test_lifecycle_prefill_then_decodes() -> None:
    sched = make_scheduler()
    a = make_request("a", range(10, 16))
    sched.add_request(a)
    assert a.max_output_tokens == 32 - 6  # none given: the room its prompt leaves
    out = sched.schedule()
    assert out.scheduled == [ScheduledRequest("a", [10, 11, 12, 13, 14, 15], 0, [1, 2], True)]
    assert (out.num_batched_tokens, out.swap_out, out.swap_in, out.is_empty) == (6, [], [], False)
    assert a.status == RequestStatus.RUNNING and a.num_computed_tokens == 6 and a.num_cached_tokens == 0

    assert a.num_pending_tokens == 1  # the step samples a token the host does not know yet
    assert sched.append_sampled_tokens(["a"], [99]) is None
    assert a.output_token_ids == [99] and a.num_pending_tokens == 0

    out = sched.schedule()
    assert out.scheduled == [ScheduledRequest("a", [99], 6, [1, 2], True)]
    sample(sched, out, {"a": 98})
    out = sched.schedule()
    assert out.scheduled == [ScheduledRequest("a", [98], 7, [1, 2], True)]
    sample(sched, out, {"a": 97})
    out = sched.schedule()  # position 8 starts block 3
    assert out.scheduled == [ScheduledRequest("a", [97], 8, [1, 2, 3], True)]
    assert a.all_token_ids == [10, 11, 12, 13, 14, 15, 99, 98, 97]


def test_planning_ahead_computes_the_pending_token_on_the_device() -> None:
    """Step N+1 planned while step N runs: the decode's input is step N's sampled token (a placeholder on
    the host); the tokens arrive in order afterwards."""
    sched = make_scheduler()
    a = Request("a", list(range(10, 16)), block_size=4, max_output_tokens=4)
    sched.add_request(a)
    out1 = sched.schedule()
    out2 = sched.schedule()
    assert out2.scheduled == [ScheduledRequest("a", [PENDING_TOKEN_ID], 6, [1, 2], True, True)]
    assert a.num_pending_tokens == 2 and a.num_computed_tokens == 7
    assert sched.schedule().scheduled == []  # one step ahead at most: nothing known to compute
    sample(sched, out1, {"a": 99})
    out3 = sched.schedule()
    assert out3.scheduled == [ScheduledRequest("a", [PENDING_TOKEN_ID], 7, [1, 2], True, True)]
    sample(sched, out2, {"a": 98})
    out4 = sched.schedule()  # computes output 3 (pending) to sample output 4, the last one
    assert out4.scheduled == [ScheduledRequest("a", [PENDING_TOKEN_ID], 8, [1, 2, 3], True, True)]
    sample(sched, out3, {"a": 97})
    # Output 4 is pending and is the last: its KV is never needed, nothing is planned.
    assert sched.schedule().scheduled == []
    sample(sched, out4, {"a": 96})
    assert a.output_token_ids == [99, 98, 97, 96] and a.num_pending_tokens == 0
    assert sched.schedule().scheduled == []  # max_output_tokens reached: the engine finishes it
    assert a.status == RequestStatus.RUNNING and finish_at_limit(sched, ["a"]) == ["a"]
    assert a.status == RequestStatus.FINISHED_LENGTH and sched.kv_cache_manager.num_used_blocks == 0


def test_a_prompt_of_max_model_len_minus_one_tokens_gets_exactly_one_output_token() -> None:
    sched = make_scheduler(max_model_len=8)
    a = make_request("a", range(7), max_output_tokens=5)  # clamped to the room left: 1
    sched.add_request(a)
    assert a.max_output_tokens == 1
    out1 = sched.schedule()  # the whole prompt, sampling token 8 of 8
    assert out1.scheduled == [ScheduledRequest("a", list(range(7)), 0, [1, 2], True)]
    assert sched.schedule().scheduled == []  # that token is the last: its KV is never needed
    sample(sched, out1, {"a": 5})
    assert a.output_token_ids == [5] and a.num_pending_tokens == 0 and a.num_computed_tokens == 7
    assert sched.schedule().scheduled == []  # nothing more to compute: the engine finishes it
    assert a.status == RequestStatus.RUNNING and finish_at_limit(sched, ["a"]) == ["a"]


def test_a_prompt_of_max_model_len_tokens_is_refused() -> None:
    sched = make_scheduler(max_model_len=8)
    x = make_request("x", range(8))
    message = (
        "request 'x': prompt_token_ids has 8 tokens, but max_model_len is 8: a prompt may have at most 7 "
        "tokens (one must be left to generate)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        sched.add_request(x)
    with pytest.raises(ValueError, match="prompt_token_ids has 9 tokens"):
        sched.add_request(make_request("y", range(9)))
    assert sched.get_request("x") is None and sched.num_waiting == 0 and x.max_output_tokens is None


@pytest.mark.parametrize(
    ("given", "expected"), [(None, 26), (1, 1), (25, 25), (26, 26), (27, 26), (10**9, 26)]
)
def test_add_request_clamps_max_output_tokens_to_the_room_left(given: int | None, expected: int) -> None:
    sched = make_scheduler()  # max_model_len 32
    a = make_request("a", range(6), max_output_tokens=given)
    assert a.max_output_tokens == given  # the caller's limit until admission
    sched.add_request(a)
    assert a.max_output_tokens == expected


@pytest.mark.parametrize("given", [0, -1])
def test_add_request_refuses_max_output_tokens_below_one(given: int) -> None:
    sched = make_scheduler()
    with pytest.raises(ValueError, match=f"^request 'a': max_output_tokens must be at least 1, got {given}$"):
        sched.add_request(make_request("a", [1], max_output_tokens=given))
    assert sched.get_request("a") is None and sched.num_waiting == 0


def test_a_request_preempted_with_a_pending_token_waits_for_it() -> None:
    sched = make_scheduler(num_blocks=9, max_model_len=32)  # 8 usable blocks of 4 tokens
    a = make_request("a", range(12))  # 3 blocks
    b = make_request("b", range(100, 116))  # 4 blocks
    sched.add_request(a)
    sched.add_request(b)
    out1 = sched.schedule()
    assert [r.request_id for r in out1.scheduled] == ["a", "b"]
    # Planned ahead: a's pending token (position 12) needs a 4th block, b's (16) a 5th: b is preempted.
    out2 = sched.schedule()
    assert b.status == RequestStatus.PREEMPTED and list(sched.waiting) == [b]
    assert b.num_pending_tokens == 1
    assert [r.request_id for r in out2.scheduled] == ["a"]
    # Not re-admitted while its token is pending, even with blocks free again.
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert sched.schedule().scheduled == []
    sample(sched, out1, {"a": 1, "b": 2})
    assert b.output_token_ids == [2] and b.num_pending_tokens == 0
    out3 = sched.schedule()
    # Its prompt blocks (written by step 1) are a prefix-cache hit; the known output token is recomputed.
    assert out3.scheduled == [ScheduledRequest("b", [2], 16, [4, 5, 6, 7, 8], True)]  # blocks 4-7 hit
    assert b.status == RequestStatus.RUNNING and sched.running == [b]


def test_chunked_prefill_splits_a_long_prompt_by_the_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("a", range(20)))
    out1 = sched.schedule()
    assert out1.scheduled == [ScheduledRequest("a", list(range(8)), 0, [1, 2], False)]
    sample(sched, out1, {})  # no sample needed for a partial chunk
    out2 = sched.schedule()
    assert out2.scheduled == [ScheduledRequest("a", list(range(8, 16)), 8, [1, 2, 3, 4], False)]
    out3 = sched.schedule()
    assert out3.scheduled == [ScheduledRequest("a", list(range(16, 20)), 16, [1, 2, 3, 4, 5], True)]
    assert out3.num_batched_tokens == 4


def test_chunked_prefill_budget_goes_to_running_first_then_waiting() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("a", range(100, 110)))
    sched.add_request(make_request("b", range(200, 206)))
    out1 = sched.schedule()
    assert out1.scheduled == [ScheduledRequest("a", list(range(100, 108)), 0, [1, 2], False)]
    assert sched.num_waiting == 1 and sched.num_running == 1
    out2 = sched.schedule()
    assert out2.scheduled == [
        ScheduledRequest("a", [108, 109], 8, [1, 2, 3], True),
        ScheduledRequest("b", list(range(200, 206)), 0, [4, 5], True),
    ]
    assert out2.num_batched_tokens == 8


def test_new_request_gets_the_budget_remainder_as_a_chunk() -> None:
    sched = make_scheduler(max_num_batched_tokens=10)
    for rid, start in (("a", 0), ("b", 10)):
        sched.add_request(make_request(rid, range(start, start + 3)))
    out1 = sched.schedule()
    assert [(s.request_id, len(s.token_ids)) for s in out1.scheduled] == [("a", 3), ("b", 3)]
    sample(sched, out1, {"a": 50, "b": 51})
    sched.add_request(make_request("c", range(100, 120)))
    out2 = sched.schedule()
    assert out2.scheduled == [
        ScheduledRequest("a", [50], 3, [1], True),
        ScheduledRequest("b", [51], 3, [2], True),
        ScheduledRequest("c", list(range(100, 108)), 0, [3, 4], False),
    ]
    assert out2.num_batched_tokens == 10


def test_budget_exhausted_by_running_requests_admits_nobody() -> None:
    sched = make_scheduler(max_num_batched_tokens=2)
    for rid in "abc":
        sched.add_request(make_request(rid, [ord(rid)]))
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["a", "b"] and sched.num_waiting == 1
    sample(sched, out, {"a": 1, "b": 2})
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["a", "b"] and out.num_batched_tokens == 2
    assert sched.get_request("c").status == RequestStatus.WAITING


def test_without_chunked_prefill_prompts_are_whole_and_fifo() -> None:
    sched = make_scheduler(
        max_model_len=16, max_num_batched_tokens=16, enable_chunked_prefill=False, num_blocks=10
    )
    sched.add_request(make_request("a", range(10)))
    sched.add_request(make_request("b", range(20, 30)))
    sched.add_request(make_request("c", [7, 8]))  # would fit, but waits behind b (FIFO)
    out1 = sched.schedule()
    assert [(s.request_id, s.start_position, len(s.token_ids)) for s in out1.scheduled] == [("a", 0, 10)]
    sample(sched, out1, {"a": 5})
    out2 = sched.schedule()
    assert out2.scheduled == [
        ScheduledRequest("a", [5], 10, [1, 2, 3], True),
        ScheduledRequest("b", list(range(20, 30)), 0, [4, 5, 6], True),
        ScheduledRequest("c", [7, 8], 0, [7], True),
    ]
    assert out2.num_batched_tokens == 13


def test_without_chunked_prefill_a_prompt_of_exactly_the_budget_is_admitted() -> None:
    """Whole prompts only: a prompt as long as the remaining budget fits (`>`, not `>=`), else it would
    wait for a step with more budget left than there ever is. The longest prompt (max_model_len - 1
    tokens) fits the budget, which is at least max_model_len."""
    sched = make_scheduler(
        max_model_len=16, max_num_batched_tokens=16, enable_chunked_prefill=False, num_blocks=10
    )
    sched.add_request(make_request("full", range(15)))
    out = sched.schedule()
    assert [(s.request_id, s.start_position, len(s.token_ids)) for s in out.scheduled] == [("full", 0, 15)]
    assert out.num_batched_tokens == 15

    sched = make_scheduler(
        max_model_len=16, max_num_batched_tokens=16, enable_chunked_prefill=False, num_blocks=10
    )
    sched.add_request(make_request("a", range(10)))
    sample(sched, sched.schedule(), {"a": 5})
    sched.add_request(make_request("b", range(20, 35)))  # 15 tokens: the budget left after a's decode
    sched.add_request(make_request("c", [7]))  # one token more than is left: waits for the next step
    out = sched.schedule()
    assert [(s.request_id, s.start_position, len(s.token_ids)) for s in out.scheduled] == [
        ("a", 10, 1),
        ("b", 0, 15),
    ]
    assert out.num_batched_tokens == 16 and [r.request_id for r in sched.waiting] == ["c"]


def test_max_num_seqs_limits_the_running_set() -> None:
    sched = make_scheduler(max_num_seqs=2)
    for rid, start in (("a", 0), ("b", 10), ("c", 20)):
        sched.add_request(make_request(rid, range(start, start + 3)))
    out1 = sched.schedule()
    assert [s.block_ids for s in out1.scheduled] == [[1], [2]]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    sched.finish_requests("a", RequestStatus.FINISHED_STOPPED)
    out2 = sched.schedule()  # b's pending token is computed ahead; c takes a's seat
    assert out2.scheduled == [
        ScheduledRequest("b", [PENDING_TOKEN_ID], 3, [2], True, True),
        ScheduledRequest("c", [20, 21, 22], 0, [3], True),
    ]
    assert sched.get_request("a") is None and [r.request_id for r in sched.running] == ["b", "c"]


def test_queue_full_error() -> None:
    sched = make_scheduler(max_queue_size=2)
    sched.add_request(make_request("a", [1]))
    sched.add_request(make_request("b", [2]))
    with pytest.raises(QueueFullError, match="max_queue_size=2"):
        sched.add_request(make_request("c", [3]))
    assert sched.get_request("c") is None and sched.num_waiting == 2
    sched.schedule()  # both admitted: the queue is empty again
    sched.add_request(make_request("c", [3]))
    assert sched.num_waiting == 1


def test_prefix_hits_through_the_scheduler_and_stats() -> None:
    sched = make_scheduler()
    a = make_request("a", range(8))
    sched.add_request(a)
    out1 = sched.schedule()
    assert out1.scheduled[0].block_ids == [1, 2]
    sample(sched, out1, {"a": 50})
    b = make_request("b", range(8))  # exactly 2 full blocks: hits only the first
    c = make_request("c", [*range(8), 9])  # 9 tokens: hits both
    sched.add_request(b)
    sched.add_request(c)
    out2 = sched.schedule()
    assert out2.scheduled == [
        ScheduledRequest("a", [50], 8, [1, 2, 3], True),
        ScheduledRequest("b", [4, 5, 6, 7], 4, [1, 4], True),
        ScheduledRequest("c", [9], 8, [1, 2, 5], True),
    ]
    assert (b.num_cached_tokens, c.num_cached_tokens) == (4, 8)
    pool = sched.kv_cache_manager.block_pool
    assert [pool.blocks[i].ref_cnt for i in range(1, 6)] == [3, 2, 1, 1, 1]
    assert pool.blocks[4].block_hash is None  # b's copy of block 2 duplicates a's cached block 2
    assert sched.get_stats() == SchedulerStats(
        num_running=3,
        num_waiting=0,
        num_kv_blocks_used=5,
        num_kv_blocks_free=4,
        num_kv_blocks_total=9,
        kv_cache_usage=5 / 9,
        prefix_cache_hit_rate=(0 + 4 + 8) / (8 + 8 + 9),
        num_preemptions_total=0,
    )
    assert sched.stats == sched.get_stats()


def test_prefix_hit_on_blocks_computed_in_the_same_step() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", range(12)))
    sched.add_request(make_request("b", range(12)))
    out = sched.schedule()
    assert out.scheduled == [
        ScheduledRequest("a", list(range(12)), 0, [1, 2, 3], True),
        ScheduledRequest("b", [8, 9, 10, 11], 8, [1, 2, 4], True),
    ]
    assert out.num_batched_tokens == 16


def test_abort_waiting_and_running_requests() -> None:
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_request("a", [1, 2, 3]), make_request("b", [4, 5])
    sched.add_request(a)
    sched.add_request(b)
    out1 = sched.schedule()
    assert [s.request_id for s in out1.scheduled] == ["a"]
    sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert b.status == RequestStatus.FINISHED_ABORTED and sched.get_request("b") is None
    assert sched.num_waiting == 0
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)  # while its step is in flight
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert sched.kv_cache_manager.num_free_blocks == 9 and sched.kv_cache_manager.get_block_ids("a") == []
    assert not sched.has_unfinished_requests() and sched.num_running == 0
    sample(sched, out1, {"a": 7})  # late result of an aborted request: ignored
    assert a.output_token_ids == []
    out2 = sched.schedule()
    assert out2.scheduled == [] and out2.is_empty and out2.num_scheduled_requests == 0
    sched.finish_requests(["a", "zzz"], RequestStatus.FINISHED_STOPPED)  # already finished / unknown
    assert a.status == RequestStatus.FINISHED_ABORTED and sched.requests == {}
    with pytest.raises(ValueError, match="FINISHED"):
        sched.finish_requests("a", RequestStatus.RUNNING)


def test_requests_stop_at_max_model_len() -> None:
    """max_model_len reaches a request only through its max_output_tokens: it is not planned past it, and
    the engine (not the scheduler) finishes it when the token that reaches it comes in."""
    sched = make_scheduler(max_model_len=8, num_blocks=3)
    a = make_request("a", range(6))
    sched.add_request(a)
    assert a.max_output_tokens == 2
    sample(sched, sched.schedule(), {"a": 1})
    assert finish_at_limit(sched, ["a"]) == []
    out2 = sched.schedule()
    assert out2.scheduled == [ScheduledRequest("a", [1], 6, [1, 2], True)]
    assert sched.schedule().scheduled == []  # token 8 of 8 is being sampled: its KV is never needed
    sample(sched, out2, {"a": 2})
    assert a.status == RequestStatus.RUNNING and a.num_tokens == 8 and a.num_computed_tokens == 7
    assert sched.schedule().scheduled == []
    assert finish_at_limit(sched, ["a"]) == ["a"]
    assert a.status == RequestStatus.FINISHED_LENGTH and sched.kv_cache_manager.num_free_blocks == 2


def test_add_request_validation() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", [1, 2]))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("a", [3]))
    with pytest.raises(ValueError, match="block_size"):
        sched.add_request(Request("b", [1], block_size=8))
    assert sched.schedule().scheduled[0].needs_sample
    with pytest.raises(ValueError, match="shorter"):  # a sampled request without its token
        sched.append_sampled_tokens(["a"], [])
    other = Scheduler(SchedulerConfig(**BASE))
    with pytest.raises(ValueError, match="already scheduled"):
        other.add_request(sched.get_request("a"))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(max_model_len=0), "max_model_len"),
        (dict(block_size=0), "block_size"),
        (dict(num_blocks=1), "num_blocks"),
        (dict(max_queue_size=0), "max_queue_size"),
        (dict(enable_chunked_prefill=False, max_num_batched_tokens=31), "max_num_batched_tokens"),
        (dict(num_blocks=8), "num_blocks"),  # 7 usable blocks * 4 = 28 tokens < max_model_len 32
    ],
)
def test_config_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{**BASE, **overrides})


def test_config_edges_are_accepted_and_frozen() -> None:
    config = SchedulerConfig(**{**BASE, "num_blocks": 9, "enable_chunked_prefill": False})
    assert config.max_num_batched_tokens == 64 and config.max_queue_size is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_num_seqs = 3  # type: ignore[misc]
