"""The scenarios' wall-clock figures: recorded and reported, a failure only at the hang bound."""

from __future__ import annotations

import math

from tests.reliability.harness import ScenarioStats, wait_until


def test_a_figure_fails_the_scenario_only_at_its_hang_bound() -> None:
    stats = ScenarioStats("s")
    assert stats.timed("refusal", 0.5, hang_s=30) and stats.timed("refusal", 29.9, hang_s=30)
    assert stats.failures == 0
    assert stats.timed("refusal", 0.25, hang_s=30)
    assert not stats.timed("abort", math.inf, hang_s=60)  # a wait that never saw its state
    assert not stats.timed("abort", 60.0, hang_s=60)
    assert stats.failures == 2 and stats.notes == [
        "abort: inf s, a hang (bound 60 s)",
        "abort: 60.0 s, a hang (bound 60 s)",
    ]
    assert stats.timing_lines() == [
        "refusal: p50 0.50 s, max 29.90 s over 3 (hang bound 30 s)",
        "abort: p50 inf s, max inf s over 2 (hang bound 60 s)",
    ]


def test_wait_until_gives_the_time_taken_or_infinity() -> None:
    calls = iter([False, False, True])
    assert 0 <= wait_until(lambda: next(calls), hang_s=60, interval_s=0) < 60
    assert wait_until(lambda: False, hang_s=0, interval_s=0) == math.inf
