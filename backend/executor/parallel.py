"""Tensor-parallel state.

Layers are written column/row/vocab-parallel from the start; with one rank (today) every collective is
the identity. A later issue sets this up over ``torch.distributed`` (NCCL on GPUs, gloo on CPU).
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
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size), got rank {self.tp_rank} of {self.tp_size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group (in place); the identity with one rank."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise max of ``x`` over the group (in place); the identity with one rank."""
        if self.tp_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's ``x`` along the last dimension; the identity with one rank."""
        if self.tp_size == 1:
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


SINGLE_RANK = ParallelConfig()
