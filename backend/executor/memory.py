"""What each rank's memory holds after the load: the figures a deployment plans with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MemoryFigures:
    """What this rank's memory holds, as measured at load: what a deployment plans with (the load log and
    the ``inflight_memory_*`` metrics say it)."""

    device: str
    weights_bytes: int
    # the largest step's activation peak (a profiling forward at load); None where it did not run: on CPU,
    # or with kv_cache_memory_bytes given
    activation_peak_bytes: int | None
    kv_cache_bytes: int
    kv_blocks: int  # usable ones (the null block left out)
    block_size: int
    max_model_len: int
    rank: int = 0  # the tensor-parallel rank

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV cache holds, all sequences together."""
        return self.kv_blocks * self.block_size

    @property
    def longest_sequence(self) -> int:
        """The longest sequence (prompt + output) one request can have: the context length, or less where the
        cache holds fewer tokens."""
        return min(self.max_model_len, self.kv_tokens)

    def describe(self) -> str:
        gib = 2**30
        peak = (
            "not measured"
            if self.activation_peak_bytes is None
            else f"{self.activation_peak_bytes / gib:.2f} GiB"
        )
        return (f"memory of rank {self.rank} on {self.device}: weights {self.weights_bytes / gib:.2f} GiB, activation peak {peak}, "
                f"KV cache {self.kv_cache_bytes / gib:.2f} GiB = {self.kv_blocks} blocks x {self.block_size} "
                f"tokens = {self.kv_tokens} tokens; longest sequence that fits {self.longest_sequence} tokens "
                f"(max_model_len {self.max_model_len})")  # fmt: skip


def gather_memory(
    mine: MemoryFigures, world_size: int, group: dist.ProcessGroup | None
) -> list[MemoryFigures]:
    """Every tensor-parallel rank's figures, by rank (one all-gather of five numbers at load, every rank
    calls it): rank 0 publishes them all."""
    m = mine
    peak = m.activation_peak_bytes if m.activation_peak_bytes is not None else -1
    row = torch.tensor([m.weights_bytes, peak, m.kv_cache_bytes, m.kv_blocks, m.rank], dtype=torch.int64)
    rows = [torch.empty_like(row) for _ in range(world_size)]
    dist.all_gather(rows, row, group=group)
    device_type = m.device.split(":")[0]
    return [
        MemoryFigures(m.device if rank == m.rank else f"{device_type} of rank {rank}", weights,
                      None if peak < 0 else peak, kv, blocks, m.block_size, m.max_model_len, rank)
        for weights, peak, kv, blocks, rank in (r.tolist() for r in rows)
    ]  # fmt: skip
