"""What the client returns: streamed deltas, whole results, and the one exception type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Triton's HTTP status for each server error code (HTTP carries the code; gRPC stream errors do not).
_HTTP_STATUS = {
    400: "INVALID_ARG",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNSUPPORTED",
    503: "UNAVAILABLE",
}
# gRPC status codes, as tritonclient prints them, to Triton's names.
_GRPC_STATUS = {
    "StatusCode.INVALID_ARGUMENT": "INVALID_ARG",
    "StatusCode.NOT_FOUND": "NOT_FOUND",
    "StatusCode.ALREADY_EXISTS": "ALREADY_EXISTS",
    "StatusCode.CANCELLED": "CANCELLED",
    "StatusCode.INTERNAL": "INTERNAL",
    "StatusCode.UNIMPLEMENTED": "UNSUPPORTED",
    "StatusCode.UNAVAILABLE": "UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED": "DEADLINE_EXCEEDED",
    "StatusCode.RESOURCE_EXHAUSTED": "UNAVAILABLE",
}


class InflightError(Exception):
    """A request failed. `message` is the server's (or the transport's) message.

    `status` is Triton's error code (`INVALID_ARG`, `UNAVAILABLE`, `NOT_FOUND`, `INTERNAL`, ...) as far as
    the protocol tells it: from the HTTP status (NOTE: Triton 2.51's generate endpoints answer every error
    the model sends with 400, so INVALID_ARG) and from gRPC call errors; `UNAVAILABLE` when the server
    cannot be reached. An error sent inside a gRPC stream carries only its message: `status` is None.
    """

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(f"[{status}] {message}" if status else message)
        self.message = message
        self.status = status

    @classmethod
    def from_http(cls, http_status: int, message: str) -> InflightError:
        return cls(message, _HTTP_STATUS.get(http_status, f"HTTP_{http_status}"))

    @classmethod
    def from_grpc(cls, message: str, grpc_status: str | None) -> InflightError:
        if grpc_status is None:
            return cls(message, None)
        return cls(message, _GRPC_STATUS.get(grpc_status, grpc_status.removeprefix("StatusCode.")))


class ModelUnavailableError(InflightError):
    """A streamed request was ended by the client: no response came for a while and the model is not ready
    (or the server not live): Triton does not end the requests of a backend that died, so this is raised
    instead of waiting forever (gRPC streams; `liveness_s` of `InflightClient`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "UNAVAILABLE")


@dataclass
class Delta:
    """One streamed response: the new text and token ids since the previous one.

    The last delta of a request has `finished=True` (it may hold no text). Counts, `finish_reason` and
    `cumulative_logprob` are those the server sent with this response, None when it sent none.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None  # tokens in this delta (the vLLM backend's convention)
    cumulative_logprob: float | None = None
    logprobs: list[Any] | None = None  # one entry per new token (the server's JSON, parsed)


@dataclass
class Result:
    """A whole completion (`InflightClient.generate`)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    cumulative_logprob: float | None = None
    logprobs: list[Any] | None = None
    time_to_first_token_s: float | None = None
    latency_s: float | None = None

    def add(self, delta: Delta) -> None:
        """Fold one delta in: texts, ids, logprobs and output counts add up; the latest other value wins."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.num_output_tokens is not None:
            self.num_output_tokens = (self.num_output_tokens or 0) + delta.num_output_tokens
        for name in ("finish_reason", "num_input_tokens", "cumulative_logprob"):
            value = getattr(delta, name)
            if value is not None:
                setattr(self, name, value)
