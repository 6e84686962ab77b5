"""Rotary position embedding (the "neox" half-rotation layout that HF Llama uses)."""

from __future__ import annotations

import torch


def rotary_embedding_reference(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] fp32: cos in the first half, sin in the second
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their positions; returns new tensors in the input dtype."""
    cos_sin = cos_sin_cache.index_select(0, positions)
    cos, sin = cos_sin.chunk(2, dim=-1)
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)  # [num_tokens, 1, rotary_dim]
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)

    return rotate(q), rotate(k)
