"""Scheduler edges: the budget running out mid-list, running requests with nothing to compute, config
limits and messages, finish/add validation, the sampled-token list's length."""

import re

import pytest

from inflight.batching import (
    PENDING_TOKEN_ID,
    RequestStatus,
    ScheduledRequest,
    SchedulerConfig,
)

from .test_scheduler import BASE, make_request, make_scheduler, sample

# ---- the running loop --------------------------------------------------------------------------------


def test_a_running_request_behind_an_exhausted_budget_is_not_planned() -> None:
    """Planned ahead, a and b wait for their tokens and c takes the step; once a's and b's tokens come
    in they use the whole budget of 2, and c (running, with its pending token to compute) gets nothing."""
    sched = make_scheduler(max_num_batched_tokens=2)
    sched.add_request(make_request("a", [1]))
    sched.add_request(make_request("b", [2]))
    out1 = sched.schedule()
    sched.schedule()  # a's and b's pending tokens
    sched.add_request(make_request("c", [3, 4]))
    out3 = sched.schedule()
    assert out3.scheduled == [ScheduledRequest("c", [3, 4], 0, [3], True)]
    sample(sched, out1, {"a": 10, "b": 20})
    out4 = sched.schedule()
    assert out4.scheduled == [
        ScheduledRequest("a", [PENDING_TOKEN_ID], 2, [1], True, True),
        ScheduledRequest("b", [PENDING_TOKEN_ID], 2, [2], True, True),
    ]
    assert out4.num_batched_tokens == 2 and sched.get_request("c").num_computed_tokens == 2


def test_a_running_request_with_nothing_to_compute_does_not_hold_up_the_ones_behind_it() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", [1, 2]))
    sched.schedule()  # a's prompt
    sched.add_request(make_request("b", [3, 4]))
    out2 = sched.schedule()
    assert [(s.request_id, s.token_ids) for s in out2.scheduled] == [("a", [PENDING_TOKEN_ID]), ("b", [3, 4])]
    # a is one step ahead (nothing known to compute); b behind it still computes its pending token.
    out3 = sched.schedule()
    assert out3.scheduled == [ScheduledRequest("b", [PENDING_TOKEN_ID], 2, [2], True, True)]


def test_without_chunked_prefill_a_decode_of_exactly_the_remaining_budget_is_planned() -> None:
    sched = make_scheduler(max_model_len=3, max_num_batched_tokens=3, enable_chunked_prefill=False)
    for rid, token in (("a", 1), ("b", 2), ("c", 3)):
        sched.add_request(make_request(rid, [token]))
    out1 = sched.schedule()
    assert [s.request_id for s in out1.scheduled] == ["a", "b", "c"]
    sample(sched, out1, {"a": 10, "b": 20, "c": 30})
    out2 = sched.schedule()  # c's decode is 1 token with 1 token of budget left: it fits
    assert [(s.request_id, s.token_ids) for s in out2.scheduled] == [("a", [10]), ("b", [20]), ("c", [30])]
    assert out2.num_batched_tokens == 3


def test_a_swapped_out_request_left_unfinished_at_max_output_tokens_is_an_error() -> None:
    """Its last token needs no KV (the engine finishes the request when it reads it), so a swapped-out
    request with that token known has nothing left to compute: the scheduler refuses to swap it in."""
    sched = make_scheduler(num_blocks=5, max_model_len=16, num_host_blocks=1)  # 4 usable blocks of 4
    sched.add_request(make_request("a", [1, 2, 3, 4]))  # block 1
    sched.add_request(make_request("b", [5, 6, 7, 8, 9, 10]))  # blocks 2, 3
    c = make_request("c", [11, 12, 13], max_output_tokens=1)  # block 4
    sched.add_request(c)
    out1 = sched.schedule()
    assert [s.block_ids for s in out1.scheduled] == [[1], [2, 3], [4]]
    out2 = sched.schedule()  # a's pending token needs a block: c (newest) goes to host block 0
    assert c.status == RequestStatus.PREEMPTED and out2.swap_out == [(4, 0)]
    sample(sched, out1, {"a": 20, "b": 21, "c": 22})
    assert c.output_token_ids == [22] and c.num_computed_tokens == 3
    with pytest.raises(AssertionError, match="swapped out with nothing left to compute"):
        sched.schedule()


