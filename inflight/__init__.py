"""inflight: an LLM inference engine that runs inside NVIDIA Triton Inference Server.

``inflight.LLM`` and ``inflight.SamplingParams`` are the offline API; the subpackages are
``inflight.backend``, ``inflight.batching``, ``inflight.kernels`` and ``inflight.client``.
"""

from __future__ import annotations

import os
from typing import Any

# NOTE: installed, the subpackages map to the top-level folders (pyproject's package-dir). In a source
# checkout used without installing (a GPU machine with no network), they sit beside this folder.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "batching", "__init__.py")) and _checkout not in __path__:
    __path__.append(_checkout)

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
