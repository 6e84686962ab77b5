"""Triton Python-backend entry point: the logic lives in ``inflight.backend.triton_model``."""

from inflight.backend.triton_model import TritonPythonModel  # noqa: F401
