"""Triton Python-backend entry point: the logic lives in ``inflight.backend.serving.triton_model``."""

from inflight.backend.serving.triton_model import TritonPythonModel  # noqa: F401
