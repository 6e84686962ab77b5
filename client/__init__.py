"""inflight.client: a small client for the inflight model on Triton (gRPC streaming or HTTP generate).

>>> from inflight.client import InflightClient
>>> InflightClient("localhost:8001").generate("Hello", max_tokens=8, temperature=0).text

The command line: ``python -m inflight.client "What is the capital of France?" --chat --stream``.
"""

from __future__ import annotations

from .client import InflightClient
from .stream import TokenStream
from .types import Delta, InflightError, ModelUnavailableError, Result

__all__ = ["Delta", "InflightClient", "InflightError", "ModelUnavailableError", "Result", "TokenStream"]
