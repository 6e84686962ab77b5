"""BatchedHistogram: Prometheus histogram series (cumulative `_bucket{le}`, `_sum`, `_count`) from batches."""

from __future__ import annotations

import numpy as np

from inflight.backend.metrics import LATENCY_BUCKETS, BatchedHistogram


class Counter:
    def __init__(self) -> None:
        self.value = 0.0
        self.calls = 0

    def increment(self, value: float) -> None:
        self.value += value
        self.calls += 1


def test_batches_give_the_counts_of_every_single_observation() -> None:
    made: dict[tuple[str, str], Counter] = {}

    def counter(name: str, extra: dict[str, str]) -> Counter:
        return made.setdefault((name, extra.get("le", "")), Counter())

    hist = BatchedHistogram(counter, "lat", LATENCY_BUCKETS)
    rng = np.random.default_rng(0)
    batches = [list(rng.exponential(0.02, size=n)) for n in (1, 7, 300)]
    batches.append([0.005, 0.0, 1e6])  # exactly on a bound (le is inclusive), zero, past the last bound
    for batch in batches:
        hist.observe_many(batch)
    hist.observe_many([])
    values = np.concatenate([np.asarray(b, dtype=float) for b in batches])
    for bound in LATENCY_BUCKETS:
        assert made[("lat_bucket", repr(float(bound)))].value == np.count_nonzero(values <= bound), bound
    assert made[("lat_bucket", "+Inf")].value == len(values)
    assert made[("lat_count", "")].value == len(values)
    assert np.isclose(made[("lat_sum", "")].value, values.sum())
    # One update per bucket per batch, not one per value.
    assert made[("lat_bucket", "+Inf")].calls == len(batches)
