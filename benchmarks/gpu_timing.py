"""A step observer for benchmarks: CUDA events around each step's device work, attached with
``LLMEngine.add_step_observer`` (the engine itself times nothing).

``breakdown()`` sums device time per kind of step; ``idle_gaps()`` finds where the device waited for the
host between steps. Both return None on CPU (nothing is recorded there).
"""

from __future__ import annotations

from typing import Any

import torch


class GpuStepTimer:
    """Records (start, end, is_decode, num_tokens) per step on a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        self.steps: list[tuple[torch.cuda.Event, torch.cuda.Event, bool, int]] = []
        self._start: torch.cuda.Event | None = None

    @classmethod
    def attach(cls, engine: Any) -> GpuStepTimer:
        timer = cls(engine.executor.device)
        engine.add_step_observer(timer)
        return timer

    def before_forward(self, scheduled: Any) -> None:
        if self.enabled:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def after_step(self, scheduled: Any) -> None:
        if self.enabled and self._start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            num_tokens = scheduled.num_batched_tokens
            self.steps.append((self._start, end, num_tokens == len(scheduled.scheduled), num_tokens))
            self._start = None

    def breakdown(self) -> dict[str, dict[str, float]] | None:
        """Per kind of step ("decode": one token per sequence; "prefill_or_mixed"): steps, tokens and device
        seconds; None on CPU.

        NOTE: a step's events bracket its work on the stream, so the sum leaves out the time the device
        sat idle waiting for the host: wall time minus this is the host-bound part of a run.
        """
        if not self.enabled:
            return None
        torch.cuda.synchronize(self.device)
        kinds: dict[str, dict[str, float]] = {}
        for start, end, is_decode, num_tokens in self.steps:
            kind = kinds.setdefault("decode" if is_decode else "prefill_or_mixed",
                                    {"steps": 0, "tokens": 0, "gpu_seconds": 0.0})  # fmt: skip
            kind["steps"] += 1
            kind["tokens"] += num_tokens
            kind["gpu_seconds"] += start.elapsed_time(end) / 1e3
        return kinds

    def idle_gaps(self, top: int = 5) -> dict[str, Any] | None:
        """Where the device sat idle between the timed steps (None on CPU): the total, the gaps of a
        millisecond or more, and the ``top`` largest with the step after them.

        NOTE: a step's start event runs on the stream once the work before it is done, so the time from
        one step's end event to the next one's start is the device waiting for the host (a step's
        sampling-input copies fall in between too; they take microseconds).
        """
        if not self.enabled:
            return None
        torch.cuda.synchronize(self.device)
        events = self.steps
        gaps = [
            (events[i - 1][1].elapsed_time(events[i][0]), i, events[i][2], events[i][3])
            for i in range(1, len(events))
        ]
        return {
            "steps": len(events),
            "idle_between_steps_s": round(sum(g for g, *_ in gaps) / 1e3, 4),
            "gaps_over_1ms": sum(1 for g, *_ in gaps if g >= 1.0),
            "idle_in_gaps_over_1ms_s": round(sum(g for g, *_ in gaps if g >= 1.0) / 1e3, 4),
            "largest": [
                {
                    "ms": round(g, 2),
                    "before_step": i,
                    "kind": "decode" if d else "prefill_or_mixed",
                    "tokens": n,
                }
                for g, i, d, n in sorted(gaps, reverse=True)[:top]
            ],
        }
