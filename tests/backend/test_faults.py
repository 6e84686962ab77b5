"""The test-only fault injection's rules: parsing (errors name the parameter) and what each kind does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from inflight.backend.engine.engine import EngineDeadError
from inflight.backend.serving import faults
from inflight.backend.serving.faults import FaultInjector, FaultRule, InjectedFault, parse_fault_spec
from inflight.batching import ScheduledRequest, SchedulerOutput


def _step(*token_lists: list[int]) -> SchedulerOutput:
    scheduled = [
        ScheduledRequest(f"req-{i}", tokens, 0, [i], needs_sample=True)
        for i, tokens in enumerate(token_lists)
    ]
    return SchedulerOutput(scheduled, sum(len(t) for t in token_lists))


def test_parse_rules_and_refuse_bad_ones() -> None:
    assert parse_fault_spec(" step:every=3; fatal:token=7 ;stall:token=9;") == [
        FaultRule("step", "every", 3), FaultRule("fatal", "token", 7), FaultRule("stall", "token", 9),
    ]  # fmt: skip
    for bad in ("hang:token=1", "step:token=x", "stall:every=0", "step:after=2", "fatal:every=2", "stall"):
        with pytest.raises(ValueError, match="fault_injection"):
            parse_fault_spec(bad)


def test_each_kind_does_what_it_says(monkeypatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(faults, "time", SimpleNamespace(sleep=slept.append))  # the stall's sleep, recorded
    hook = FaultInjector(parse_fault_spec("step:token=5;fatal:token=6;stall:token=7"))
    hook.before_forward(_step([1, 2], [3]))  # no marker: nothing happens
    with pytest.raises(InjectedFault, match=r"step fault \(token=5\).*req-0, req-1"):
        hook.before_forward(_step([1], [4, 5]))
    with pytest.raises(EngineDeadError, match="fatal fault"):
        hook.before_forward(_step([6]))
    assert slept == []
    hook.before_forward(_step([1], [7]))  # a stall: the step is held, then goes on without an error
    assert slept == [faults.STALL_SECONDS]
    assert hook.faults == 3
    hook.before_forward(_step())  # an empty step is not counted
    assert hook.steps == 4
