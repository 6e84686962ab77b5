"""Activation layers."""

from __future__ import annotations

import torch
from torch import nn

from inflight.kernels import ops


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` over the fused ``[..., 2 * d]`` gate/up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)
