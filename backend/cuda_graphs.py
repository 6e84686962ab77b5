"""CUDA graphs for decode steps (one new token per sequence).

A ladder of batch sizes is captured largest first into one memory pool. A step of ``n`` sequences
replays the smallest captured size ``>= n``: rows past ``n`` are padding with slot -1 (the cache write
skips them) and sequence length 0 (decode attention returns zeros for them). Decode attention inside a
graph splits every sequence by ``max_model_len``, so the captured grid never depends on the step.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from .model_runner import StepInputs

logger = logging.getLogger("inflight")


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch_size`` (which is always included)."""
    sizes = {s for s in (1, 2, 4, 8) if s <= max_batch_size}
    sizes.update(range(16, max_batch_size + 1, 16))
    sizes.add(max_batch_size)
    return sorted(sizes)


class DecodeGraphs:
    """Captured decode forwards and their static input buffers."""

    def __init__(self, model: nn.Module, device: torch.device, max_batch_size: int, max_blocks_per_seq: int,
                 max_model_len: int) -> None:  # fmt: skip
        self.model = model
        self.device = device
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_model_len = max_model_len
        n = self.sizes[-1]

        def buffer(*shape: int, dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.input_ids = buffer(n, dtype=torch.int64)
        self.positions = buffer(n, dtype=torch.int64)
        self.slot_mapping = buffer(n, dtype=torch.int64, fill=-1)
        self.block_tables = buffer(n, max_blocks_per_seq, dtype=torch.int32)
        self.seq_lens = buffer(n, dtype=torch.int32)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # NOTE: one pinned host buffer and one asynchronous copy per step instead of five pageable ones:
        # [input_ids n | positions n | slot_mapping n | seq_lens n | block_tables n * max_blocks], int64.
        self.max_blocks_per_seq = max_blocks_per_seq
        # NOTE: two host buffers used in turn: with async scheduling the host fills step N+1's while step
        # N's copy may still be queued; step N-1's (the other buffer) is done, the engine has read its tokens.
        self._hosts = [torch.empty(n * (4 + max_blocks_per_seq), dtype=torch.int64, pin_memory=True)
                       for _ in range(2)]  # fmt: skip
        self._turn = 0
        self._staging = torch.empty(self._hosts[0].shape, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            seq_lens_tensor=self.seq_lens[:bs],
            query_start_loc_tensor=self.query_start_loc[: bs + 1],
            seq_lens=[],
            query_start_loc=[],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.monotonic()
        pool = None
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            self.model(self.input_ids[:bs], self.positions[:bs], meta)  # warm-up: compiles the kernels
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model(self.input_ids[:bs], self.positions[:bs], meta)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(self.sizes), self.sizes[-1],
                    time.monotonic() - start)  # fmt: skip

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def run(self, inputs: StepInputs, fill: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Replay the graph for ``len(inputs.seq_lens)`` sequences; returns their hidden states.

        ``fill`` (rows, token ids on the device) overwrites input ids that the host does not know yet.
        """
        n = len(inputs.seq_lens)
        bs = next(s for s in self.sizes if s >= n)
        width = inputs.block_tables.shape[1]
        end = 4 * bs + n * width
        host_tensor = self._hosts[self._turn]
        self._turn ^= 1
        host = host_tensor.numpy()
        ids, pos, slots, lens = (host[k * bs : (k + 1) * bs] for k in range(4))
        ids[:n], pos[:n], slots[:n], lens[:n] = (
            inputs.input_ids,
            inputs.positions,
            inputs.slot_mapping,
            inputs.seq_lens,
        )
        # Padding rows: slot -1 (the cache write skips them) and length 0 (attention returns zeros).
        ids[n:], pos[n:], slots[n:], lens[n:] = 0, 0, -1, 0
        host[4 * bs : end] = inputs.block_tables.reshape(-1)
        staging = self._staging[:end]
        staging.copy_(host_tensor[:end], non_blocking=True)
        self.input_ids[:bs].copy_(staging[0:bs])
        if fill is not None:
            self.input_ids.index_copy_(0, *fill)
        self.positions[:bs].copy_(staging[bs : 2 * bs])
        self.slot_mapping[:bs].copy_(staging[2 * bs : 3 * bs])
        self.seq_lens[:bs].copy_(staging[3 * bs : 4 * bs])
        self.block_tables[:n, :width].copy_(staging[4 * bs : end].view(n, width))
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
