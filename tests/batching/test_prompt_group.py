"""Parallel sampling in the scheduler: the n sequences of a prompt share its full blocks (exact block ids and
reference counts) through chunked prefill, preemption, swapping, prefix caching on or off and aborts."""

from __future__ import annotations

import pytest

from inflight.batching import (
    PromptGroup,
    Request,
    RequestStatus,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

from .test_scheduler import sample

PROMPT = list(range(10, 20))  # 10 tokens: blocks [10..13] [14..17] full, [18 19] partial (block_size 4)


def make_scheduler(num_blocks: int = 12, **overrides: object) -> Scheduler:
    config = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32, block_size=4)
    return Scheduler(SchedulerConfig(**{**config, "num_blocks": num_blocks, **overrides}))


def add_group(sched: Scheduler, n: int, prompt: list[int] = PROMPT) -> tuple[PromptGroup, list[Request]]:
    group = PromptGroup.for_prompt("r", len(prompt), 4)
    assert group is not None
    requests = [Request(f"r#{i}", prompt, 4, prompt_group=group) for i in range(n)]
    for request in requests:
        sched.add_request(request)
    return group, requests


def ref_counts(sched: Scheduler, block_ids: list[int]) -> list[int]:
    return [sched.kv_cache_manager.block_pool.blocks[i].ref_cnt for i in block_ids]


def free_ids(sched: Scheduler) -> list[int]:
    return [b.block_id for b in sched.kv_cache_manager.block_pool.free_block_queue.get_all_free_blocks()]


def test_shared_blocks_are_the_full_blocks_below_the_last_token() -> None:
    assert PromptGroup.for_prompt("r", 4, 4) is None  # its one block holds the last token: nothing to share
    assert PromptGroup.for_prompt("r", 5, 4).num_shared_tokens == 4
    assert PromptGroup.for_prompt("r", 9, 4).num_shared_tokens == 8
    assert PromptGroup.for_prompt("r", 10, 4).num_shared_blocks == 2


@pytest.mark.parametrize(
    ("num_prompt_tokens", "num_shared_blocks"),
    [(2 * 4 - 1, 1), (2 * 4, 1), (2 * 4 + 1, 2)],
    ids=["2bs-1", "2bs", "2bs+1"],
)
def test_shared_blocks_around_two_full_blocks(num_prompt_tokens: int, num_shared_blocks: int) -> None:
    """block_size 4: 7 tokens fill one block; 8 fill two, but the second holds the last token (computed by
    every sequence for its logits); 9 leave two full blocks below the last token."""
    group = PromptGroup.for_prompt("r", num_prompt_tokens, 4)
    assert group is not None
    assert (group.num_shared_blocks, group.num_shared_tokens) == (num_shared_blocks, 4 * num_shared_blocks)


def test_repr_shows_the_group_id_block_ids_and_sorted_holders() -> None:
    sched = make_scheduler()
    group, _ = add_group(sched, 3)
    assert repr(group) == "PromptGroup('r', blocks=None, holders=[])"
    sched.schedule()
    assert repr(group) == "PromptGroup('r', blocks=[1, 2], holders=['r#0', 'r#1', 'r#2'])"


