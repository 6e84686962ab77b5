"""inflight: an LLM inference engine that runs inside NVIDIA Triton Inference Server.

``inflight.LLM`` and ``inflight.SamplingParams`` are the offline API; the subpackages are
``inflight.backend``, ``inflight.batching``, ``inflight.kernels`` and ``inflight.client``: symlinks in
this folder to the checkout's top-level folders (``backend/`` and ``kernels/`` are namespace portions, with
no ``__init__.py``, so that they never shadow an installed package of the same name).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # NOTE: lazy, so `import inflight.batching` (pure Python) does not import torch.
    if name == "LLM":
        from inflight.backend.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from inflight.backend.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'inflight' has no attribute {name!r}")
