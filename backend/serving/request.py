"""The serving floor's one request type, ``GenerateRequest``, and where its responses go.

A request is built from a Triton request's inputs (``triton_inputs.parse_request``) or by a caller that
drives the service directly (tests, ``benchmarks/targets.py``): the parsed fields. ``EngineService.submit``
then gives it an id, its ``ResponseSink`` and its arrival time, and the service's threads keep its state
in the remaining fields until its final response.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from inflight.backend.engine.outputs import RequestOutput, TokenLogprob
from inflight.backend.engine.prompts import Prompt
from inflight.backend.engine.sampling_params import SamplingParams


class ErrorKind(enum.Enum):
    INVALID_ARG = "INVALID_ARG"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class ServiceError:
    kind: ErrorKind
    message: str


class ResponseSink(Protocol):
    """Where one request's responses go (a Triton response sender, or a test double)."""

    def send(
        self, outputs: dict[str, np.ndarray] | None, error: ServiceError | None, final: bool
    ) -> None: ...

    def is_cancelled(self) -> bool: ...


class _ClosedSink:
    """A request's sink before ``submit`` gives it one, and after its final response (the response sender
    released): nothing may be sent to it."""

    def send(self, outputs: object, error: object, final: bool) -> None:
        raise RuntimeError("the final response was already sent")

    def is_cancelled(self) -> bool:
        return True


CLOSED_SINK: ResponseSink = _ClosedSink()


@dataclass
class SequenceState:
    """One sequence of a request on its way out (a request with n > 1 has n; responses are per sequence)."""

    index: int
    text: list[str] = field(default_factory=list)  # non-streamed: all text so far
    token_ids: list[int] = field(default_factory=list)  # non-streamed: all ids; streamed: ids not yet sent
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # The prompt's logprobs (SamplingParams.prompt_logprobs, sequence 0) until a response carries them.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Streamed: text not yet sent, the newest delta, and whether the response thread has it queued.
    unsent_text: list[str] = field(default_factory=list)
    last_delta: RequestOutput | None = None
    send_queued: bool = False


@dataclass
class GenerateRequest:
    """One generation request: what the client asked, then its state between submit and its final response."""

    prompt: Prompt
    params: SamplingParams
    stream: bool = False
    exclude_input_in_output: bool = False
    return_finish_reason: bool = False
    return_cumulative_logprob: bool = False
    return_logprobs: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    tools: list[dict[str, Any]] | None = None  # for the chat template, with messages
    # Set by EngineService.submit.
    request_id: str = ""
    sink: ResponseSink = field(default=CLOSED_SINK, repr=False)
    arrival: float = 0.0
    # The engine thread's, from the request's admission on.
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)
    prompt_text: str = field(default="", repr=False)
    # One per sequence (SamplingParams.n), by index.
    sequences: list[SequenceState] = field(default_factory=list, repr=False)
    # Streamed: the request's last delta (every sequence finished) is in; the FINAL goes with the last send.
    all_finished: bool = False
    num_output_tokens: int = 0  # all sequences
    first_token_time: float | None = None
    last_token_time: float | None = None
    cancelled: bool = False
