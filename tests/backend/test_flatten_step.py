"""flatten_step against a per-token Python computation on random mixed steps (chunks, decodes, gaps), both the
vectorised build of large steps and the plain-Python one of small steps (at most SMALL_STEP_TOKENS)."""

from __future__ import annotations

import random

import pytest

from inflight.backend.executor.step_inputs import SMALL_STEP_TOKENS, flatten_step
from inflight.batching.scheduler_types import ScheduledRequest, SchedulerOutput


def _random_step(rng: random.Random, block_size: int, small: bool) -> SchedulerOutput:
    scheduled = []
    for i in range(rng.randint(1, 8 if small else 12)):
        start = rng.randint(0, 90)
        n = 1 if rng.random() < 0.5 else rng.randint(1, 4 if small else 40)
        num_blocks = -(-(start + n) // block_size) + rng.randint(0, 1)  # maybe a block for what comes next
        block_ids = rng.sample(range(1, 500), num_blocks)  # shuffled, with gaps
        tokens = [rng.randrange(50_000) for _ in range(n)]
        pending = n == 1 and rng.random() < 0.5
        scheduled.append(ScheduledRequest(f"r{i}", tokens, start, block_ids, rng.random() < 0.7, pending))
    return SchedulerOutput(scheduled, sum(len(r.token_ids) for r in scheduled))


@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_matches_a_per_token_computation(seed: int, block_size: int, small: bool) -> None:
    out = _random_step(random.Random(seed), block_size, small)
    assert not small or out.num_batched_tokens <= SMALL_STEP_TOKENS
    step = flatten_step(out, block_size)
    ids, positions, slots, seq_lens, starts, rows, sample_ids = [], [], [], [], [0], [], []
    pending_rows, pending_ids = [], []
    for r in out.scheduled:
        for k, token in enumerate(r.token_ids):
            pos = r.start_position + k
            ids.append(token)
            positions.append(pos)
            slots.append(r.block_ids[pos // block_size] * block_size + pos % block_size)
        seq_lens.append(r.start_position + len(r.token_ids))
        starts.append(starts[-1] + len(r.token_ids))
        if r.needs_sample:
            rows.append(starts[-1] - 1)
            sample_ids.append(r.request_id)
        if r.last_token_pending:
            pending_rows.append(starts[-1] - 1)
            pending_ids.append(r.request_id)
    arrays = (step.input_ids, step.positions, step.slot_mapping, step.block_tables)
    assert [a.dtype.name for a in arrays] == ["int64", "int64", "int64", "int32"]
    assert step.input_ids.tolist() == ids
    assert step.positions.tolist() == positions
    assert step.slot_mapping.tolist() == slots
    assert step.seq_lens == seq_lens and step.query_start_loc == starts
    assert step.logits_rows == rows and step.sample_ids == sample_ids
    assert step.pending_rows == pending_rows and step.pending_ids == pending_ids
    for i, r in enumerate(out.scheduled):
        assert step.block_tables[i, : len(r.block_ids)].tolist() == r.block_ids
        assert not step.block_tables[i, len(r.block_ids) :].any()  # padded with the null block
