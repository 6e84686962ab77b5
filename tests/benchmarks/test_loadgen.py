"""The serving load generator: schedules, the driver's pacing, the figures, and engine-direct for real."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from benchmarks.loadgen import RequestRecord, RequestSpec, drive, schedule, summarize


def test_schedule_has_exact_lengths_and_poisson_offsets() -> None:
    specs = schedule(50, 467, 256, vocab_size=1000, rate=2.0, seed=3)
    assert all(len(s.prompt_ids) == 467 and s.max_tokens == 256 for s in specs)
    assert all(10 <= t < 990 for s in specs for t in s.prompt_ids)
    offsets = [s.arrival_s for s in specs]
    assert offsets[0] == 0.0 and offsets == sorted(offsets) and len(set(offsets)) == 50
    assert schedule(50, 467, 256, 1000, rate=2.0, seed=3) == specs  # deterministic
    ranged = schedule(20, (100, 120), (5, 6), 1000, seed=1)
    assert all(
        100 <= len(s.prompt_ids) <= 120 and s.max_tokens in (5, 6) and s.arrival_s is None for s in ranged
    )


def test_summarize_splits_a_multi_token_response_over_its_gap() -> None:
    record = RequestRecord(input_len=4, max_tokens=4, sent=10.0, finished=10.5)
    record.responses = [(10.1, 1), (10.2, 1), (10.4, 2)]  # the last response carries two tokens
    s = summarize([record])
    assert s["completed"] == 1 and s["exact_output_lengths"] == 1 and s["output_tokens"] == 4
    assert s["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(400.0)
    assert s["itl_ms"]["mean"] == pytest.approx(100.0)  # gaps 100, 100, 100 ms
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert s["tokens_per_response"] == pytest.approx(4 / 3, abs=1e-3)
    assert s["output_tok_s"] == pytest.approx(4 / 0.5)


def test_summarize_counts_failed_requests_apart() -> None:
    ok = RequestRecord(2, 1, sent=0.0, finished=1.0, responses=[(0.5, 1)])
    bad = RequestRecord(2, 1, sent=0.0, finished=0.1, error="UNAVAILABLE: queue full")
    s = summarize([ok, bad])
    assert (s["completed"], s["failed"], s["errors"]) == (1, 1, ["UNAVAILABLE: queue full"])


# NOTE: only a hang reaches this: the waits it bounds take microseconds.
HANG_S = 60.0


class FakeTarget:
    """Streams `max_tokens` one-token responses from a thread; tracks requests in flight.

    No response starts before `full` requests are in flight at once (or `total` were sent): a driver that
    keeps `full` in flight reaches that whatever the machine's speed, and one that keeps fewer hangs.
    """

    name = "fake"

    def __init__(self, full: int = 1, total: int = 0) -> None:
        self.full, self.total = full, total
        self.in_flight = self.max_in_flight = self.sent = 0
        self.changed = threading.Condition()

    def __call__(self, spec: RequestSpec, on_response) -> None:
        with self.changed:
            self.in_flight += 1
            self.sent += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.changed.notify_all()

        def run() -> None:
            with self.changed:
                self.changed.wait_for(lambda: self.in_flight >= self.full or self.sent == self.total, HANG_S)
            for i in range(spec.max_tokens):
                if i == spec.max_tokens - 1:
                    with self.changed:
                        self.in_flight -= 1
                on_response(time.monotonic(), 1, i == spec.max_tokens - 1, None)

        threading.Thread(target=run, daemon=True).start()


def test_drive_keeps_the_concurrency_and_the_arrival_times() -> None:
    target = FakeTarget(full=3, total=12)
    records = drive(schedule(12, 3, 4, 100, seed=0), target, concurrency=3, timeout_s=HANG_S)
    assert target.max_in_flight == 3
    assert all(r.num_tokens == 4 and r.finished is not None for r in records)
    target = FakeTarget()
    specs = schedule(5, 3, 2, 100, rate=50.0, seed=0)
    # NOTE: the driver's clock starts 10 ms after it is called, so it starts no earlier than this. (Not
    # the first request's send time: sent late on a loaded machine, it would make the next ones look early.)
    earliest_start = time.monotonic() + 0.01
    records = drive(specs, target, timeout_s=HANG_S)
    for spec, record in zip(specs, records, strict=True):
        assert record.sent >= earliest_start + spec.arrival_s  # never early


def test_drive_records_a_request_that_cannot_be_sent() -> None:
    def refuse(spec, on_response):
        raise ConnectionError("no server")

    (record,) = drive(schedule(1, 3, 2, 100), refuse, concurrency=1, timeout_s=5)
    assert record.error == "ConnectionError: no server" and record.finished is not None


def check_consistent(summary: dict, num: int, osl: int) -> None:
    """Exact token counts, ordered percentiles, TTFT <= E2E: what any target must produce."""
    assert summary["failed"] == 0, summary["errors"]
    assert summary["completed"] == summary["exact_output_lengths"] == num
    assert summary["output_tokens"] == num * osl
    for key in ("ttft_ms", "itl_ms", "e2e_ms", "tpot_ms"):
        p = summary[key]
        assert 0 <= p["p50"] <= p["p90"] <= p["p99"], (key, p)
    assert summary["ttft_ms"]["p99"] <= summary["e2e_ms"]["p99"]
    assert summary["ttft_ms"]["p50"] <= summary["e2e_ms"]["p50"]
    assert summary["output_tok_s"] > 0 and summary["req_s"] > 0


def test_engine_direct_streams_exact_token_counts(smollm2_path: Path) -> None:
    from benchmarks.targets import EngineDirectTarget

    target = EngineDirectTarget(str(smollm2_path), {"max_model_len": 64, "kv_cache_memory_bytes": 64 << 20,
                                                   "enable_prefix_caching": False})  # fmt: skip
    try:
        specs = schedule(4, 12, 5, vocab_size=49152, seed=0)
        check_consistent(summarize(drive(specs, target, concurrency=2, timeout_s=120)), 4, 5)
    finally:
        target.close()


def test_server_counters_of_a_level() -> None:
    """benchmarks.serving reads the server's inflight_* counters (summed over label sets) before and after a
    level and derives the server-side TTFT and the stub's time in cancellation checks and sends."""
    from benchmarks.serving import parse_counters, server_side

    def page(ttft_sum, ttft_n, checks, check_s, sends, send_s) -> str:
        return "\n".join([
            "# HELP inflight_responses_sent_total Responses sent",
            "# TYPE inflight_responses_sent_total counter",
            f'inflight_time_to_first_token_seconds_sum{{model="llm",version="1"}} {ttft_sum}',
            f'inflight_time_to_first_token_seconds_count{{model="llm",version="1"}} {ttft_n}',
            f'inflight_time_to_first_token_seconds_bucket{{model="llm",version="1",le="0.1"}} {ttft_n}',
            f'inflight_cancellation_checks_total{{model="llm",version="1"}} {checks}',
            f'inflight_cancellation_check_seconds_total{{model="llm",version="1"}} {check_s}',
            f'inflight_responses_sent_total{{model="llm",version="1"}} {sends - 1}',
            'inflight_responses_sent_total{model="other",version="1"} 1',
            f'inflight_response_send_seconds_total{{model="llm",version="1"}} {send_s}',
            "nv_inference_count{model=\"llm\"} 99",
        ])  # fmt: skip

    before = parse_counters(page(1.0, 10, 100, 0.5, 400, 0.2))
    assert (
        before["inflight_responses_sent_total"] == 400
        and before["inflight_time_to_first_token_seconds_count"] == 10
    )
    after = parse_counters(page(1.5, 30, 900, 0.9, 2400, 1.2))
    figures = server_side(before, after, wall_s=4.0)
    assert figures == {
        "server_ttft_mean_ms": 25.0,  # 0.5 s over 20 first tokens
        "server_cancel_checks_per_s": 200.0,
        "server_cancel_check_busy": 0.1,
        "server_sends_per_s": 500.0,
        "server_send_busy": 0.25,
        "server_send_mean_ms": 0.5,
    }
    assert server_side(before, before, wall_s=4.0) == {}