def test_a_step_whose_only_request_preempted_itself_still_has_its_swap_out_to_do() -> None:
    """a is two tokens ahead (nothing to compute); b, the only other running request, needs a block and
    none is free: it preempts itself into host blocks. Nothing is scheduled, but the step is not empty."""
    sched = make_scheduler(num_blocks=5, max_model_len=16, num_host_blocks=2)  # 4 usable blocks of 4
    a = make_request("a", [1, 2, 3, 4])
    sched.add_request(a)
    sched.schedule()  # a's prompt: block 1
    sched.schedule()  # a's pending token: block 2
    b = make_request("b", range(10, 18))
    sched.add_request(b)
    assert sched.schedule().scheduled[0].block_ids == [3, 4]  # b's prompt
    out = sched.schedule()  # b's pending token needs a fifth block
    assert out.scheduled == [] and out.num_scheduled_requests == 0 and out.num_batched_tokens == 0
    assert out.swap_out == [(3, 0), (4, 1)] and out.swap_in == [] and not out.is_empty
    assert b.status == RequestStatus.PREEMPTED and sched.running == [a]


# ---- config limits and messages -----------------------------------------------------------------------


def test_config_accepts_the_smallest_value_of_every_limit() -> None:
    config = SchedulerConfig(
        max_num_seqs=1,
        max_num_batched_tokens=1,
        max_model_len=1,
        block_size=1,
        num_blocks=2,
        max_queue_size=1,
    )
    assert (config.num_blocks, config.max_queue_size) == (2, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(max_num_seqs=0), "max_num_seqs must be at least 1, got 0"),
        (dict(block_size=-1), "block_size must be at least 1, got -1"),
        (dict(num_blocks=1), "num_blocks must be at least 2 (block 0 is reserved), got 1"),
        (dict(max_queue_size=0), "max_queue_size must be at least 1 or None, got 0"),
        (
            dict(enable_chunked_prefill=False, max_num_batched_tokens=31),
            "max_num_batched_tokens (31) must be >= max_model_len (32) when chunked prefill is disabled",
        ),
        # 8 blocks: 8 - 1 = 7 usable, 7 * 4 = 28 tokens.
        (
            dict(num_blocks=8),
            "num_blocks (8) too small: 7 usable blocks of 4 tokens hold 28 tokens < max_model_len (32)",
        ),
        (
            dict(num_blocks=3, block_size=8, max_model_len=17),
            "num_blocks (3) too small: 2 usable blocks of 8 tokens hold 16 tokens < max_model_len (17)",
        ),
    ],
)
def test_config_errors_state_the_field_its_value_and_the_limit(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SchedulerConfig(**{**BASE, **overrides})


# ---- requests in and out -------------------------------------------------------------------------------


def test_finish_requests_skips_an_unknown_id_and_goes_on() -> None:
    sched = make_scheduler()
    a, b = make_request("a", [1]), make_request("b", [2])
    sched.add_request(a)
    sched.add_request(b)
    sched.finish_requests(["unknown", "a", "unknown", "b"], RequestStatus.FINISHED_ABORTED)
    assert a.status == b.status == RequestStatus.FINISHED_ABORTED and sched.num_waiting == 0
    assert sched.requests == {} and sched.schedule().is_empty


def test_a_finished_request_cannot_be_added_again() -> None:
    """Aborted while waiting, it has no computed tokens, but its status is no longer WAITING."""
    sched = make_scheduler()
    a = make_request("a", [1, 2])
    sched.add_request(a)
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert a.num_computed_tokens == 0
    with pytest.raises(ValueError, match="^request 'a' was already scheduled$"):
        sched.add_request(a)
    assert sched.get_request("a") is None and sched.num_waiting == 0


def test_append_sampled_tokens_needs_one_token_per_request() -> None:
    sched = make_scheduler()
    a = make_request("a", [1, 2])
    sched.add_request(a)
    sched.schedule()
    with pytest.raises(ValueError, match="shorter"):
        sched.append_sampled_tokens(["a"], [])
    with pytest.raises(ValueError, match="longer"):
        sched.append_sampled_tokens([], [7])
    assert a.output_token_ids == [] and a.num_pending_tokens == 1
    assert sched.append_sampled_tokens(["a"], [7]) is None and a.output_token_ids == [7]
