"""The engine service's metrics thread: it applies the updates the engine thread hands it and pushes them."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from inflight.backend.serving.metrics import METRICS_FLUSH_INTERVAL_S, EngineMetrics

logger = logging.getLogger("inflight")


class MetricsWriter:
    """Applies metric updates on a thread of its own and pushes them to Triton every `flush_interval_s`.

    NOTE: behind Triton every metric push is a round trip from the stub to the server. Made per token on
    the engine thread they slowed a 256-stream decode step by about 2x, so the engine thread hands over one
    batch per step. Pushed per batch, they still kept this thread in round trips nearly all the time on the
    2-core CPU machine, and a stub killed (kill -9, the OOM killer) in the middle of one aborted tritonserver
    2.51 itself (boost::interprocess::lock_exception in ProcessMetricRequest): about 1 in 10 stub kills under
    4 live streams. The updates are held in the process (`EngineMetrics.flush`) and pushed as net changes,
    at most one push per changed metric per interval.
    """

    def __init__(self, metrics: EngineMetrics, flush_interval_s: float = METRICS_FLUSH_INTERVAL_S) -> None:
        self.metrics = metrics
        self.flush_interval_s = flush_interval_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="inflight-metrics", daemon=True)
        self._thread.start()

    def put(self, fn: Callable[..., None], *args: object) -> None:
        """Call ``fn(*args)`` on this thread (a failure is logged, never raised)."""
        self._queue.put((fn, args))

    def record_step(self, num_tokens: int, ttfts: list[float], itls: list[float]) -> None:
        """One step's tokens and their latencies; the steps queued meanwhile are applied as one."""
        self._queue.put((_record_step, (self.metrics, num_tokens, ttfts, itls)))

    def close(self) -> None:
        """Apply what is queued, push everything, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        next_flush = time.monotonic() + self.flush_interval_s
        while True:
            try:
                items = [self._queue.get(timeout=max(0.0, next_flush - time.monotonic()))]
            except queue.Empty:
                items = []
            while True:  # everything queued meanwhile: the steps' token records are applied as one
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            steps = [args for fn, args in (i for i in items if i is not None) if fn is _record_step]
            if steps:
                merged = (steps[0][0], sum(a[1] for a in steps), [v for a in steps for v in a[2]],
                          [v for a in steps for v in a[3]])  # fmt: skip
                self._apply(_record_step, merged)
            stopping = False
            for item in items:
                if item is None:
                    stopping = True
                    break
                if item[0] is not _record_step:
                    self._apply(*item)
            if stopping or time.monotonic() >= next_flush:
                self._apply(self.metrics.flush, (True,))
                next_flush = time.monotonic() + self.flush_interval_s
            if stopping:
                return

    @staticmethod
    def _apply(fn: Callable[..., None], args: tuple) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - metrics must never take the service down
            logger.warning("a metric update failed", exc_info=True)


def _record_step(metrics: EngineMetrics, num_tokens: int, ttfts: list[float], itls: list[float]) -> None:
    if num_tokens:
        metrics.generation_tokens.increment(num_tokens)
    metrics.ttft.observe_many(ttfts)
    metrics.itl.observe_many(itls)
