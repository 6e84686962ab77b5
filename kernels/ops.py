"""Elementwise operations the model layers call, dispatched by device.

CUDA tensors run the OpenAI Triton kernels; CPU tensors the torch references (the CPU path is for
development and CI). Attention dispatches in ``inflight.backend.executor.layers.attention``.
"""

from __future__ import annotations

import torch

from . import activation
from . import rms_norm as _rms_norm


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rmsnorm(x + residual) * weight, x + residual)``; the second is None without residual."""
    if x.is_cuda:
        return _rms_norm.rms_norm(x, weight, eps, residual)
    return _rms_norm.rms_norm_reference(x, weight, eps, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]``."""
    return activation.silu_and_mul(x) if x.is_cuda else activation.silu_and_mul_reference(x)
