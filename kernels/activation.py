"""SiLU-and-multiply, the gate of SwiGLU MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of shape ``[..., 2 * d]``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