@pytest.mark.parametrize("caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_one_prefill_then_siblings_share_by_reference(caching: bool) -> None:
    sched = make_scheduler(enable_prefix_caching=caching)
    group, requests = add_group(sched, 3)
    out = sched.schedule()
    assert out.scheduled == [
        ScheduledRequest("r#0", PROMPT, 0, [1, 2, 3], True),
        ScheduledRequest("r#1", [18, 19], 8, [1, 2, 4], True),  # recomputes only its partial block
        ScheduledRequest("r#2", [18, 19], 8, [1, 2, 5], True),
    ]
    assert out.num_batched_tokens == 10 + 2 + 2
    assert ref_counts(sched, [1, 2, 3, 4, 5]) == [3, 3, 1, 1, 1]
    assert sched.kv_cache_manager.num_used_blocks == 5
    assert [b.block_id for b in group.blocks] == [1, 2] and group.holder_ids == {"r#0", "r#1", "r#2"}

    sample(sched, out, {"r#0": 100, "r#1": 200, "r#2": 300})
    out = sched.schedule()  # each decodes its own token into its own block
    assert [(s.token_ids, s.block_ids) for s in out.scheduled] == [
        ([100], [1, 2, 3]),
        ([200], [1, 2, 4]),
        ([300], [1, 2, 5]),
    ]
    sample(sched, out, {"r#0": 101, "r#1": 201, "r#2": 301})

    sched.finish_requests("r#0", RequestStatus.FINISHED_STOPPED)
    assert ref_counts(sched, [1, 2, 3]) == [2, 2, 0] and sched.kv_cache_manager.num_used_blocks == 4
    assert group.holder_ids == {"r#1", "r#2"}
    sched.finish_requests(["r#1", "r#2"], RequestStatus.FINISHED_LENGTH)
    assert sched.kv_cache_manager.num_free_blocks == 11 and group.blocks is None and not group.holder_ids


def test_chunked_prefill_siblings_join_when_the_shared_blocks_are_planned() -> None:
    sched = make_scheduler(max_num_batched_tokens=6)
    group, _ = add_group(sched, 3)
    out = sched.schedule()  # the budget ends inside the shared blocks: nobody else can start yet
    assert out.scheduled == [ScheduledRequest("r#0", PROMPT[:6], 0, [1, 2], False)]
    assert group.blocks is None and group.leader_id == "r#0"

    out = sched.schedule()  # r#0 completes its prompt; r#1 shares in the same step
    assert out.scheduled == [
        ScheduledRequest("r#0", PROMPT[6:], 6, [1, 2, 3], True),
        ScheduledRequest("r#1", [18, 19], 8, [1, 2, 4], True),
    ]
    assert group.leader_id is None and [b.block_id for b in group.blocks] == [1, 2]
    sample(sched, out, {"r#0": 100, "r#1": 200})
    out = sched.schedule()
    assert out.scheduled[-1] == ScheduledRequest("r#2", [18, 19], 8, [1, 2, 5], True)
    assert ref_counts(sched, [1, 2]) == [3, 3]


@pytest.mark.parametrize("caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_chunk_ending_exactly_at_the_shared_boundary_publishes_the_blocks_that_step(caching: bool) -> None:
    """A budget of 8: r#0's first chunk is exactly its two shared blocks: they are the group's at once (r#0
    holds them, nobody leads), and r#1 takes them in the next step beside r#0's last tokens."""
    sched = make_scheduler(max_num_batched_tokens=8, enable_prefix_caching=caching)
    group, _ = add_group(sched, 2)
    out = sched.schedule()
    assert out.scheduled == [ScheduledRequest("r#0", PROMPT[:8], 0, [1, 2], False)]
    assert [b.block_id for b in group.blocks] == [1, 2]
    assert group.holder_ids == {"r#0"} and group.leader_id is None
    out = sched.schedule()
    assert out.scheduled == [
        ScheduledRequest("r#0", PROMPT[8:], 8, [1, 2, 3], True),
        ScheduledRequest("r#1", [18, 19], 8, [1, 2, 4], True),
    ]
    assert group.holder_ids == {"r#0", "r#1"} and ref_counts(sched, [1, 2]) == [2, 2]


def test_leader_aborted_before_the_shared_blocks_lets_the_next_member_lead() -> None:
    """r#0 computed 6 of the 8 shared tokens when it is aborted: the group has no leader, no blocks and no
    holder; r#1 computes the prompt from the start (no prefix cache) and leads; r#2 shares r#1's blocks."""
    sched = make_scheduler(max_num_batched_tokens=6, enable_prefix_caching=False)
    group, _ = add_group(sched, 3)
    out = sched.schedule()
    assert out.scheduled == [ScheduledRequest("r#0", PROMPT[:6], 0, [1, 2], False)]
    assert group.leader_id == "r#0"
    sched.finish_requests("r#0", RequestStatus.FINISHED_ABORTED)
    assert group.leader_id is None and group.blocks is None and group.holder_ids == set()
    assert sched.kv_cache_manager.num_used_blocks == 0
    out = sched.schedule()
    assert out.scheduled == [ScheduledRequest("r#1", PROMPT[:6], 0, [3, 4], False)]
    assert group.leader_id == "r#1" and group.blocks is None
    out = sched.schedule()
    assert out.scheduled == [
        ScheduledRequest("r#1", PROMPT[6:], 6, [3, 4, 5], True),
        ScheduledRequest("r#2", [18, 19], 8, [3, 4, 6], True),
    ]
    assert group.leader_id is None and [b.block_id for b in group.blocks] == [3, 4]
    assert group.holder_ids == {"r#1", "r#2"} and ref_counts(sched, [3, 4]) == [2, 2]


def test_member_whose_table_is_exactly_the_shared_blocks_is_a_holder() -> None:
    """join_prompt_group: a table that starts with the group's blocks holds them, also when it is nothing
    else (a member given the shared blocks and no token more); it keeps them for the group once the member
    that computed them finishes, and its free makes the group forget them."""
    sched = make_scheduler()
    group, _ = add_group(sched, 1)
    sample(sched, sched.schedule(), {"r#0": 100})
    kv = sched.kv_cache_manager
    late = Request("r#1", PROMPT, 4, prompt_group=group)
    assert kv.allocate_slots(late, 0, kv.shared_prompt_blocks(late)) == []
    assert kv.get_block_ids("r#1") == [1, 2]
    kv.join_prompt_group(late)
    assert group.holder_ids == {"r#0", "r#1"} and ref_counts(sched, [1, 2]) == [2, 2]
    sched.finish_requests("r#0", RequestStatus.FINISHED_STOPPED)
    assert [b.block_id for b in group.blocks] == [1, 2] and group.holder_ids == {"r#1"}
    kv.free(late)
    assert group.blocks is None and ref_counts(sched, [1, 2]) == [0, 0]


def test_abort_of_every_sequence_frees_every_block() -> None:
    sched = make_scheduler(max_num_batched_tokens=12)
    group, _ = add_group(sched, 4)
    out = sched.schedule()  # r#0 whole, r#1 shares; r#2 and r#3 still wait
    assert [s.request_id for s in out.scheduled] == ["r#0", "r#1"]
    assert sched.kv_cache_manager.num_used_blocks == 4
    sched.finish_requests([f"r#{i}" for i in range(4)], RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache_manager.num_free_blocks == 11 and sched.kv_cache_manager.num_used_blocks == 0
    assert group.blocks is None and not group.holder_ids and group.leader_id is None
    assert not sched.has_unfinished_requests()


def _decode_to_position_12(sched: Scheduler, first: SchedulerOutput, ids: list[str]) -> None:
    """Sample the 9-token prompts' step ``first``, then plan and sample positions 9, 10 and 11 of every id
    (sequence i samples 100 * (i + 1) + step)."""
    out = first
    for step in range(4):
        if step:
            out = sched.schedule()
            assert [s.request_id for s in out.scheduled] == ids
        sample(sched, out, {rid: 100 * (i + 1) + step for i, rid in enumerate(ids)})


@pytest.mark.parametrize("caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_preempted_sequence_shares_again_when_readmitted(caching: bool) -> None:
    """6 usable blocks, n = 3 of a 9-token prompt: the newest is preempted (recompute) when the others grow,
    and comes back on the shared blocks another sequence still holds (its own third block was reused by
    r#1, so the prefix cache has no more of it either)."""
    sched = make_scheduler(num_blocks=7, max_model_len=16, enable_prefix_caching=caching)
    prompt = PROMPT[:9]
    group, (r0, r1, r2) = add_group(sched, 3, prompt)
    out = sched.schedule()
    assert [s.block_ids for s in out.scheduled] == [[1, 2, 3], [1, 2, 4], [1, 2, 5]]
    assert free_ids(sched) == [6]
    _decode_to_position_12(sched, out, ["r#0", "r#1", "r#2"])

    out = sched.schedule()  # position 12 needs a fourth block each: r#0 takes 6, r#1 preempts r#2
    assert [(s.request_id, s.block_ids) for s in out.scheduled] == [
        ("r#0", [1, 2, 3, 6]),
        ("r#1", [1, 2, 4, 5]),
    ]
    assert r2.status == RequestStatus.PREEMPTED and r2.num_computed_tokens == 0
    assert ref_counts(sched, [1, 2]) == [2, 2] and group.holder_ids == {"r#0", "r#1"}
    sample(sched, out, {"r#0": 104, "r#1": 204})

    sched.finish_requests("r#0", RequestStatus.FINISHED_STOPPED)  # frees 6 and 3 (1, 2 stay with r#1)
    assert free_ids(sched) == [6, 3] and ref_counts(sched, [1, 2]) == [1, 1]
    out = sched.schedule()
    readmitted = out.scheduled[-1]
    # r#2 has 9 + 4 tokens: it takes the shared blocks again and recomputes tokens 8 .. 12
    assert readmitted == ScheduledRequest("r#2", r2.all_token_ids[8:], 8, [1, 2, 6, 3], True)
    assert ref_counts(sched, [1, 2]) == [2, 2] and group.holder_ids == {"r#1", "r#2"}


def test_swapped_out_sequence_keeps_a_private_copy_and_the_others_keep_the_shared_blocks() -> None:
    sched = make_scheduler(num_blocks=6, max_model_len=16, num_host_blocks=8)
    prompt = PROMPT[:9]
    group, (r0, r1) = add_group(sched, 2, prompt)
    out = sched.schedule()
    assert [s.block_ids for s in out.scheduled] == [[1, 2, 3], [1, 2, 4]]
    _decode_to_position_12(sched, out, ["r#0", "r#1"])

    out = sched.schedule()  # r#0 takes block 5; r#1 has no room and swaps itself out, shared blocks included
    assert [(s.request_id, s.block_ids) for s in out.scheduled] == [("r#0", [1, 2, 3, 5])]
    assert out.swap_out == [(1, 0), (2, 1), (4, 2)]
    assert r1.num_computed_tokens == 12 and ref_counts(sched, [1, 2, 4]) == [1, 1, 0]
    assert group.holder_ids == {"r#0"}
    sample(sched, out, {"r#0": 104})

    sched.finish_requests("r#0", RequestStatus.FINISHED_STOPPED)  # the last holder: the group forgets them
    assert group.blocks is None and free_ids(sched) == [4, 5, 3, 2, 1]
    out = sched.schedule()  # r#1 comes back into private blocks, which become the group's
    assert out.swap_in == [(0, 4), (1, 5), (2, 3)]
    assert out.scheduled == [ScheduledRequest("r#1", [r1.all_token_ids[12]], 12, [4, 5, 3, 2], True)]
    assert [b.block_id for b in group.blocks] == [4, 5] and group.holder_ids == {"r#1"}


@pytest.mark.parametrize("caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_prompt_recomputed_when_no_sequence_holds_the_shared_blocks(caching: bool) -> None:
    """The last holder finished while the other sequence was preempted: the group forgets the blocks; the
    sequence computes its tokens again (from the start, or after what the prefix cache still has)."""
    sched = make_scheduler(num_blocks=6, max_model_len=16, enable_prefix_caching=caching)
    group, (r0, r1) = add_group(sched, 2, PROMPT[:9])
    out = sched.schedule()
    _decode_to_position_12(sched, out, ["r#0", "r#1"])
    out = sched.schedule()  # r#1 preempts itself (recompute): r#0 alone holds the shared blocks
    assert [s.request_id for s in out.scheduled] == ["r#0"] and r1.status == RequestStatus.PREEMPTED
    sample(sched, out, {"r#0": 104})
    sched.finish_requests("r#0", RequestStatus.FINISHED_STOPPED)
    assert group.blocks is None
    assert free_ids(sched) == [4, 5, 3, 2, 1]
    out = sched.schedule()
    if caching:  # its three full blocks are still cached (1, 2 shared, 4 its own): only token 12 is computed
        assert out.scheduled == [ScheduledRequest("r#1", [r1.all_token_ids[12]], 12, [1, 2, 4, 5], True)]
        assert [b.block_id for b in group.blocks] == [1, 2]
    else:  # its 13 tokens from the start, in fresh blocks, the first two of which become the group's
        assert out.scheduled == [ScheduledRequest("r#1", r1.all_token_ids, 0, [4, 5, 3, 2], True)]
        assert [b.block_id for b in group.blocks] == [4, 5]
    assert group.holder_ids == {"r#1"}


def test_swapped_in_member_with_private_blocks_is_not_a_holder() -> None:
    """n = 4 of a 9-token prompt in 8 usable blocks: at position 12 r#3 (the newest) is swapped out to give
    r#2 a block. r#0 and r#1 finish; r#3 comes back into private blocks while r#2 still holds the shared
    ones: r#3 is no holder, so r#2's finish makes the group forget the blocks it freed."""
    sched = make_scheduler(num_blocks=9, max_model_len=16, num_host_blocks=8)
    group, (r0, r1, r2, r3) = add_group(sched, 4, PROMPT[:9])
    out = sched.schedule()
    assert [s.block_ids for s in out.scheduled] == [[1, 2, 3], [1, 2, 4], [1, 2, 5], [1, 2, 6]]
    _decode_to_position_12(sched, out, ["r#0", "r#1", "r#2", "r#3"])

    out = sched.schedule()
    assert [(s.request_id, s.block_ids) for s in out.scheduled] == [
        ("r#0", [1, 2, 3, 7]),
        ("r#1", [1, 2, 4, 8]),
        ("r#2", [1, 2, 5, 6]),
    ]
    assert out.swap_out == [(1, 0), (2, 1), (6, 2)] and group.holder_ids == {"r#0", "r#1", "r#2"}
    sample(sched, out, {"r#0": 104, "r#1": 204, "r#2": 304})
    sched.finish_requests(["r#0", "r#1"], RequestStatus.FINISHED_STOPPED)
    assert free_ids(sched) == [7, 3, 8, 4] and ref_counts(sched, [1, 2]) == [1, 1]

    out = sched.schedule()
    assert out.swap_in == [(0, 7), (1, 3), (2, 8)]
    assert out.scheduled[-1] == ScheduledRequest("r#3", [r3.all_token_ids[12]], 12, [7, 3, 8, 4], True)
    assert [b.block_id for b in group.blocks] == [1, 2] and group.holder_ids == {"r#2"}
    sample(sched, out, {"r#2": 305, "r#3": 404})
    sched.finish_requests("r#2", RequestStatus.FINISHED_STOPPED)
    assert group.blocks is None and group.holder_ids == set() and ref_counts(sched, [1, 2]) == [0, 0]


def test_member_takes_the_groups_blocks_over_a_free_prefix_cache_copy_as_long() -> None:
    """The group's blocks became a swapped-in sequence's private copies (6, 1) while the first copies (2, 3)
    are free and still cached: the waiting r#2 takes the held copies and one new block; two free cached
    blocks plus one new would not fit in the two free blocks."""
    sched = make_scheduler(num_blocks=7, max_num_seqs=3, max_model_len=16, num_host_blocks=8)
    sched.add_request(Request("u", [50, 51, 52, 53], 4))
    group, (r0, r1, r2) = add_group(sched, 3, PROMPT[:9])
    out = sched.schedule()  # r#2 waits: max_num_seqs
    assert [(s.request_id, s.block_ids) for s in out.scheduled] == [
        ("u", [1]),
        ("r#0", [2, 3, 4]),
        ("r#1", [2, 3, 5]),
    ]
    _decode_to_position_12(sched, out, ["u", "r#0", "r#1"])
    out = sched.schedule()  # r#0 takes the last block; r#1 swaps itself out
    assert [(s.request_id, s.block_ids) for s in out.scheduled] == [("u", [1, 6]), ("r#0", [2, 3, 4, 5])]
    assert out.swap_out == [(2, 0), (3, 1), (5, 2)]
    sample(sched, out, {"u": 104, "r#0": 204})
    sched.finish_requests(["u", "r#0"], RequestStatus.FINISHED_STOPPED)
    assert free_ids(sched) == [6, 1, 5, 4, 3, 2] and group.blocks is None

    out = sched.schedule()
    assert out.swap_in == [(0, 6), (1, 1), (2, 5)]
    assert out.scheduled == [
        ScheduledRequest("r#1", [r1.all_token_ids[12]], 12, [6, 1, 5, 4], True),
        ScheduledRequest("r#2", [18], 8, [6, 1, 3], True),
    ]
    assert group.holder_ids == {"r#1", "r#2"} and ref_counts(sched, [6, 1, 2]) == [2, 2, 0]
    assert free_ids(sched) == [2]
