"""Engine metrics, exported on Triton's metrics port through the Python backend's custom-metrics API.

``EngineMetrics`` is written against a tiny factory interface so the engine service can be tested without
Triton; ``triton_model`` passes one built on ``triton_python_backend_utils.MetricFamily``.

Updates are held in the process and pushed to the factory's metrics by ``EngineMetrics.flush()`` (the
engine service flushes every ``METRICS_FLUSH_INTERVAL_S``): behind Triton each push is a round trip from
the stub to the server, and a stub killed during one can abort tritonserver 2.51 itself (docs/serving.md).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from inflight.batching import SchedulerStats

if TYPE_CHECKING:
    from inflight.backend.engine.engine import MemoryFigures

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 20.0, 40.0, 80.0]  # fmt: skip
LENGTH_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000]
FINISH_REASONS = ("stop", "length", "abort", "error")
# The engine service pushes held metric updates this often: what the metrics endpoint shows lags what
# happened by at most about this long (a test that reads a count right after a request must wait for it).
METRICS_FLUSH_INTERVAL_S = 0.5
# How a request's one final response ended: with outputs, a bare final flag (a cancelled request), an error.
FINAL_STATUSES = ("OK", "EMPTY", "INVALID_ARG", "UNAVAILABLE", "INTERNAL", "CANCELLED")


class Metric(Protocol):
    def set(self, value: float) -> None: ...
    def increment(self, value: float) -> None: ...
    def observe(self, value: float) -> None: ...


# (name, description, kind "gauge" | "counter" | "histogram", labels, buckets or None) -> Metric
MetricFactory = Callable[[str, str, str, dict[str, str], "list[float] | None"], Metric]


class HeldMetric:
    """A metric whose updates wait in the process until ``flush()`` pushes their net change.

    Increments add up, a gauge keeps its last value (pushed only when it differs from the last pushed one),
    observations queue; so a flush costs at most one push per changed counter or gauge, whatever the
    number of updates since the last one.
    """

    __slots__ = ("target", "gauge", "_lock", "_added", "_value", "_pushed", "_observed")

    def __init__(self, target: Metric, gauge: bool, lock: threading.Lock) -> None:
        self.target, self.gauge, self._lock = target, gauge, lock
        self._added = 0.0
        self._value: float | None = None
        self._pushed: float | None = None
        self._observed: list[float] = []

    def set(self, value: float) -> None:
        with self._lock:
            self._value = value

    def increment(self, value: float) -> None:
        with self._lock:
            self._added += value

    def observe(self, value: float) -> None:
        with self._lock:
            self._observed.append(value)

    def take(self) -> tuple[float, float | None, list[float]]:
        """(increment, value to set or None, observations) since the last take; the caller holds the lock."""
        added, value, observed = self._added, self._value, self._observed
        self._added, self._observed = 0.0, []
        if value == self._pushed:
            value = None
        else:
            self._pushed = value
        return added, value, observed


class BatchedHistogram:
    """A histogram fed a batch of observations at a time, exposed in Prometheus's histogram layout.

    NOTE: behind Triton every metric update is a round trip from the stub to the server. A per-token
    ``observe`` (10,000 a second at 256 streams) kept the stub's metrics thread busy and queued ahead of
    the server's other messages from the stub. This one costs at most one update per bucket per batch: its
    series are counters named ``<name>_bucket{le=...}`` (cumulative), ``<name>_sum`` and ``<name>_count``,
    which ``histogram_quantile()`` reads like any histogram.
    """

    def __init__(
        self, counter: Callable[[str, dict[str, str]], Metric], name: str, buckets: list[float]
    ) -> None:
        self.bounds = list(buckets)
        self.buckets = [counter(f"{name}_bucket", {"le": _le(b)}) for b in [*self.bounds, float("inf")]]
        self.sum = counter(f"{name}_sum", {})
        self.count = counter(f"{name}_count", {})

    def observe_many(self, values: Sequence[float]) -> None:
        if not values:
            return
        per_bucket = [0] * (len(self.bounds) + 1)
        for value in values:
            per_bucket[bisect.bisect_left(self.bounds, value)] += 1
        cumulative = 0
        for metric, n in zip(self.buckets, per_bucket, strict=True):
            cumulative += n
            if cumulative:
                metric.increment(cumulative)
        self.sum.increment(float(sum(values)))
        self.count.increment(len(values))


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class EngineMetrics:
    """The ``inflight_*`` metric families of one model."""

    def __init__(self, factory: MetricFactory, labels: dict[str, str]) -> None:
        # NOTE: the factory owns the metric families, which must outlive their metrics (see close()).
        self._factory: MetricFactory | None = factory
        self._held: list[HeldMetric] = []
        self._held_lock = threading.Lock()  # guards the held updates (any thread updates)
        self._flush_lock = threading.Lock()  # one flush at a time, so pushes keep their order

        def held(name: str, desc: str, kind: str, metric_labels: dict[str, str], buckets: list[float] | None):
            metric = HeldMetric(
                factory(name, desc, kind, metric_labels, buckets), kind == "gauge", self._held_lock
            )
            self._held.append(metric)
            return metric

        def gauge(name: str, desc: str) -> Metric:
            return held(name, desc, "gauge", labels, None)

        def counter(name: str, desc: str, extra: dict[str, str] | None = None) -> Metric:
            return held(name, desc, "counter", {**labels, **(extra or {})}, None)

        def histogram(name: str, desc: str, buckets: list[float]) -> Metric:
            return held(name, desc, "histogram", labels, buckets)

        def batched_histogram(name: str, desc: str, buckets: list[float]) -> BatchedHistogram:
            return BatchedHistogram(lambda n, extra: counter(n, desc, extra), name, buckets)

        self.healthy = gauge("inflight_engine_healthy", "1 while the engine thread runs; 0 once it has died")
        self.healthy.set(1)
        self.running = gauge("inflight_num_requests_running", "Requests in the running batch")
        self.waiting = gauge("inflight_num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_used = gauge("inflight_kv_blocks_used", "KV-cache blocks in use")
        self.kv_free = gauge(
            "inflight_kv_blocks_free", "KV-cache blocks free (cached prefix blocks included)"
        )
        self.kv_total = gauge("inflight_kv_blocks_total", "Usable KV-cache blocks")

        def rank_gauges(rank: int) -> tuple[Metric, ...]:  # the memory figures of one tensor-parallel rank
            def rank_gauge(name: str, desc: str) -> Metric:
                return held(name, desc, "gauge", {**labels, "rank": str(rank)}, None)

            return (
                rank_gauge("inflight_memory_weights_bytes", "Bytes of the model's weights"),
                rank_gauge("inflight_memory_activation_peak_bytes",
                           "Activation peak of the largest step, measured at load (0: not measured: CPU, or "
                           "kv_cache_memory_bytes given)"),
                rank_gauge("inflight_memory_kv_cache_bytes", "Bytes of the KV cache"),
                rank_gauge("inflight_kv_cache_capacity_tokens", "Tokens the KV cache holds"),
                rank_gauge("inflight_max_sequence_tokens", "The longest sequence (prompt + output) that fits"),
            )  # fmt: skip

        self._rank_gauges = rank_gauges
        self._memory_gauges: dict[int, tuple[Metric, ...]] = {}
        self.kv_usage = gauge("inflight_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use")
        self.prefix_hit_rate = gauge(
            "inflight_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache"
        )
        self.prompt_tokens = counter("inflight_prompt_tokens_total", "Prompt tokens admitted")
        self.generation_tokens = counter("inflight_generation_tokens_total", "Tokens generated")
        self.preemptions = counter(
            "inflight_preemptions_total", "Requests preempted (KV recomputed later or swapped to host memory)"
        )
        self.swapped_out = counter(
            "inflight_preemptions_swapped_total",
            "Preemptions that swapped the KV to host memory (not recomputed)",
        )
        self.requests = {
            reason: counter(
                "inflight_requests_total", "Finished requests by finish reason", {"finish_reason": reason}
            )
            for reason in FINISH_REASONS
        }
        self.finals = {
            status: counter(
                "inflight_final_responses_total",
                "Final responses sent, one per request, by how the request ended",
                {"status": status},
            )
            for status in FINAL_STATUSES
        }
        self.received = counter("inflight_requests_received_total", "Requests that reached the model")
        # Where the Triton layer's time goes (the serving benchmark reads them per level).
        self.cancel_checks = counter(
            "inflight_cancellation_checks_total", "is_cancelled() checks of live requests (engine thread)"
        )
        self.cancel_check_seconds = counter(
            "inflight_cancellation_check_seconds_total", "Engine-thread time spent in is_cancelled() checks"
        )
        self.responses_sent = counter(
            "inflight_responses_sent_total", "Responses sent, streamed ones included"
        )
        self.response_send_seconds = counter(
            "inflight_response_send_seconds_total",
            "Response-thread time spent building and sending responses",
        )
        self.open_requests = gauge(
            "inflight_requests_open", "Requests received whose final response has not been sent yet"
        )
        self.ttft = batched_histogram(
            "inflight_time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS
        )
        self.itl = batched_histogram(
            "inflight_inter_token_latency_seconds", "Time between tokens", LATENCY_BUCKETS
        )
        self.e2e = histogram(
            "inflight_e2e_request_latency_seconds", "End-to-end request latency", LATENCY_BUCKETS
        )
        self.prompt_len = histogram("inflight_request_prompt_tokens", "Prompt length", LENGTH_BUCKETS)
        self.output_len = histogram("inflight_request_generation_tokens", "Generated length", LENGTH_BUCKETS)
        # NOTE: pushed directly (not held), last in each periodic flush: a reader that sees it advance twice
        # after an event sees every metric update made before the event (tests settle on it, not on time).
        self.flushes = factory(
            "inflight_metrics_flushes_total",
            "Periodic pushes of the held metrics; while it advances, the others lag by at most an interval",
            "counter",
            labels,
            None,
        )
        self._totals_seen: dict[Any, int] = {}  # counter -> the running total it last counted up to

    def flush(self, periodic: bool = False) -> int:
        """Push every held update to the factory's metrics; returns the number of pushes.

        Counters and histograms go before gauges, so a reader that sees a gauge settle (say, no request
        running) also sees the counts that led there. A `periodic` flush (the engine service's, every
        METRICS_FLUSH_INTERVAL_S) then counts itself in `inflight_metrics_flushes_total`.
        """
        with self._flush_lock:
            with self._held_lock:
                changes = [(metric, *metric.take()) for metric in self._held]
            pushes = 0
            for gauges in (False, True):
                for metric, added, value, observed in changes:
                    if metric.gauge is not gauges:
                        continue
                    if added:
                        metric.target.increment(added)
                        pushes += 1
                    if value is not None:
                        metric.target.set(value)
                        pushes += 1
                    for v in observed:
                        metric.target.observe(v)
                    pushes += len(observed)
            if periodic:
                self.flushes.increment(1)
                pushes += 1
            return pushes

    def close(self) -> None:
        """Drop every metric, then the families (Triton requires metrics to go first)."""
        for name in list(vars(self)):
            if name != "_factory":
                delattr(self, name)
        self._factory = None

    def set_memory(self, memories: list[MemoryFigures]) -> None:
        """The memory figures of the load (``MemoryFigures``), one set per tensor-parallel rank."""
        for memory in memories:
            gauges = self._memory_gauges.get(memory.rank)
            if gauges is None:
                gauges = self._memory_gauges[memory.rank] = self._rank_gauges(memory.rank)
            values = (memory.weights_bytes, memory.activation_peak_bytes or 0, memory.kv_cache_bytes,
                      memory.kv_tokens, memory.longest_sequence)  # fmt: skip
            for gauge, value in zip(gauges, values, strict=True):
                gauge.set(value)

    def update_scheduler(self, stats: SchedulerStats) -> None:
        """Refresh the gauges from a scheduler snapshot."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_used.set(stats.num_kv_blocks_used)
        self.kv_free.set(stats.num_kv_blocks_free)
        self.kv_total.set(stats.num_kv_blocks_total)
        self.kv_usage.set(stats.kv_cache_usage)
        self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        self._count_up_to(self.preemptions, stats.num_preemptions_total)
        self._count_up_to(self.swapped_out, stats.num_swapped_out_total)

    def _count_up_to(self, counter: Any, total: int) -> None:
        """Increment ``counter`` by what a running total (the scheduler's) gained since the last call."""
        new = total - self._totals_seen.get(counter, 0)
        if new > 0:
            counter.increment(new)
            self._totals_seen[counter] = total

    def final_sent(self, status: str) -> None:
        self.finals[status if status in self.finals else "INTERNAL"].increment(1)

    def request_finished(
        self, finish_reason: str, num_prompt_tokens: int, num_output_tokens: int, e2e_s: float
    ) -> None:
        self.requests[finish_reason if finish_reason in self.requests else "error"].increment(1)
        self.prompt_len.observe(num_prompt_tokens)
        self.output_len.observe(num_output_tokens)
        self.e2e.observe(e2e_s)


def triton_metric_factory(pb_utils: Any) -> MetricFactory:
    """A factory over ``pb_utils.MetricFamily`` (one family per name, one metric per label set)."""
    kinds = {"gauge": pb_utils.MetricFamily.GAUGE, "counter": pb_utils.MetricFamily.COUNTER,
             "histogram": pb_utils.MetricFamily.HISTOGRAM}  # fmt: skip
    families: dict[str, Any] = {}

    def make(name: str, desc: str, kind: str, labels: dict[str, str], buckets: list[float] | None) -> Metric:
        if name not in families:
            families[name] = pb_utils.MetricFamily(name=name, description=desc, kind=kinds[kind])
        family = families[name]
        return family.Metric(labels=labels, buckets=buckets) if buckets else family.Metric(labels=labels)

    make.families = families  # type: ignore[attr-defined]  # kept alive with the model
    return make
