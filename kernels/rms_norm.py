"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch


def rms_norm_reference(
    x: torch.Tensor,  # [num_tokens, hidden] any float dtype
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden], same dtype as x
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(rmsnorm(x + residual) * weight, x + residual)`` (the second is None without residual).

    Computed in fp32 and cast back to ``x.dtype``, as HF Llama does.
    """
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    variance = xf.pow(2).mean(dim=-1, keepdim=True)
    out = (xf * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * out, residual
