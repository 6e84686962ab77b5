"""The engine service's threads: exactly one final per request on every path, faults isolated.

The threads' order is set by the test doubles (service_doubles.py), never by how fast a thread runs: a gate on
the engine thread, a sender that blocks until released, a clock per thread.
"""

from __future__ import annotations

import pytest

from inflight.backend.engine.args import EngineArgs
from inflight.backend.engine.engine import LLMEngine
from inflight.backend.engine.sampling_params import SamplingParams
from inflight.backend.serving.metrics import EngineMetrics
from inflight.backend.serving.request import CLOSED_SINK, ErrorKind, GenerateRequest
from inflight.backend.serving.service import EngineService

from ..conftest import copy_tokenizer
from ..engine.tiny_models import build_tiny_checkpoint
from .service_doubles import HANG_S, BlockingSink, EngineGate, FakeSink, ThreadClock


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, smollm2_path):
    path = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("svc"))
    copy_tokenizer(smollm2_path, path)
    return path


@pytest.fixture(autouse=True)
def no_send_after_a_final(caplog):
    """A response sent after a request's final one goes to its closed sink, which raises; the service logs
    that (a sink that saw the final never sees the stray). None may be logged."""
    yield
    messages = [r.getMessage() for r in caplog.get_records("call")]  # NOTE: `.records` is teardown's only
    assert not [m for m in messages if "sending a response" in m]


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


def _wait_for_finals(sinks) -> None:
    for sink in sinks:
        assert sink.done.wait(HANG_S), "no final response"


def _assert_one_final_each(sinks) -> None:
    """Call after shutdown, which joins both threads: a stray response would be recorded by then."""
    for sink in sinks:
        assert sink.num_final == 1 and sink.responses[-1][2], sink.responses


def test_every_path_ends_with_exactly_one_final(tiny_path, monkeypatch) -> None:
    service = _service(tiny_path, max_queue_size=4, max_num_seqs=2)
    gate = EngineGate(service, monkeypatch)
    # NOTE: every request goes in at once, before any step: the waiting queue holds all that were accepted.
    gate.hold_adds()
    try:
        ok = [FakeSink() for _ in range(2)]
        for sink in ok:
            service.submit(
                GenerateRequest([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True), stream=True), sink
            )
        bad = FakeSink()
        service.submit(GenerateRequest([5] * 200, SamplingParams(max_tokens=4)), bad)
        too_many = FakeSink()  # the engine's own limit on max_tokens, shared with LLM
        service.submit(GenerateRequest([5, 6], SamplingParams(max_tokens=100_000)), too_many)
        cancelled = FakeSink(cancel_at_check=3)
        service.submit(
            GenerateRequest([8, 9], SamplingParams(max_tokens=100, ignore_eos=True), stream=True), cancelled
        )
        burst = [FakeSink() for _ in range(8)]
        for sink in burst:
            service.submit(GenerateRequest([3, 4], SamplingParams(max_tokens=2, ignore_eos=True)), sink)
        gate.release_adds()
        _wait_for_finals([*ok, bad, too_many, cancelled, *burst])
    finally:
        gate.release_adds()
        service.shutdown(drain_timeout_s=5)
    _assert_one_final_each([*ok, bad, too_many, cancelled, *burst])
    for sink in ok:  # every token exactly once
        assert len(sink.token_ids) == 40 and sink.error is None
    assert bad.error.kind is ErrorKind.INVALID_ARG and bad.error.message.startswith(
        "input_ids: prompt has 200"
    )
    assert too_many.error.kind is ErrorKind.INVALID_ARG
    assert too_many.error.message.startswith("max_tokens is 100000, more than max_model_len")
    # It waits behind the two running streams (max_num_seqs=2), polled every step: found at its third check.
    assert cancelled.responses == [(None, None, True)] and cancelled.checks == 3
    # Queued: the two streams, the cancelled one and the burst's first fill max_queue_size=4; the rest is
    # refused at once.
    assert [s.error.kind if s.error else None for s in burst] == [None] + [ErrorKind.UNAVAILABLE] * 7
    assert len(burst[0].responses) == 1 and len(burst[0].token_ids) == 2 + 2  # not streamed: prompt first
    assert service.engine.scheduler.kv_cache_manager.num_used_blocks == 0


