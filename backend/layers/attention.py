"""Paged attention layer: writes this step's K/V into the cache, then attends through block tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...kernels import ops


@dataclass
class AttentionMetadata:
    """Where a step's tokens sit in the paged KV cache; built once per step by the model runner."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with the null block 0
    seq_lens: list[int]  # per sequence: cached tokens after this step
    query_start_loc: list[int]  # [num_seqs + 1] prefix sums of the tokens computed this step
    max_query_len: int
    max_seq_len: int


class Attention(nn.Module):
    """Multi-head / grouped-query attention over the paged cache of one layer."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """``q [T, H, D]``, ``k``/``v [T, KVH, D]`` -> ``[T, H * D]``."""
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not bound"
        ops.write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = ops.paged_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            self.sliding_window,
        )
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
