"""The engine service with n > 1: responses per sequence (``sequence_index``), one FINAL per request after
every sequence's tokens, also when a stuck send lets the sequences' queued sends pile up out of order."""

from __future__ import annotations

import time

from inflight.backend.engine.sampling_params import SamplingParams
from inflight.backend.serving.request import GenerateRequest

from .service_doubles import HANG_S, BlockingSink, FakeSink

# NOTE: the service tests' helpers and fixtures: tiny_path, and the autouse check that nothing is sent after a
# request's final (no_send_after_a_final)
from .test_engine_service import (  # noqa: F401
    _assert_one_final_each,
    _service,
    _wait_for_finals,
    no_send_after_a_final,
    tiny_path,
)

GREEDY_N3 = SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True)


def _by_sequence(sink: FakeSink) -> dict[int, list[int]]:
    ids: dict[int, list[int]] = {}
    for outputs, _, _ in sink.responses:
        if outputs is not None:
            (index,) = outputs["sequence_index"].tolist()
            ids.setdefault(index, []).extend(outputs["output_ids"].tolist())
    return ids


def test_streamed_sequences_behind_a_stuck_send_end_with_one_final(tiny_path) -> None:  # noqa: F811
    """The first send blocks until the engine has finished all three sequences: their sends then wait in the
    order they were first queued (sequence 0's newer tokens last), and the FINAL must go with the last."""
    service = _service(tiny_path)
    sink = BlockingSink()
    try:
        service.submit(GenerateRequest([5, 6, 7], GREEDY_N3, stream=True), sink)
        assert sink.sending.wait(HANG_S)
        deadline = time.monotonic() + HANG_S
        while service.engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.01)  # NOTE: a poll for a state, not a wait for a time
        assert not service.engine.has_unfinished_requests()
        sink.release.set()
        _wait_for_finals([sink])
    finally:
        service.shutdown(drain_timeout_s=5)
    _assert_one_final_each([sink])
    ids = _by_sequence(sink)
    assert sorted(ids) == [0, 1, 2] and all(len(t) == 6 for t in ids.values())
    assert ids[0] == ids[1] == ids[2]  # greedy


def test_whole_sequences_one_response_each_the_last_final(tiny_path) -> None:  # noqa: F811
    service = _service(tiny_path)
    sinks = [FakeSink(), FakeSink()]
    try:
        service.submit(GenerateRequest([5, 6, 7], GREEDY_N3, exclude_input_in_output=True), sinks[0])
        service.submit(GenerateRequest([5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                       exclude_input_in_output=True), sinks[1])  # fmt: skip
        _wait_for_finals(sinks)
    finally:
        service.shutdown(drain_timeout_s=5)
    _assert_one_final_each(sinks)
    whole, single = sinks
    assert [r[2] for r in whole.responses] == [False, False, True]
    ids = _by_sequence(whole)
    assert sorted(ids) == [0, 1, 2] and all(t == single.token_ids for t in ids.values())
    assert _by_sequence(single) == {0: single.token_ids}