def test_a_request_is_submitted_once_and_lets_go_of_its_sink_with_its_final(tiny_path) -> None:
    """submit gives the request its id, sink and arrival; the request keeps its own state until its final,
    which releases the sink (a Triton response sender keeps the model loaded while referenced)."""
    service = _service(tiny_path)
    request, sink = GenerateRequest([5, 6], SamplingParams(max_tokens=3, ignore_eos=True)), FakeSink()
    try:
        assert request.request_id == "" and request.sink is CLOSED_SINK
        request_id = service.submit(request, sink)
        assert request.request_id == request_id
        _wait_for_finals([sink])
        with pytest.raises(ValueError, match="submitted already"):
            service.submit(request, FakeSink())
    finally:
        service.shutdown()
    _assert_one_final_each([sink])
    assert sink.error is None and request.sink is CLOSED_SINK and service.num_open == 0
    assert request.prompt_token_ids == [5, 6] and request.num_output_tokens == 3
    late, late_sink = GenerateRequest([5], SamplingParams(max_tokens=3)), FakeSink()
    service.submit(late, late_sink)  # after shutdown: refused at once, by submit itself
    assert late_sink.error.kind is ErrorKind.UNAVAILABLE and late.sink is CLOSED_SINK


def test_a_failing_step_ends_its_requests_and_the_engine_goes_on(tiny_path, monkeypatch) -> None:
    service = _service(tiny_path)
    runner = service.engine.executor.runner
    real_execute = runner.execute
    calls = {"n": 0}

    def flaky(out, pending=None, prompt_logprobs=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return real_execute(out, pending, prompt_logprobs)

    monkeypatch.setattr(runner, "execute", flaky)
    try:
        hit = FakeSink()
        service.submit(
            GenerateRequest([5, 6], SamplingParams(max_tokens=10, ignore_eos=True), stream=True), hit
        )
        _wait_for_finals([hit])
        assert hit.error.kind is ErrorKind.INTERNAL and "injected fault" in hit.error.message
        after = FakeSink()
        service.submit(GenerateRequest([5, 6], SamplingParams(max_tokens=3, ignore_eos=True)), after)
        _wait_for_finals([after])
        assert after.error is None and service.is_healthy
    finally:
        service.shutdown(drain_timeout_s=5)
    _assert_one_final_each([hit, after])


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
    _wait_for_finals([live])
    assert live.error.kind is ErrorKind.UNAVAILABLE and "scheduler invariant broken" in live.error.message
    assert not service.is_healthy
    assert gauges["inflight_engine_healthy"].value == 0
    late = FakeSink()
    service.submit(GenerateRequest([5, 6], SamplingParams(max_tokens=5)), late)
    _wait_for_finals([late])
    service.shutdown(drain_timeout_s=1)
    _assert_one_final_each([live, late])
    assert late.error.kind is ErrorKind.UNAVAILABLE


# NOTE: binary fractions, so that sums of them are exact in floating point.
SEND_S, CHECK_S = 2.0**-6, 2.0**-10


class TimedSink(FakeSink):
    """A sender whose every response costs SEND_S and every cancellation check CHECK_S, on the clock of
    the thread that calls it."""

    def __init__(self, clock: ThreadClock) -> None:
        super().__init__()
        self.clock = clock

    def send(self, outputs, error, final) -> None:
        self.clock.advance(SEND_S)
        super().send(outputs, error, final)

    def is_cancelled(self) -> bool:
        self.clock.advance(CHECK_S)
        return super().is_cancelled()


def test_the_triton_layers_time_is_in_the_metrics(tiny_path, monkeypatch) -> None:
    """Cancellation checks (engine thread) and response sends (response thread), counted and timed."""
    clock = ThreadClock(monkeypatch)
    counters: dict[str, FakeMetric] = {}
    metrics = EngineMetrics(lambda name, *_: counters.setdefault(name, FakeMetric()), {})
    service = _service(tiny_path, metrics)
    sinks = [TimedSink(clock), TimedSink(clock)]
    n = 24
    try:
        for sink, stream in zip(sinks, (True, False), strict=True):
            service.submit(
                GenerateRequest([5, 6, 7], SamplingParams(max_tokens=n, ignore_eos=True), stream=stream), sink
            )
        _wait_for_finals(sinks)
    finally:
        service.shutdown()
    _assert_one_final_each(sinks)
    # The non-streamed one: one response, its ids the prompt's and the output's.
    assert [len(s.token_ids) for s in sinks] == [n, 3 + n] and len(sinks[1].responses) == 1
    # cancel_poll_s=0 polls every step, and each of a request's tokens but the first (which a small step
    # may give before the next one) comes from a step of its own while the request is live.
    assert all(s.checks >= n - 1 for s in sinks), [s.checks for s in sinks]
    sends = sum(len(sink.responses) for sink in sinks)
    checks = sum(sink.checks for sink in sinks)
    assert counters["inflight_responses_sent_total"].value == sends
    assert counters["inflight_cancellation_checks_total"].value == checks
    assert counters["inflight_response_send_seconds_total"].value == SEND_S * sends
    assert counters["inflight_cancellation_check_seconds_total"].value == CHECK_S * checks


def test_the_engines_long_lived_objects_are_out_of_the_collectors_way(tiny_path) -> None:
    """A serving engine freezes what exists at start (model, tokenizer, block pool): full collections do not
    walk it while serving; shutdown unfreezes it so a reloaded model's old engine can be freed."""
    import gc

    service = _service(tiny_path)
    try:
        assert gc.get_freeze_count() > 0
        model = service.engine.executor.runner.model
        assert all(obj is not model for obj in gc.get_objects(generation=2))
        sink = FakeSink()
        service.submit(GenerateRequest([5, 6], SamplingParams(max_tokens=3, ignore_eos=True)), sink)
        _wait_for_finals([sink])
    finally:
        service.shutdown()
    _assert_one_final_each([sink])
    assert sink.error is None and len(sink.responses) == 1
    assert gc.get_freeze_count() == 0
    assert any(obj is model for obj in gc.get_objects(generation=2))


def test_shutdown_drains_then_ends_the_rest(tiny_path, monkeypatch) -> None:
    """Shutdown lets live requests run during its drain; what is still live at the drain's end gets
    UNAVAILABLE; a request after it is refused at once."""
    drain_s = 5.0  # on the fake clock: the drain ends when the test moves the clock past it
    clock = ThreadClock(monkeypatch)
    service = _service(tiny_path)
    gate = EngineGate(service, monkeypatch)
    gate.close()  # nothing runs before shutdown has begun
    short, endless = FakeSink(), FakeSink()
    short_id = service.submit(
        GenerateRequest([5], SamplingParams(max_tokens=3, ignore_eos=True), stream=True), short
    )
    service.submit(
        GenerateRequest([6], SamplingParams(max_tokens=120, ignore_eos=True), stream=True), endless
    )
    drain_waits = []

    def drain_wait(seconds: float) -> None:
        """Shutdown's drain loop waits here: the engine runs until `short` has ended, then time is up."""
        drain_waits.append(seconds)
        gate.close_when(lambda out: out.request_id == short_id and out.finished)
        gate.open()
        assert short.done.wait(HANG_S), "the short request did not finish during the drain"
        clock.advance(drain_s)

    clock.on_sleep = drain_wait
    try:
        service.shutdown(drain_timeout_s=drain_s)
    finally:
        gate.open()
    assert len(drain_waits) == 1
    _assert_one_final_each([short, endless])
    assert short.error is None and len(short.token_ids) == 3
    assert endless.error.kind is ErrorKind.UNAVAILABLE and len(endless.token_ids) < 120
    refused = FakeSink()
    service.submit(GenerateRequest([5], SamplingParams(max_tokens=3)), refused)
    assert refused.num_final == 1 and refused.error.kind is ErrorKind.UNAVAILABLE


def test_a_slow_sender_gets_coalesced_responses_with_every_token(tiny_path, monkeypatch) -> None:
    """While a stream's response is stuck in its sender, the engine goes on and the stream's new tokens wait
    unsent: once the sender is free they go out together, in one response."""
    from inflight import LLM

    prompt, n = [5, 6, 7, 8], 60
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    reference = LLM(str(tiny_path), max_model_len=128).generate([prompt], params)[0]
    service = _service(tiny_path)
    gate = EngineGate(service, monkeypatch)
    slow, other = BlockingSink(), FakeSink()
    try:
        gate.close()  # until the ids are known
        slow_id = service.submit(GenerateRequest(prompt, params, stream=True), slow)
        service.submit(GenerateRequest(prompt, params, stream=True), other)
        gate.close_when(lambda out: out.request_id == slow_id and out.new_token_ids)
        gate.open()
        # Its first token's response was taken (and is stuck) while the engine stood still after that token.
        assert slow.sending.wait(HANG_S), "no response was sent"
        gate.open()
        assert gate.wait_idle(), "the engine did not finish the requests"
        slow.release.set()
        _wait_for_finals([slow, other])
    finally:
        slow.release.set()
        gate.open()
        service.shutdown()
    _assert_one_final_each([slow, other])
    for sink in (slow, other):
        assert sink.token_ids == reference.token_ids and sink.text == reference.text
        assert sink.error is None and all(len(o["output_ids"]) for o, _, _ in sink.responses)
    # The stuck response held the first token; every other one came while it was stuck.
    assert [(len(o["output_ids"]), final) for o, _, final in slow.responses] == [(1, False), (n - 1, True)]
    # The other stream shares the stuck response thread: at most its first token went out before.
    assert len(other.responses) <= 2


def test_tokens_whose_text_is_held_back_still_stream(tiny_path, monkeypatch) -> None:
    """A long stop string holds the text back (it might be the stop string's start): the client still
    gets a response per token as it comes (empty text), and all the text once the request ends."""
    from inflight import LLM

    stop = "a stop string that this random model will never write; " * 10  # longer than the output's text
    prompt, n = [5, 6, 7, 8], 20
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, stop=[stop])
    reference = LLM(str(tiny_path), max_model_len=128).generate([prompt], params)[0]
    assert reference.finish_reason == "length" and 0 < len(reference.text) < len(stop) - 1  # all held back
    service = _service(tiny_path)
    gate = EngineGate(service, monkeypatch)
    sink = FakeSink()
    try:
        gate.close()  # until the id is known
        request_id = service.submit(GenerateRequest(prompt, params, stream=True), sink)
        for k in range(1, n + 1):  # NOTE: one token at a time, each sent before the next is made
            gate.close_when(lambda out: out.request_id == request_id and out.new_token_ids)
            gate.open()
            assert sink.wait_for_tokens(k), f"token {k} was not sent"
        _wait_for_finals([sink])
    finally:
        gate.open()
        service.shutdown()
    _assert_one_final_each([sink])
    ids = [o["output_ids"].tolist() for o, _, _ in sink.responses]
    assert ids == [[t] for t in reference.token_ids] and sink.text == reference.text
    assert all(o["text_output"][0] == b"" for o, _, final in sink.responses if not final)


