"""The engine service's threads: exactly one final per request on every path, faults isolated."""

from __future__ import annotations

import threading
import time

import pytest

from inflight.backend.engine import LLMEngine
from inflight.backend.engine_args import EngineArgs
from inflight.backend.engine_service import EngineService, ErrorKind
from inflight.backend.metrics import EngineMetrics
from inflight.backend.sampling_params import SamplingParams
from inflight.backend.triton_inputs import GenerateRequest

from ..conftest import copy_tokenizer
from ..engine.tiny_models import build_tiny_checkpoint


class FakeSink:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.responses: list[tuple] = []
        self.num_final = 0
        self.cancel_after = cancel_after
        self.done = threading.Event()

    def send(self, outputs, error, final) -> None:
        self.responses.append((outputs, error, final))
        self.num_final += int(final)
        if final:
            self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.responses) >= self.cancel_after

    @property
    def text(self) -> str:
        return "".join(o["text_output"][0].decode() for o, _, _ in self.responses if o is not None)

    @property
    def error(self):
        return next((e for _, e, _ in self.responses if e is not None), None)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, smollm2_path):
    path = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("svc"))
    copy_tokenizer(smollm2_path, path)
    return path


class FakeMetric:
    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def increment(self, value: float) -> None:
        self.value += value

    def observe(self, value: float) -> None:
        self.value += 1


def _service(path, metrics: EngineMetrics | None = None, **options) -> EngineService:
    args = EngineArgs.from_options(str(path), {"max_model_len": 128, **options})
    return EngineService(LLMEngine(args), metrics, cancel_poll_s=0.0)


def _wait(sinks, timeout=60.0) -> None:
    for sink in sinks:
        assert sink.done.wait(timeout), "no final response"
    time.sleep(0.05)  # any stray response after the final would land now


def test_every_path_ends_with_exactly_one_final(tiny_path) -> None:
    service = _service(tiny_path, max_queue_size=4, max_num_seqs=2)
    try:
        ok = [FakeSink() for _ in range(2)]
        for sink in ok:
            service.submit(
                GenerateRequest([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True), stream=True), sink
            )
        bad = FakeSink()
        service.submit(GenerateRequest([5] * 200, SamplingParams(max_tokens=4)), bad)
        cancelled = FakeSink(cancel_after=2)
        service.submit(
            GenerateRequest([8, 9], SamplingParams(max_tokens=100, ignore_eos=True), stream=True), cancelled
        )
        burst = [FakeSink() for _ in range(8)]
        for sink in burst:
            service.submit(GenerateRequest([3, 4], SamplingParams(max_tokens=2, ignore_eos=True)), sink)
        _wait([*ok, bad, cancelled, *burst])
        for sink in [*ok, bad, cancelled, *burst]:
            assert sink.num_final == 1 and sink.responses[-1][2]
        for sink in ok:  # every token exactly once (a busy sender may coalesce several in one response)
            assert sum(len(o["output_ids"]) for o, _, _ in sink.responses) == 40 and sink.error is None
        assert bad.error.kind is ErrorKind.INVALID_ARG and "max_model_len" in bad.error.message
        assert cancelled.responses[-1] == (None, None, True) and len(cancelled.responses) < 100
        refused = [s for s in burst if s.error is not None]
        assert refused and all(s.error.kind is ErrorKind.UNAVAILABLE for s in refused)
        assert all(s.error is None and len(s.responses) == 1 for s in burst if s not in refused)
    finally:
        service.shutdown(drain_timeout_s=5)
    assert service.engine.scheduler.kv_cache_manager.num_used_blocks == 0


