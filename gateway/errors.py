"""OpenAI's error shape, and the mapping of Triton's and the llm model's errors onto HTTP statuses.

Every error the gateway answers is ``{"error": {"message", "type", "param", "code"}}`` with the status
OpenAI uses: 400 for an invalid value (``param`` names it), 401 without a valid key, 404 for an unknown model,
413 for a body over the limit, 429 when the model's queue is full and 503 when Triton or the model is down
(both with ``Retry-After``), 500 only for a fault of the server itself.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

# Seconds a client should wait before retrying a 429 / 503.
RETRY_AFTER_S = 1


class OpenAIError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, retry_after_s: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(param: str | None, message: str) -> OpenAIError:
    """A 400 naming `param`."""
    return OpenAIError(400, message, param=param, code="invalid_value" if param else None)


def unavailable(message: str) -> OpenAIError:
    return OpenAIError(503, message, "server_error", code="service_unavailable", retry_after_s=RETRY_AFTER_S)


def queue_full(message: str) -> OpenAIError:
    return OpenAIError(
        429, message, "rate_limit_error", code="rate_limit_exceeded", retry_after_s=RETRY_AFTER_S
    )


# In-stream errors carry only a message (Triton's stream protocol has no code): these name the cases.
_QUEUE_FULL = re.compile(r"queue is full|exceeds maximum queue size|queue size", re.IGNORECASE)
_UNAVAILABLE = re.compile(
    r"shutting down|not running|was unloaded|not healthy|unknown model|is not ready|is not found|"
    r"unavailable|failed to connect|connection refused|stub process",
    re.IGNORECASE,
)
_USER_ERROR = re.compile(
    r" must |is empty|is not valid|unknown sampling parameter|given twice|more than max_model_len|"
    r"but max_model_len|outside the vocabulary|invalid|not supported|does not compile|cannot|no chat template",
    re.IGNORECASE,
)
# The first word of an llm-model message names the Triton input; OpenAI's name of it (default: the same).
TRITON_TO_OPENAI = {
    "text_input": "prompt",
    "input_ids": "prompt",
    "stop_words": "stop",
    "random_seed": "seed",
    "min_length": "min_tokens",
    "guided_json": "response_format",
    "guided_regex": "response_format",
    "guided_choice": "response_format",
}
_FIELD = re.compile(r"^\s*(?:sampling parameter\s+)?'?([a-z][a-z_]*)'?(?=[\s:'\[])")


def param_of(message: str, renames: dict[str, str] | None = None) -> str | None:
    """The OpenAI parameter an llm-model message is about (its first word names the input), or None."""
    match = _FIELD.match(message)
    if not match:
        quoted = re.search(r"sampling parameter '([a-z_]+)'", message)
        return quoted.group(1) if quoted else None
    name = match.group(1)
    name = (renames or {}).get(name, TRITON_TO_OPENAI.get(name, name))
    return name if "_" in name or name in _SINGLE_WORD_PARAMS else None


_SINGLE_WORD_PARAMS = {"prompt", "messages", "temperature", "seed", "stop", "n", "tools", "logprobs", "echo"}


def from_triton(
    message: str, grpc_code: str | None = None, renames: dict[str, str] | None = None
) -> OpenAIError:
    """The OpenAI error for a Triton error: a call's gRPC status when there is one, else the message."""
    if grpc_code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") or (
        grpc_code is None and _UNAVAILABLE.search(message)
    ):
        if grpc_code is None and _QUEUE_FULL.search(message):
            return queue_full(message)
        return unavailable(f"the model server is unavailable: {message}")
    if grpc_code == "RESOURCE_EXHAUSTED" or _QUEUE_FULL.search(message):
        return queue_full(message)
    if grpc_code in ("INVALID_ARGUMENT", "NOT_FOUND") or (grpc_code is None and _USER_ERROR.search(message)):
        return invalid(param_of(message, renames), message)
    return OpenAIError(500, f"the model server failed: {message}", "server_error", code="internal_error")
