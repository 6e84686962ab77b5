"""Test-only fault injection for the reliability suite (config parameter ``fault_injection``).

The spec is a ``;``-separated list of ``KIND:TRIGGER=N`` rules, checked inside each engine step (through
a step observer, ``LLMEngine.add_step_observer``) before the forward:

- ``step:every=N``  every N-th step that computes anything fails: its requests end with an error
  (``INTERNAL``), the engine continues;
- ``step:token=T``  a step that computes token id ``T`` (e.g. a prompt given as ``input_ids`` holding it)
  fails the same way;
- ``fatal:after=N`` the N-th step raises ``EngineDeadError``: the engine thread dies;
- ``fatal:token=T`` a step that computes token id ``T`` raises ``EngineDeadError``;
- ``stall:token=T`` (or ``every=N`` / ``after=N``) that step sleeps ``STALL_SECONDS`` before its forward,
  then runs normally: a step that hangs, with every live request open and nothing sent meanwhile.

Never set it in production: it exists so tests can prove what a fault does to a real server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from inflight.backend.engine.engine import EngineDeadError
from inflight.batching import SchedulerOutput

KINDS = ("step", "fatal", "stall")
TRIGGERS = ("every", "after", "token")
# How long a ``stall`` rule holds its step. NOTE: the stub-kill scenario kills the stub inside the stall; a
# minute leaves that kill a wide window on a loaded machine (with 5 s, a starved test thread could land it
# after the stall, in a round trip to the server, which tritonserver 2.51 may not survive).
STALL_SECONDS = 60.0


class InjectedFault(RuntimeError):
    """The recoverable fault the hook raises (ends that step's requests)."""


@dataclass(frozen=True)
class FaultRule:
    kind: str  # "step" | "fatal" | "stall"
    trigger: str  # "every" | "after" | "token"
    value: int


def parse_fault_spec(spec: str) -> list[FaultRule]:
    """``"step:every=3;fatal:token=42"`` -> rules; ValueError naming ``fault_injection`` otherwise."""
    rules = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        kind, _, rest = part.partition(":")
        trigger, _, number = rest.partition("=")
        try:
            value = int(number)
        except ValueError:
            value = -1
        if kind not in KINDS or trigger not in TRIGGERS or value < (0 if trigger == "token" else 1):
            raise ValueError(
                f"config parameter fault_injection: bad rule {part!r}; expected step|fatal|stall:every|after=N "
                f"(N >= 1) or step|fatal|stall:token=T, separated by ';'"
            )
        if kind == "step" and trigger == "after" or kind == "fatal" and trigger == "every":
            raise ValueError(f"config parameter fault_injection: {part!r}: use step:every=N or fatal:after=N")
        rules.append(FaultRule(kind, trigger, value))
    return rules


class FaultInjector:
    """A step observer (``LLMEngine.add_step_observer``) that applies the rules before each forward; counts
    the faults it raised or slept."""

    def __init__(self, rules: list[FaultRule]) -> None:
        self.rules = rules
        self.steps = 0
        self.faults = 0

    def after_step(self, scheduled: SchedulerOutput) -> None:
        pass

    def before_forward(self, scheduled: SchedulerOutput) -> None:
        if not scheduled.scheduled:
            return
        self.steps += 1
        tokens: set[int] | None = None
        for rule in self.rules:
            if rule.trigger == "token":
                if tokens is None:
                    tokens = {t for s in scheduled.scheduled for t in s.token_ids}
                hit = rule.value in tokens
            elif rule.trigger == "every":
                hit = self.steps % rule.value == 0
            else:
                hit = self.steps == rule.value
            if hit:
                self.faults += 1
                if rule.kind == "stall":
                    time.sleep(STALL_SECONDS)
                    continue
                ids = ", ".join(s.request_id for s in scheduled.scheduled)
                message = (
                    f"injected {rule.kind} fault ({rule.trigger}={rule.value}) in step {self.steps} [{ids}]"
                )
                raise EngineDeadError(message) if rule.kind == "fatal" else InjectedFault(message)
