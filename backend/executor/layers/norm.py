"""RMSNorm layer (fused with the residual add when given one)."""

from __future__ import annotations

import torch
from torch import nn

from inflight.kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without ``residual``: the normed ``x``. With it: ``(norm(x + residual), x + residual)``."""
        out, new_residual = ops.rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, new_residual)
