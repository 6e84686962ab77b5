"""benchmarks.host_overhead: the real engine around a stand-in model, timed by phase."""

from __future__ import annotations

from benchmarks.host_overhead import PHASES, measure


def test_host_overhead_runs_the_engine_with_a_stand_in_model(smollm2_path) -> None:
    row = measure(smollm2_path, num_seqs=4, prompt_len=9, output_len=7)
    # Every request got all its tokens through the real scheduler, sampler and detokenizer.
    assert row["output_tokens"] == 4 * 7
    # The prompts' step and the step whose tokens are read late (async scheduling) aside, the rest are
    # decode steps of all four: 7 tokens, the first from the prompt step.
    assert row["decode_steps"] >= 4
    assert set(row["phases_ms"]) == set(PHASES)
    # Every phase runs inside each step, so in every step its time is at most the step's, and so is its
    # median (the figures are rounded to the microsecond). Above zero: it ran in the decode steps.
    host = row["host_ms_per_step"]
    assert all(0 < v <= host + 0.001 for v in row["phases_ms"].values()), (row["phases_ms"], host)
