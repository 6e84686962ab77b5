"""A launched step's handle: its sampled tokens on their way to the host, read once as plain lists."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inflight.backend.executor.prompt_logprobs import PromptLogprobs, PromptLogprobTensors, PromptRows
from inflight.backend.executor.sampler import SamplerOutput
from inflight.backend.executor.step_inputs import PendingTokens
from inflight.batching import SchedulerOutput


@dataclass
class SampledTokens:
    """A step's sampler output on the host, row i for the step's i-th sampling request."""

    token_ids: list[int]
    logprobs: list[float] | None  # log p(sampled token), when some row asked
    top_logprobs: list[list[float]] | None  # the best alternatives, best first, when some row asked
    top_token_ids: list[list[int]] | None
    prompt_logprobs: list[PromptLogprobs] | None = None  # when some request of the step asked


class StepHandle:
    """A launched step: its sampled ids stay on the device (the next step's pending inputs) and are copied
    to the host, started at launch and read once."""

    def __init__(self, scheduled: SchedulerOutput, sample_ids: list[str], out: SamplerOutput | None,
                 device: torch.device,
                 prompt: tuple[PromptRows, PromptLogprobTensors] | None = None) -> None:  # fmt: skip
        self.scheduled = scheduled
        self.sample_ids = sample_ids  # the request of each sampled row
        # NOTE: a step may sample nothing and still have prompt log-probabilities (a prompt's first chunks).
        if out is None:
            out = SamplerOutput(torch.empty(0, dtype=torch.int64, device=device))
        self._sampled = out.sampled_token_ids
        tensors = [out.sampled_token_ids, out.logprobs, out.top_logprobs, out.top_token_ids]
        self._prompt_segments = None
        if prompt is not None:
            plan, lp = prompt
            self._prompt_segments = plan.segments
            tensors += [lp.logprobs, lp.top_logprobs, lp.top_token_ids]
        self._event = None
        if device.type == "cuda":
            # NOTE: pinned buffers and non_blocking copies: the host does not wait for the step here.
            tensors = [None if t is None else _pinned_copy(t) for t in tensors]
            self._event = torch.cuda.Event()
            self._event.record()
        self._tensors = tensors
        self.waited = False  # the host has waited for the step: its tokens can be read at no cost
        self._read: SampledTokens | None = None

    @property
    def num_requests(self) -> int:
        return len(self.scheduled.scheduled)

    @property
    def ends_a_prompt(self) -> bool:
        """The step samples some request's first token (a prefill's last chunk, not a decode)."""
        return any(e.needs_sample and len(e.token_ids) > 1 for e in self.scheduled.scheduled)

    def wait(self) -> None:
        """Until the step and its copies are done on the device."""
        if self._event is not None:
            self._event.synchronize()
        self.waited = True

    def read(self) -> SampledTokens:
        """Waits for the copies (the step's one host synchronisation) and returns them as lists."""
        if self._read is None:
            self.wait()
            tensors = self._tensors
            read = SampledTokens(*(None if t is None else t.tolist() for t in tensors[:4]))
            if self._prompt_segments is not None:
                lp = PromptLogprobTensors(*tensors[4:])
                read.prompt_logprobs = lp.to_host(self._prompt_segments)
            self._read = read
        return self._read

    def pending_tokens(self) -> PendingTokens:
        """This step's tokens as the next step's pending inputs (from the host if it was waited for)."""
        rows = {request_id: i for i, request_id in enumerate(self.sample_ids)}
        return PendingTokens(rows, self._sampled, self.read().token_ids if self.waited else None)


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