def test_a_failing_step_ends_its_requests_and_the_engine_goes_on(tiny_path, monkeypatch) -> None:
    service = _service(tiny_path)
    runner = service.engine.runner
    real_execute = runner.execute
    calls = {"n": 0}

    def flaky(out, pending=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return real_execute(out, pending)

    monkeypatch.setattr(runner, "execute", flaky)
    try:
        hit = FakeSink()
        service.submit(
            GenerateRequest([5, 6], SamplingParams(max_tokens=10, ignore_eos=True), stream=True), hit
        )
        _wait([hit])
        assert hit.error.kind is ErrorKind.INTERNAL and "injected fault" in hit.error.message
        after = FakeSink()
        service.submit(GenerateRequest([5, 6], SamplingParams(max_tokens=3, ignore_eos=True)), after)
        _wait([after])
        assert after.error is None and service.is_healthy
    finally:
        service.shutdown(drain_timeout_s=5)


def test_a_dead_engine_fails_live_and_new_requests_and_reports_unhealthy(tiny_path, monkeypatch) -> None:
    gauges: dict[str, FakeMetric] = {}
    metrics = EngineMetrics(lambda name, *_: gauges.setdefault(name, FakeMetric()), {})
    service = _service(tiny_path, metrics)
    assert gauges["inflight_engine_healthy"].value == 1

    def broken():
        raise RuntimeError("scheduler invariant broken")

    live = FakeSink()
    monkeypatch.setattr(service.engine.scheduler, "schedule", broken)
    service.submit(GenerateRequest([5, 6], SamplingParams(max_tokens=5)), live)
    _wait([live])
    assert live.error.kind is ErrorKind.UNAVAILABLE and "scheduler invariant broken" in live.error.message
    assert not service.is_healthy
    assert gauges["inflight_engine_healthy"].value == 0
    late = FakeSink()
    service.submit(GenerateRequest([5, 6], SamplingParams(max_tokens=5)), late)
    _wait([late])
    assert late.num_final == 1 and late.error.kind is ErrorKind.UNAVAILABLE
    service.shutdown(drain_timeout_s=1)


class TimedSink(FakeSink):
    """A sender that takes 20 ms a response and 1 ms a cancellation check, and counts the checks."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    def send(self, outputs, error, final) -> None:
        time.sleep(0.02)
        super().send(outputs, error, final)

    def is_cancelled(self) -> bool:
        self.checks += 1
        time.sleep(0.001)
        return False


def test_the_triton_layers_time_is_in_the_metrics(tiny_path) -> None:
    """Cancellation checks (engine thread) and response sends (response thread), counted and timed."""
    counters: dict[str, FakeMetric] = {}
    metrics = EngineMetrics(lambda name, *_: counters.setdefault(name, FakeMetric()), {})
    service = _service(tiny_path, metrics)
    sinks = [TimedSink(), TimedSink()]
    for sink, stream in zip(sinks, (True, False), strict=True):
        service.submit(
            GenerateRequest([5, 6, 7], SamplingParams(max_tokens=24, ignore_eos=True), stream=stream), sink
        )
    _wait(sinks)
    service.shutdown()
    sends = sum(len(sink.responses) for sink in sinks)
    checks = sum(sink.checks for sink in sinks)
    assert sends >= 3 and checks >= 3  # the stream got several responses; cancel_poll_s=0 polls every step
    assert counters["inflight_responses_sent_total"].value == sends
    assert counters["inflight_cancellation_checks_total"].value == checks
    assert 0.02 * sends <= counters["inflight_response_send_seconds_total"].value < 0.02 * sends + 2.0
    assert (
        0.001 * checks <= counters["inflight_cancellation_check_seconds_total"].value < 0.001 * checks + 2.0
    )


def test_the_engines_long_lived_objects_are_out_of_the_collectors_way(tiny_path) -> None:
    """A serving engine freezes what exists at start (model, tokenizer, block pool): full collections do not
    walk it while serving; shutdown unfreezes it so a reloaded model's old engine can be freed."""
    import gc

    service = _service(tiny_path)
    try:
        assert gc.get_freeze_count() > 0
        model = service.engine.runner.model
        assert all(obj is not model for obj in gc.get_objects(generation=2))
        sink = FakeSink()
        service.submit(GenerateRequest([5, 6], SamplingParams(max_tokens=3, ignore_eos=True)), sink)
        _wait([sink])
        assert sink.error is None and len(sink.responses) == 1
    finally:
        service.shutdown()
    assert gc.get_freeze_count() == 0
    assert any(obj is model for obj in gc.get_objects(generation=2))


def test_shutdown_drains_then_ends_the_rest(tiny_path) -> None:
    service = _service(tiny_path)
    short, endless = FakeSink(), FakeSink()
    service.submit(GenerateRequest([5], SamplingParams(max_tokens=3, ignore_eos=True), stream=True), short)
    service.submit(
        GenerateRequest([6], SamplingParams(max_tokens=120, ignore_eos=True), stream=True), endless
    )
    start = time.monotonic()
    service.shutdown(drain_timeout_s=0.3)
    assert time.monotonic() - start < 10
    assert short.num_final == 1 and short.error is None
    assert endless.num_final == 1
    assert endless.error is None or endless.error.kind is ErrorKind.UNAVAILABLE
    refused = FakeSink()
    service.submit(GenerateRequest([5], SamplingParams(max_tokens=3)), refused)
    assert refused.num_final == 1 and refused.error.kind is ErrorKind.UNAVAILABLE


class SlowSink(FakeSink):
    """A sender that takes 50 ms per response (a saturated Triton response path).

    NOTE: well above a tiny model's step even on a loaded 2-core CI machine (at 20 ms, CI once got 34
    responses for 60 tokens)."""

    def send(self, outputs, error, final) -> None:
        time.sleep(0.05)
        super().send(outputs, error, final)


def test_a_slow_sender_gets_coalesced_responses_with_every_token(tiny_path) -> None:
    from inflight import LLM

    prompt, n = [5, 6, 7, 8], 60
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    reference = LLM(str(tiny_path), max_model_len=128).generate([prompt], params)[0]
    service = _service(tiny_path)
    try:
        slow, fast = SlowSink(), FakeSink()
        service.submit(GenerateRequest(prompt, params, stream=True), slow)
        service.submit(GenerateRequest(prompt, params, stream=True), fast)
        _wait([slow, fast])
    finally:
        service.shutdown()
    for sink in (slow, fast):
        ids = [i for o, _, _ in sink.responses for i in o["output_ids"].tolist()]
        assert ids == reference.token_ids and sink.text == reference.text
        assert sink.num_final == 1 and sink.responses[-1][2] and sink.error is None
        assert all(len(o["output_ids"]) for o, _, _ in sink.responses)  # no response without a token
    # The steps outpace a 50 ms sender: it gets fewer, larger responses instead of falling behind.
    assert len(slow.responses) < n // 2


def test_tokens_whose_text_is_held_back_still_stream(tiny_path) -> None:
    """A long stop string holds the text back (it might be the stop string's start): the client still
    gets a response per token as it comes (empty text), and all the text once the request ends."""
    from inflight import LLM

    stop = "a stop string that this random model will never write; " * 10  # longer than the output's text
    prompt, n = [5, 6, 7, 8], 20
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, stop=[stop])
    reference = LLM(str(tiny_path), max_model_len=128).generate([prompt], params)[0]
    assert reference.finish_reason == "length" and 0 < len(reference.text) < len(stop) - 1  # all held back
    service = _service(tiny_path)
    try:
        sink = FakeSink()
        service.submit(GenerateRequest(prompt, params, stream=True), sink)
        _wait([sink])
    finally:
        service.shutdown()
    ids = [o["output_ids"].tolist() for o, _, _ in sink.responses]
    assert sum(ids, []) == reference.token_ids and sink.text == reference.text and sink.num_final == 1
    assert len(ids) > n // 2 and all(ids)  # streamed token by token (a busy sender may merge a few)
    assert all(o["text_output"][0] == b"" for o, _, final in sink.responses if not final)


def test_cancellation_polling_reaches_every_stream_in_turn(tiny_path) -> None:
    args = EngineArgs.from_options(str(tiny_path), {"max_model_len": 128})
    service = EngineService(LLMEngine(args), None, cancel_poll_s=0.0, cancel_poll_batch=2)
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    try:
        sinks = [FakeSink() for _ in range(5)] + [FakeSink(cancel_after=3)]
        for sink in sinks:
            service.submit(GenerateRequest([5, 6, 7], params, stream=True), sink)
        _wait(sinks)
    finally:
        service.shutdown()
    cancelled = sinks[-1]
    assert cancelled.num_final == 1 and cancelled.responses[-1] == (None, None, True)
    # Checked 2 at a time among 6 streams: it is found within a few polls, long before its 100 tokens.
    assert 3 <= len(cancelled.responses) <= 20
    assert all(s.num_final == 1 and len(s.text) > 0 and s.error is None for s in sinks[:-1])
