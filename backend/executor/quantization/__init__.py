"""Weight and activation formats of the linear layers: which one a checkpoint or option asks for
(``config.resolve_quantization``) and how each multiplies (``fp8.Fp8LinearMethod``). docs/fp8.md."""

from __future__ import annotations

from inflight.backend.executor.layers.linear import LinearMethod
from inflight.backend.executor.quantization.config import QuantConfig, resolve_quantization
from inflight.backend.executor.quantization.fp8 import Fp8LinearMethod

__all__ = ["QuantConfig", "linear_method", "resolve_quantization"]


def linear_method(config: QuantConfig | None, *prefixes: str) -> LinearMethod | None:
    """The method for the linear layer made of the checkpoint modules ``prefixes`` (several when fused):
    None (dense) without quantization or when the checkpoint leaves them all unquantized."""
    if config is None:
        return None
    ignored = [config.is_ignored(p) for p in prefixes]
    if all(ignored):
        return None
    if any(ignored):
        raise ValueError(
            f"the checkpoint quantizes some of {', '.join(prefixes)} and not others; they are fused into one "
            "layer here, which must be all FP8 or all full precision"
        )
    return Fp8LinearMethod(config)
