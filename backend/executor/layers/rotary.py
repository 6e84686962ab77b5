"""Rotary position embedding with the scaling variants of HF configs (default, linear, llama3)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: Any) -> dict[str, Any]:
    """The RoPE settings of an HF config as one dict with ``rope_type`` and ``rope_theta``.

    NOTE: transformers 5 keeps them in ``config.rope_parameters``; 4.x in ``rope_theta`` + ``rope_scaling``.
    """
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def compute_inv_freq(rotary_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Per-pair inverse frequencies ``[rotary_dim / 2]`` fp32, after the config's scaling."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params["low_freq_factor"])
        high_freq_factor = float(params["high_freq_factor"])
        old_context_len = float(params["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """The precomputed ``[max_position, rotary_dim]`` cos|sin table that attention rotates q and k by."""

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        if rotary_dim != head_dim:
            raise ValueError(
                f"partial rotary embeddings are not supported yet (rotary_dim {rotary_dim} "
                f"!= head_dim {head_dim})"
            )
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.params = params
        compute_inv_freq(rotary_dim, params)  # fail early on an unsupported rope_type
        self.register_buffer("cos_sin_cache", torch.empty(max_position, rotary_dim), persistent=False)

    def init_buffers(self) -> None:
        """Fill the cos|sin table (after the model was built on the meta device and materialised)."""
        inv_freq = compute_inv_freq(self.rotary_dim, self.params)
        positions = torch.arange(self.max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        table = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        self.cos_sin_cache = table.to(self.cos_sin_cache.device)
