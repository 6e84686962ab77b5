"""The HTTP transport: Triton's `generate` and `generate_stream` (server-sent events) endpoints."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from .request import RequestInput, delta_from_outputs
from .stream import TokenStream
from .types import Delta, InflightError


def request_body(inputs: list[RequestInput]) -> dict[str, Any]:
    """The generate extension's JSON: one top-level key per input, scalars as plain values."""
    return {spec.name: spec.values[0] if spec.scalar else spec.values for spec in inputs}


def _error_message(body: bytes) -> str:
    """The `error` of a JSON body or of the first SSE event; the raw text otherwise."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        return str(json.loads(text.removeprefix("data:").strip())["error"])
    except (ValueError, KeyError, TypeError):
        return text


def _as_lists(event: dict[str, Any]) -> dict[str, list[Any]]:
    # NOTE: the generate endpoints write a one-element tensor as a bare value (e.g. "output_ids": 42).
    return {
        k: v if isinstance(v, list) else [v]
        for k, v in event.items()
        if k not in ("model_name", "model_version")
    }


class HttpTokenStream(TokenStream):
    """One POST to `/v2/models/<model>/generate[_stream]`; each SSE event (or the one JSON body) is a delta.

    SSE carries no "final" flag: a delta with a finish reason is taken as the last one, and if the server
    closes the stream without one, an empty finished delta ends the iteration.
    """

    def __init__(
        self, url: str, model: str, inputs: list[RequestInput], stream: bool, timeout_s: float | None
    ) -> None:
        super().__init__(timeout_s)
        self._stream = stream
        self._body_read = False
        endpoint = "generate_stream" if stream else "generate"
        request = urllib.request.Request(
            f"http://{url}/v2/models/{model}/{endpoint}",
            data=json.dumps(request_body(inputs)).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            self._response = urllib.request.urlopen(request, timeout=timeout_s)
        except urllib.error.HTTPError as err:
            raise InflightError.from_http(err.code, _error_message(err.read())) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise InflightError(f"cannot reach the server at {url}: {reason}", "UNAVAILABLE") from None

    def _read_event(self) -> dict[str, Any] | None:
        """The next JSON object (one SSE `data:` line, or the whole body), None at the end."""
        if not self._stream:
            if self._body_read:
                return None
            self._body_read = True
            body = self._response.read()
            return json.loads(body) if body.strip() else None
        while True:
            self.remaining_s()
            try:
                line = self._response.readline()
            except TimeoutError:
                raise InflightError("no response before the request's timeout", "DEADLINE_EXCEEDED") from None
            if not line:
                return None
            text = line.decode("utf-8").strip()
            if text.startswith("data:"):
                return json.loads(text.removeprefix("data:").strip())

    def _next_delta(self) -> Delta:
        event = self._read_event()
        if event is None:
            return Delta(finished=True)
        if "error" in event:
            raise InflightError(str(event["error"]), None)
        delta = delta_from_outputs(_as_lists(event), finished=False)
        delta.finished = delta.finish_reason is not None
        return delta

    def _shutdown(self, cancel: bool) -> None:
        # NOTE: closing the connection is all HTTP can do; Triton 2.51 then marks the request cancelled.
        self._response.close()
