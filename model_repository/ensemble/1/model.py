"""Triton Python-backend entry point: the logic lives in ``inflight.backend.serving.trtllm_ensemble``."""

from inflight.backend.serving.trtllm_ensemble import TritonPythonModel  # noqa: F401