def test_cancellation_polling_reaches_every_stream_in_turn(tiny_path, monkeypatch) -> None:
    args = EngineArgs.from_options(str(tiny_path), {"max_model_len": 128})
    service = EngineService(LLMEngine(args), None, cancel_poll_s=0.0, cancel_poll_batch=2)
    gate = EngineGate(service, monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    checked: list[FakeSink] = []
    gate.hold_adds()  # all six go in at once, before the first poll
    try:
        sinks = [FakeSink(check_log=checked) for _ in range(5)] + [FakeSink(1, check_log=checked)]
        for sink in sinks:
            service.submit(GenerateRequest([5, 6, 7], params, stream=True), sink)
        gate.release_adds()
        _wait_for_finals(sinks)
    finally:
        gate.release_adds()
        service.shutdown()
    _assert_one_final_each(sinks)
    cancelled = sinks[-1]
    # Two checks a step, in turn: the first three steps reach each of the six streams once.
    assert checked[:6] == sinks
    # Found at its first check (the third step), long before its 100 tokens: at most one token a step.
    assert cancelled.checks == 1 and cancelled.responses[-1] == (None, None, True)
    assert len(cancelled.token_ids) <= 3
    assert all(len(s.token_ids) == 100 and s.error is None for s in sinks[:-1])
