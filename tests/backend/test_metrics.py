"""BatchedHistogram: Prometheus histogram series (cumulative `_bucket{le}`, `_sum`, `_count`) from batches;
EngineMetrics holds updates until a flush pushes their net change."""

from __future__ import annotations

import threading

import numpy as np

from inflight.backend.serving.metrics import LATENCY_BUCKETS, BatchedHistogram, EngineMetrics


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


class Recorder:
    """A factory's metric that logs every push it gets, in the order of all pushes."""

    log: list[tuple[str, str, float]] = []

    def __init__(self, name: str, labels: dict[str, str]) -> None:
        self.name = name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"

    def set(self, value: float) -> None:
        Recorder.log.append((self.name, "set", value))

    def increment(self, value: float) -> None:
        Recorder.log.append((self.name, "increment", value))

    def observe(self, value: float) -> None:
        Recorder.log.append((self.name, "observe", value))


def _recorded_metrics() -> EngineMetrics:
    Recorder.log = []
    return EngineMetrics(lambda name, desc, kind, labels, buckets: Recorder(name, labels), {"model": "m"})


def test_updates_wait_for_flush_and_push_their_net_change() -> None:
    """Behind Triton each push is a round trip from the stub: a flush pushes one net change per metric."""
    metrics = _recorded_metrics()
    assert metrics.flush() == 1 and Recorder.log == [("inflight_engine_healthy{model=m}", "set", 1)]
    Recorder.log.clear()
    for _ in range(1000):
        metrics.generation_tokens.increment(3)
        metrics.final_sent("OK")
    for value in (5, 7, 2):
        metrics.running.set(value)
    metrics.e2e.observe(0.5)
    metrics.e2e.observe(1.5)
    assert Recorder.log == []  # nothing reaches the factory's metrics before a flush
    assert metrics.flush() == 5
    assert sorted(Recorder.log) == sorted(
        [
            ("inflight_generation_tokens_total{model=m}", "increment", 3000),
            ("inflight_final_responses_total{model=m,status=OK}", "increment", 1000),
            ("inflight_e2e_request_latency_seconds{model=m}", "observe", 0.5),
            ("inflight_e2e_request_latency_seconds{model=m}", "observe", 1.5),
            ("inflight_num_requests_running{model=m}", "set", 2),
        ]
    )
    # Gauges go last: a reader that sees a gauge settle also sees the counts that led there.
    assert Recorder.log[-1][0] == "inflight_num_requests_running{model=m}"
    Recorder.log.clear()
    metrics.running.set(2)  # unchanged since the last push: nothing to push
    assert metrics.flush() == 0 and Recorder.log == []


def test_a_periodic_flush_counts_itself_after_every_other_push() -> None:
    """A reader that sees inflight_metrics_flushes_total advance sees the updates that flush pushed."""
    metrics = _recorded_metrics()
    metrics.flush()
    Recorder.log.clear()
    assert metrics.flush(periodic=True) == 1
    assert Recorder.log == [("inflight_metrics_flushes_total{model=m}", "increment", 1)]
    Recorder.log.clear()
    metrics.generation_tokens.increment(2)
    metrics.running.set(4)
    assert metrics.flush(periodic=True) == 3
    assert [name for name, _, _ in Recorder.log] == [
        "inflight_generation_tokens_total{model=m}",
        "inflight_num_requests_running{model=m}",
        "inflight_metrics_flushes_total{model=m}",
    ]


def test_scheduler_totals_become_counter_increments() -> None:
    """The scheduler reports running totals; each counter gets what is new since the last snapshot."""
    from inflight.batching import SchedulerStats

    metrics = _recorded_metrics()
    metrics.flush()

    def snapshot(preemptions: int, swapped: int) -> None:
        metrics.update_scheduler(SchedulerStats(1, 0, 2, 3, 5, 0.4, 0.0, preemptions, swapped))
        Recorder.log.clear()
        metrics.flush()

    def counted() -> dict[str, float]:
        return {n: v for n, op, v in Recorder.log if op == "increment"}

    snapshot(3, 1)
    assert counted() == {
        "inflight_preemptions_total{model=m}": 3,
        "inflight_preemptions_swapped_total{model=m}": 1,
    }
    snapshot(7, 1)  # 4 more preemptions, none swapped
    assert counted() == {"inflight_preemptions_total{model=m}": 4}
    snapshot(7, 1)
    assert counted() == {}


def test_updates_from_many_threads_add_up() -> None:
    metrics = _recorded_metrics()
    metrics.flush()
    Recorder.log.clear()

    def work() -> None:
        for _ in range(2000):
            metrics.received.increment(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    pushed = 0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        pushed += metrics.flush()
    for t in threads:
        t.join()
    pushed += metrics.flush()
    total = sum(v for name, _, v in Recorder.log if name.startswith("inflight_requests_received_total"))
    assert total == 8000 and pushed == len(Recorder.log)
