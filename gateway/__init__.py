"""inflight.gateway: an OpenAI-compatible HTTP API (FastAPI + uvicorn) in front of a running Triton server.

    python -m inflight.gateway --triton-url localhost:8001 --port 9000 [--api-key KEY ...]

It talks to Triton over gRPC streaming and serves every ready model of the repository that takes the llm
model's inputs: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed or not),
GET /health and GET /metrics. docs/gateway.md describes the mapping, the errors and the limits.
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
