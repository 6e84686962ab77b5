"""Runs one scheduled step on the model: builds the flat token batch and its paged-attention metadata.

A step is one flat batch of tokens from every scheduled request (prefill chunks and decodes mixed)::

    input_ids   [ r0 t0..t4 | r1 t9 | r2 t0..t2 ]      positions [ 0..4 | 9 | 0..2 ]
    query_start_loc [0, 5, 6, 9]    seq_lens [5, 10, 3]    slot = block_table[pos // bs] * bs + pos % bs
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..batching import SchedulerOutput
from .layers.attention import AttentionMetadata
from .model_config import ModelConfig


@dataclass
class ModelOutput:
    """Logits for the requests that sample a token this step, in scheduling order."""

    request_ids: list[str]
    logits: torch.Tensor  # [len(request_ids), vocab] fp32


def kv_cache_bytes_per_block(
    cfg: ModelConfig, block_size: int, kv_dtype: torch.dtype, num_kv_heads: int
) -> int:
    """Bytes one block takes across all layers (K and V)."""
    itemsize = torch.empty(0, dtype=kv_dtype).element_size()
    return cfg.num_layers * 2 * block_size * num_kv_heads * cfg.head_dim * itemsize


class ModelRunner:
    """Owns the model and its KV cache; turns a ``SchedulerOutput`` into logits."""

    def __init__(
        self, model: nn.Module, device: torch.device, block_size: int, num_blocks: int, kv_dtype: torch.dtype
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        layers = model.attention_layers()
        first = layers[0]
        # [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_cache = torch.zeros(
            len(layers),
            2,
            num_blocks,
            block_size,
            first.num_kv_heads,
            first.head_dim,
            dtype=kv_dtype,
            device=device,
        )
        for i, layer in enumerate(layers):
            layer.bind_kv_cache(self.kv_cache[i, 0], self.kv_cache[i, 1])

    def prepare(
        self, out: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[str]]:
        """Flatten a step into ``input_ids``, ``positions``, metadata and the rows whose logits are needed."""
        bs = self.block_size
        num_tokens = out.num_batched_tokens
        input_ids = np.empty(num_tokens, dtype=np.int64)
        positions = np.empty(num_tokens, dtype=np.int64)
        slot_mapping = np.empty(num_tokens, dtype=np.int64)
        max_blocks = max(len(r.block_ids) for r in out.scheduled)
        block_tables = np.zeros((len(out.scheduled), max_blocks), dtype=np.int32)
        seq_lens: list[int] = []
        query_start_loc = [0]
        logits_rows: list[int] = []
        sample_ids: list[str] = []
        offset = 0
        for i, req in enumerate(out.scheduled):
            n = len(req.token_ids)
            table = np.asarray(req.block_ids, dtype=np.int64)
            pos = np.arange(req.start_position, req.start_position + n, dtype=np.int64)
            input_ids[offset : offset + n] = req.token_ids
            positions[offset : offset + n] = pos
            slot_mapping[offset : offset + n] = table[pos // bs] * bs + pos % bs
            block_tables[i, : len(table)] = table
            offset += n
            seq_lens.append(req.start_position + n)
            query_start_loc.append(offset)
            if req.needs_sample:
                logits_rows.append(offset - 1)
                sample_ids.append(req.request_id)
        assert offset == num_tokens, "scheduled tokens do not add up to num_batched_tokens"
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slot_mapping).to(self.device),
            block_tables=torch.from_numpy(block_tables).to(self.device),
            seq_lens=seq_lens,
            query_start_loc=query_start_loc,
            max_query_len=max(b - a for a, b in zip(query_start_loc, query_start_loc[1:], strict=False)),
            max_seq_len=max(seq_lens),
        )
        ids = torch.from_numpy(input_ids).to(self.device)
        pos_t = torch.from_numpy(positions).to(self.device)
        return ids, pos_t, meta, logits_rows, sample_ids

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelOutput:
        """Run the model on one step; logits only for the rows that end a request's known tokens."""
        input_ids, positions, meta, rows, sample_ids = self.prepare(out)
        hidden = self.model(input_ids, positions, meta)
        if not rows:
            return ModelOutput(sample_ids, hidden.new_empty((0, 0), dtype=torch.float32))
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        return ModelOutput(sample_ids, self.model.compute_logits(hidden.index_select(0, index)))
