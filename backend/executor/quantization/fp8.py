"""FP8 (E4M3) linear layers: W8A8 with per-channel weight scales and per-token (or static) activation scales.

Weights are ``float8_e4m3fn [out, in]`` with one fp32 scale per output channel (``weight_scale [out]``; a
checkpoint's per-tensor scale is broadcast over its shard's rows, so fused q/k/v and gate/up keep each
shard's own). Activations are quantized per token as they are made, ``y = (q_x @ q_w^T) * s_x * s_w``:

    CUDA  M <= FP8_GEMV_MAX_M  ``kernels.fp8_gemv`` (weights read at one byte each; bias and residual add
                               fused; the RMSNorm / quantization before it as its FUSE_MAX_M says: by
                               default a kernel that emits FP8 + scales, then the GEMV)
          else                 RMSNorm / SiLU-and-mul kernels emit FP8 + per-token scales, then
                               ``kernels.fp8.fp8_gemm`` (cuBLASLt, row-wise scales)
    CPU                        the torch references: values cast to float8 and back, fp32 scales, so CI
                               computes the same FP8 numbers (up to summation order)
"""

from __future__ import annotations

import os

import torch
from torch import nn

from inflight.backend.executor.layers.linear import LinearMethod, RowParallelLinear
from inflight.backend.executor.quantization.config import QuantConfig
from inflight.kernels import activation, fp8, rms_norm
from inflight.kernels.fp8_gemv import fp8_gemv

# Rows up to which a CUDA step takes the FP8 GEMV (kernels/fp8_gemv.py) rather than cuBLASLt: the GEMV
# (quantize-first form) was the fastest for every 8B projection at every M from 1 to 16 on an H100 in CUDA
# graphs (benchmarks/kernels/bench_fp8_gemm.py, 2026-12-07: qkv 21.7 vs 26.9 us with the quantization, down
# 40.4 vs 59.8). Batch-1 decode of the 8B shape: 183.7 tok/s with the GEMV (then the fused form, M <= 2),
# 171.6 without (INFLIGHT_FP8_GEMV=0 in the environment, read at import: every row count to cuBLASLt).
FP8_GEMV_MAX_M = 16 if os.environ.get("INFLIGHT_FP8_GEMV", "1") != "0" else 0


class Fp8LinearMethod(LinearMethod):
    """W8A8 FP8. ``config.checkpoint_fp8``: the checkpoint holds FP8 weights and scales, loaded as they are;
    otherwise the full-precision weight loads first and is quantized per channel after loading."""

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        layer.out_dtype = dtype
        weight_dtype = fp8.FP8_DTYPE if self.config.checkpoint_fp8 else dtype
        layer.weight = nn.Parameter(
            torch.empty(output_size, input_size, dtype=weight_dtype), requires_grad=False
        )
        if self.config.checkpoint_fp8:
            layer.weight_scale = nn.Parameter(
                torch.empty(output_size, dtype=torch.float32), requires_grad=False
            )
        if self.config.static_input_scale:
            # NOTE: fused q/k/v (gate/up) shards share one input; their scales combine by max as they load.
            layer.input_scale = nn.Parameter(torch.empty((), dtype=torch.float32), requires_grad=False)

    def init_params(self, layer: nn.Module) -> None:
        if self.config.static_input_scale:
            layer.input_scale.data.zero_()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not self.config.checkpoint_fp8:
            w = layer.weight.data
            row_amax = None
            if isinstance(layer, RowParallelLinear) and layer.parallel.tp_size > 1:
                # NOTE: this rank holds some columns of each row: the scales come from the whole rows, so
                # every tensor-parallel size stores the same FP8 weight.
                row_amax = layer.parallel.all_reduce_max(w.float().abs().amax(dim=1))
            w_q, scale = fp8.quantize_weight_per_channel_reference(w, row_amax)
            layer.weight = nn.Parameter(w_q, requires_grad=False)
            layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        if self.config.static_input_scale and not float(layer.input_scale) > 0:
            raise ValueError("an FP8 checkpoint with static activation scales has an input_scale <= 0")

    # ------------------------------------------------------------------------------------------- products
    def _static(self, layer: nn.Module) -> torch.Tensor | None:
        return layer.input_scale if self.config.static_input_scale else None

    def _gemv(self, x: torch.Tensor) -> bool:
        return x.is_cuda and 0 < x.shape[0] <= FP8_GEMV_MAX_M

    def _matmul(self, layer: nn.Module, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                addend: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The product of E4M3 activations ``q`` (per-row ``scale``) with the weight (+ bias, + addend)."""
        if self._gemv(q):
            y, _ = fp8_gemv(q, layer.weight, layer.weight_scale, a_scale=scale, out_dtype=layer.out_dtype,
                            bias=bias, addend=addend)  # fmt: skip
            return y
        if q.is_cuda:
            return fp8.fp8_gemm(q, scale, layer.weight, layer.weight_scale, layer.out_dtype, bias, addend)
        return fp8.fp8_linear_reference(
            q, scale, layer.weight, layer.weight_scale, layer.out_dtype, bias, addend
        )

    def _quantize(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantize = fp8.quantize_per_token if x.is_cuda else fp8.quantize_per_token_reference
        return quantize(x, self._static(layer))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._gemv(x):
            y, _ = fp8_gemv(x, layer.weight, layer.weight_scale, bias=bias, static_scale=self._static(layer))
            return y
        return self._matmul(layer, *self._quantize(layer, x), bias)

    def apply_add(self, layer: nn.Module, x: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
        if self._gemv(x):
            y, _ = fp8_gemv(
                x, layer.weight, layer.weight_scale, addend=addend, static_scale=self._static(layer)
            )
            return y
        return self._matmul(layer, *self._quantize(layer, x), None, addend)

    def apply_rmsnorm(self, layer, x, residual, norm_weight, eps, bias):  # noqa: D102 (see LinearMethod)
        static = self._static(layer)
        if self._gemv(x):
            y, new_residual = fp8_gemv(x, layer.weight, layer.weight_scale, "rmsnorm", residual=residual,
                                       norm_weight=norm_weight, eps=eps, bias=bias, static_scale=static)  # fmt: skip
        else:
            quantize = rms_norm.rms_norm_quant if x.is_cuda else rms_norm.rms_norm_quant_reference
            q, scale, new_residual = quantize(x, norm_weight, eps, residual, static)
            y = self._matmul(layer, q, scale, bias)
        return y, (x if residual is None else new_residual)

    def apply_silu_mul(self, layer, x, bias, addend=None):  # noqa: D102 (see LinearMethod)
        quantize = activation.silu_and_mul_quant if x.is_cuda else activation.silu_and_mul_quant_reference
        return self._matmul(layer, *quantize(x, self._static(layer)), bias, addend)
