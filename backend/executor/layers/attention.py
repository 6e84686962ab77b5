"""Paged attention layer: RoPE and the write of this step's K/V into the cache, then attention over it.

On CUDA the OpenAI Triton kernels run (RoPE fused with the cache write; split-K decode attention when
every sequence has one new token, else varlen prefill attention); on CPU the torch references.

FP8 KV cache (``kv_cache_dtype="fp8"``, docs/fp8.md): a layer built for it owns two 0-dim fp32 parameters,
``k_scale`` and ``v_scale`` (dequantization scales: real = fp8 * scale), loaded from the checkpoint or
calibrated at load (``executor/kv_scales.py``). The kernels read them through their device pointers, so
CUDA graphs captured after they are set stay valid. Whether a step quantizes follows the bound cache's
dtype: the calibration pass runs the same layers over a full-precision cache.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from inflight.backend.executor.layers.rotary import RotaryEmbedding
from inflight.backend.executor.step_inputs import AttentionMetadata
from inflight.kernels.fp8 import FP8_DTYPE
from inflight.kernels.paged_attention import paged_attention_reference, write_kv_cache_reference
from inflight.kernels.rotary import rotary_embedding_reference


class Attention(nn.Module):
    """Multi-head / grouped-query attention with RoPE over the paged cache of one layer."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 rotary: RotaryEmbedding, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto") -> None:  # fmt: skip
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.rotary_emb = rotary
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None
        self.kv_cache_dtype = kv_cache_dtype
        if self.kv_cache_dtype == "fp8":
            # 0 until loaded from the checkpoint or calibrated (``init_buffers``; the model is built empty).
            self.k_scale = nn.Parameter(torch.empty((), dtype=torch.float32), requires_grad=False)
            self.v_scale = nn.Parameter(torch.empty((), dtype=torch.float32), requires_grad=False)
        elif self.kv_cache_dtype == "auto":
            self.k_scale = self.v_scale = None
        else:
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {self.kv_cache_dtype!r}")

    def init_buffers(self) -> None:
        if self.k_scale is not None:
            self.k_scale.data.zero_()
            self.v_scale.data.zero_()

    def bind_kv_cache(self, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None) -> None:
        if k_cache is not None and k_cache.dtype == FP8_DTYPE and self.k_scale is None:
            raise ValueError("an FP8 KV cache needs attention layers built for it (kv_cache_dtype='fp8')")
        self.k_cache, self.v_cache = k_cache, v_cache

    def _scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The dequantization scales when the bound cache is FP8, else (None, None)."""
        if self.k_cache.dtype == FP8_DTYPE:
            return self.k_scale, self.v_scale
        return None, None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:  # fmt: skip
        """``q [T, H, D]``, ``k``/``v [T, KVH, D]`` before RoPE -> ``[T, H * D]``."""
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not bound"
        cos_sin = self.rotary_emb.cos_sin_cache
        k_scale, v_scale = self._scales()
        if q.is_cuda:
            out = self._forward_cuda(positions, q, k, v, cos_sin, meta, k_scale, v_scale)
        else:
            q, k = rotary_embedding_reference(positions, q, k, cos_sin)
            write_kv_cache_reference(k, v, self.k_cache, self.v_cache, meta.slot_mapping, k_scale, v_scale)
            out = paged_attention_reference(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                                            meta.query_start_loc, self.scale, self.sliding_window,
                                            k_scale, v_scale)  # fmt: skip
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)

    def _forward_cuda(self, positions, q, k, v, cos_sin, meta: AttentionMetadata, k_scale: torch.Tensor | None,
                      v_scale: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        from inflight.kernels.paged_attention import paged_attention
        from inflight.kernels.rotary import rotary_embedding_write_kv_cache

        # Prefill reads this step's keys from the rotated k rows (and v) rather than through the cache.
        # (Not after a q/k norm, which makes k contiguous and v not: the kernel takes one stride for both.
        # Not with an FP8 cache: a step's own tokens attend to their quantized K/V, as later steps will.)
        step_kv = meta.max_query_len > 1 and k.dtype == self.k_cache.dtype and k.stride() == v.stride()
        q = rotary_embedding_write_kv_cache(positions, q, k, v, cos_sin, self.k_cache, self.v_cache,
                                            meta.slot_mapping, rotate_k_in_place=step_kv, k_scale=k_scale,
                                            v_scale=v_scale)  # fmt: skip
        return paged_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.block_tables,
            meta.seq_lens_tensor,
            meta.query_start_loc_tensor,
            self.scale,
            self.sliding_window,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
            partition_size=decode_partition_size(q.shape[0], self.num_kv_heads, meta.max_seq_len, q.device),
            k_new=k if step_kv else None,
            v_new=v if step_kv else None,
            k_scale=k_scale,
            v_scale=v_scale,
        )


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_partition_size(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Keys per split-K partition of decode attention.

    One program runs per (sequence, KV head, partition). A small batch (fewer than 2 programs per SM
    unsplit) gets partitions of at most 512 keys, enough of them to fill the GPU twice over. A larger one
    aims at about 16 programs per SM, so a batch that has that many unsplit runs unsplit: no partial
    results, no reduce kernel. Measured on an H200 (8B shapes, bf16, .gpu sweep of 2026-11-21): 384
    sequences of ~1,500 keys 628 -> 563 us (88% -> 98.6% of the copy bandwidth), 256 of ~600 keys
    179 -> 164 us, 64 of 4,096 keys (4 partitions of 1,024 instead of 8 of 512) 280 -> 271 us.
    Depends only on shapes and ``max_seq_len``, so a captured CUDA graph stays valid.
    """
    sms = _num_sms(device)
    programs = max(num_seqs * num_kv_heads, 1)

    def size(partitions: int) -> int:  # keys per partition for that many: a power of two, at least 64
        return max(64, 1 << max(0, (-(-max_seq_len // partitions) - 1).bit_length()))

    if programs < 2 * sms:
        return min(512, size(-(-2 * sms // programs)))
    return size(max(1, round(16 * sms / programs)))
