"""Tensor-parallel state: where this process sits in the group, and the model's collectives.

Layers are written column/row/vocab-parallel; with one rank and no process group every collective is the
identity. ``distributed.py`` sets the group up over ``torch.distributed`` (NCCL on GPUs, gloo on CPU); a
group of one rank (``distributed_executor_backend="mp"`` at ``tensor_parallel_size=1``) runs the collectives
too, so one GPU tests the distributed path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelConfig:
    """Where this process sits in the tensor-parallel group."""

    tp_rank: int = 0
    tp_size: int = 1
    group: dist.ProcessGroup | None = None  # the model's collectives (NCCL on GPUs); None: no process group

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size), got rank {self.tp_rank} of {self.tp_size}")

    @property
    def distributed(self) -> bool:
        """Collectives run (a process group exists, of one rank or more)."""
        return self.group is not None or self.tp_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group (in place); the identity without a process group."""
        if self.distributed:
            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise max of ``x`` over the group (in place); the identity without a process group."""
        if self.distributed:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's ``x`` along the last dimension; the identity without a process group."""
        if not self.distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator / denominator``, refusing a remainder (e.g. heads that do not split over ranks)."""
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) must be divisible by the tensor-parallel size ({denominator})"
        )
    return numerator // denominator


def check_tensor_parallel(num_heads: int, num_kv_heads: int, intermediate_size: int, tp_size: int) -> None:
    """Refuse a tensor-parallel size the model cannot split over, naming the dimension (before any worker
    starts)."""
    divide(num_heads, tp_size, "number of attention heads")
    divide(intermediate_size, tp_size, "MLP intermediate size")
    local_kv_heads(num_kv_heads, tp_size)


def local_kv_heads(num_kv_heads: int, tp_size: int) -> int:
    """KV heads one rank holds: its share, or one (replicated) when the ranks outnumber the heads."""
    if tp_size >= num_kv_heads:
        divide(tp_size, num_kv_heads, "tensor-parallel size vs KV heads")
        return 1
    return divide(num_kv_heads, tp_size, "number of KV heads")


SINGLE_RANK = ParallelConfig()
