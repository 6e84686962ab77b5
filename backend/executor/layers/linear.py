"""Linear layers: column-, row-parallel and fused (q/k/v, gate/up), with a pluggable weight format.

A layer owns its parameters through a ``LinearMethod`` (dense weights here; FP8 in
``executor/quantization``) and knows how to load a checkpoint tensor into its shard: a weight, or a
format's scales (``weight_scale`` per output row like the weight, or one per tensor broadcast over the
shard's rows; a 0-dim ``input_scale`` shared by fused shards, which keeps the largest).

With ``tp_size`` ranks a column-parallel layer holds ``output_size / tp_size`` rows of the weight and a
row-parallel one ``input_size / tp_size`` columns, followed by an all-reduce::

    x ─► ColumnParallel (W[rows of rank r]) ─► local activations ─► RowParallel (W[:, cols of r])
      ─► all-reduce
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from inflight.backend.executor.parallel import SINGLE_RANK, ParallelConfig, divide, local_kv_heads
from inflight.kernels import ops

# Rows up to which a CUDA decode step takes the fused small-M Triton GEMV (kernels/fused_gemv.py). A layer's
# four linears in CUDA graphs (.gpu/m_sweep.py, 2026-11-22), fused GEMVs against RMSNorm / SiLU-and-mul
# kernels + cuBLAS: 1 row: 119.2 vs 126.4 us on an H200, 161.1 vs 170.7 on an H100 (fused 5.6% faster);
# 2 to 16 rows: cuBLAS 7-9% faster on the H200, ~1% on the H100.
FUSED_GEMV_MAX_M = 1


class LinearMethod(ABC):
    """How a linear layer stores its weight and multiplies by it."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        """Register the layer's weight parameter(s) for a local ``[output_size, input_size]`` matrix."""

    def init_params(self, layer: nn.Module) -> None:
        """Initialise what must have a value before loading (the model is built uninitialised)."""
        return None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded checkpoint tensors into the format's (e.g. quantize a full-precision weight)."""
        return None

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` in the layer's format."""

    def apply_add(self, layer: nn.Module, x: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + addend`` (the residual add after o_proj / down_proj); may write it over ``addend``.
        This default runs the two steps; a format may fuse the add into the product's epilogue."""
        return addend.add_(self.apply(layer, x, None))

    def apply_rmsnorm(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None,
                      norm_weight: torch.Tensor, eps: float, bias: torch.Tensor | None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(rmsnorm(x + residual) * norm_weight @ W.T + bias, x + residual)`` (``x`` as the residual
        when ``residual`` is None). This default runs the two steps; a format may fuse them."""
        normed, new_residual = ops.rms_norm(x, norm_weight, eps, residual)
        return self.apply(layer, normed, bias), (x if residual is None else new_residual)

    def apply_silu_mul(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, addend: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``silu(x[:, :d]) * x[:, d:] @ W.T + bias``, or ``+ addend`` written over it (as ``apply_add``; then
        no bias). This default runs the two steps; a format may fuse them."""
        act = ops.silu_and_mul(x)
        return self.apply(layer, act, bias) if addend is None else self.apply_add(layer, act, addend)


class UnquantizedLinearMethod(LinearMethod):
    """A dense ``[output_size, input_size]`` weight in the model dtype.

    On CUDA with at most ``FUSED_GEMV_MAX_M`` rows (batch-1 decode) the product runs as a Triton GEMV
    (``kernels.fused_gemv``, faster than cuBLAS's GEMV for these shapes in CUDA graphs) with the RMSNorm
    before qkv / gate_up fused into its input load (one kernel instead of two). The SiLU-and-mul stays a
    separate kernel before down_proj: fused, it measured slower than the two kernels (its exp/div on the
    16-row padded tile each chunk).
    ``INFLIGHT_FUSED_GEMV=0`` in the environment (read when the layer is built) keeps cuBLAS and the
    separate kernels, for comparison.
    """

    def __init__(self) -> None:
        self.fused_small_m = os.environ.get("INFLIGHT_FUSED_GEMV", "1") != "0"

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)

    def _fused(self, layer: nn.Module, x: torch.Tensor) -> bool:
        return (self.fused_small_m and x.is_cuda and x.dim() == 2 and x.shape[0] <= FUSED_GEMV_MAX_M
                and x.shape[0] > 0 and layer.weight.stride(1) == 1 and x.dtype == layer.weight.dtype)  # fmt: skip

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._fused(layer, x) and x.stride(-1) == 1:
            from inflight.kernels.fused_gemv import fused_gemv

            y, _ = fused_gemv(x, layer.weight)
            return y if bias is None else y + bias
        return F.linear(x, layer.weight, bias)

    def apply_add(self, layer, x, addend):  # noqa: D102 (see LinearMethod)
        if self._fused(layer, x) and x.stride(-1) == 1 and addend.stride(-1) == 1:
            from inflight.kernels.fused_gemv import fused_gemv

            return fused_gemv(x, layer.weight, addend=addend)[0]
        # NOTE: in place: cuBLAS adds C in its epilogue (beta = 1), one read of the residual overlapped with
        # the math, where a fused add-RMSNorm after the product read and wrote it twice more (2026-11-22).
        # Out of place torch would first copy addend into the output: a pass more.
        return addend.addmm_(x, layer.weight.t())

    def apply_rmsnorm(self, layer, x, residual, norm_weight, eps, bias):  # noqa: D102 (see LinearMethod)
        if not (self._fused(layer, x) and x.stride(-1) == 1 and norm_weight.is_contiguous()
                and (residual is None or residual.stride(-1) == 1)):  # fmt: skip
            return super().apply_rmsnorm(layer, x, residual, norm_weight, eps, bias)
        from inflight.kernels.fused_gemv import fused_gemv

        y, new_residual = fused_gemv(x, layer.weight, "rmsnorm", residual=residual, norm_weight=norm_weight,
                                     eps=eps)  # fmt: skip
        return (y if bias is None else y + bias), new_residual


class LinearBase(nn.Module):
    """Shared parts: the weight format, an optional bias, the parallel group."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        dtype: torch.dtype,
        parallel: ParallelConfig = SINGLE_RANK,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size  # local (this rank's) sizes
        self.output_size = output_size
        self.parallel = parallel
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, input_size, output_size, dtype)
        self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False) if bias else None

    def init_buffers(self) -> None:
        self.linear_method.init_params(self)

    def _copy(self, param: nn.Parameter, loaded: torch.Tensor, what: str) -> None:
        if param.dim() == 0:  # a per-tensor input scale: fused shards share the largest
            param.data.copy_(torch.maximum(param.data, loaded.reshape(()).to(param.dtype)))
            return
        if param.dim() == 1 and loaded.numel() == 1 and param.numel() > 1:
            loaded = loaded.reshape(1).expand(param.shape[0])  # a per-tensor scale, over the shard's rows
        elif param.dim() == 1:
            loaded = loaded.reshape(-1)  # a per-channel scale may come as [rows, 1]
        if (param.dtype == torch.float8_e4m3fn) != (loaded.dtype == torch.float8_e4m3fn):
            raise ValueError(f"{what}: checkpoint dtype {loaded.dtype} where {param.dtype} is expected")
        if param.shape != loaded.shape:
            raise ValueError(
                f"{what}: checkpoint shape {tuple(loaded.shape)} != expected {tuple(param.shape)}"
            )
        param.data.copy_(loaded)


class ColumnParallelLinear(LinearBase):
    """``y = x W^T + b`` with W's output rows split over the ranks."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        dtype: torch.dtype,
        parallel: ParallelConfig = SINGLE_RANK,
        linear_method: LinearMethod | None = None,
        gather_output: bool = False,
    ) -> None:
        local_out = divide(output_size, parallel.tp_size, "output size")
        super().__init__(input_size, local_out, bias, dtype, parallel, linear_method)
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """Copy this rank's rows of a full checkpoint tensor into ``param``."""
        rows = param.shape[0] if param.dim() else 0
        self._copy(param, _rows(loaded, self.parallel.tp_rank * rows, rows), "column-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_method.apply(self, x, self.bias)
        return self.parallel.all_gather_last_dim(y) if self.gather_output else y

    def forward_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
                        ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(self(norm(x + residual)), x + residual)``; ``residual`` None: ``(self(norm(x)), x)``.
        ``norm`` is an RMSNorm (``weight``, ``eps``); the weight format may fuse it into the product."""
        y, new_residual = self.linear_method.apply_rmsnorm(
            self, x, residual, norm.weight, norm.eps, self.bias
        )
        return (self.parallel.all_gather_last_dim(y) if self.gather_output else y), new_residual


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one weight (e.g. MLP gate and up), loaded shard by shard."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        dtype: torch.dtype,
        parallel: ParallelConfig = SINGLE_RANK,
        linear_method: LinearMethod | None = None,
    ) -> None:
        self.local_output_sizes = [divide(s, parallel.tp_size, "output size") for s in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, dtype, parallel, linear_method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """Load output ``shard_id`` (an index into ``output_sizes``) of a full checkpoint tensor."""
        assert isinstance(shard_id, int), "merged linear weights load one shard at a time"
        size = self.local_output_sizes[shard_id]
        offset = sum(self.local_output_sizes[:shard_id])
        part = _rows(loaded, self.parallel.tp_rank * size, size)
        self._copy(param.narrow(0, offset, size) if param.dim() else param, part, f"merged shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q/k/v projection. KV heads are split over ranks, or replicated when ranks outnumber them."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        dtype: torch.dtype,
        parallel: ParallelConfig = SINGLE_RANK,
        linear_method: LinearMethod | None = None,
    ) -> None:
        tp = parallel.tp_size
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp, "number of attention heads")
        self.num_kv_heads = local_kv_heads(num_kv_heads, tp)
        self.kv_replicas = max(1, tp // num_kv_heads)  # ranks holding each KV head
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias, dtype, parallel, linear_method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """Load the ``"q"``, ``"k"`` or ``"v"`` projection (full checkpoint tensor) into its place."""
        rank = self.parallel.tp_rank
        if shard_id == "q":
            offset, size, index = 0, self.q_size, rank
        elif shard_id in ("k", "v"):
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, index = self.kv_size, rank // self.kv_replicas
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        self._copy(param.narrow(0, offset, size) if param.dim() else param, _rows(loaded, index * size, size),
                   f"qkv shard {shard_id}")  # fmt: skip


class RowParallelLinear(LinearBase):
    """``y = x W^T + b`` with W's input columns split over the ranks; partial sums are all-reduced."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        dtype: torch.dtype,
        parallel: ParallelConfig = SINGLE_RANK,
        linear_method: LinearMethod | None = None,
    ) -> None:
        local_in = divide(input_size, parallel.tp_size, "input size")
        super().__init__(local_in, output_size, bias, dtype, parallel, linear_method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """Copy this rank's columns (or the whole bias) of a full checkpoint tensor into ``param``."""
        if param.dim() == 2:
            cols = param.shape[1]
            loaded = loaded.narrow(1, self.parallel.tp_rank * cols, cols)
        self._copy(param, loaded, "row-parallel weight")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x W^T + b``, plus ``residual`` when given (written over it: the caller's residual stream)."""
        if residual is not None and self.parallel.tp_rank == 0:
            y = self.linear_method.apply_add(self, x, residual)  # joins the sum once, on rank 0
        else:
            y = self.linear_method.apply(self, x, None)
        y = self.parallel.all_reduce(y)
        # NOTE: the bias is added once, after the reduction, not once per rank.
        return y + self.bias if self.bias is not None else y

    def forward_silu_mul(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``self(silu(x[:, :d]) * x[:, d:], residual)`` over this rank's gate | up columns (a weight format may
        fuse the activation into its input quantization: FP8's ``silu_and_mul_quant``)."""
        on_rank0 = residual if self.parallel.tp_rank == 0 else None  # joins the sum once, as in forward
        y = self.parallel.all_reduce(self.linear_method.apply_silu_mul(self, x, None, on_rank0))
        return y + self.bias if self.bias is not None else y


def _rows(loaded: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """Rows ``start:start + size`` of a checkpoint tensor; a one-element (per-tensor) scale as it is."""
    return loaded if loaded.numel() == 1 else loaded.narrow(0, start, size)
