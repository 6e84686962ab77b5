"""Paged KV caches for the attention tests: shuffled block ids with gaps, NaN wherever no token lives."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with the null block 0
    seq_lens: list[int]
    query_start_loc: list[int]

    def seq_lens_t(self) -> torch.Tensor:
        return torch.tensor(self.seq_lens, dtype=torch.int32, device=self.query.device)

    def query_start_loc_t(self) -> torch.Tensor:
        return torch.tensor(self.query_start_loc, dtype=torch.int32, device=self.query.device)


def make_paged_case(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    seq_lens: list[int],
    query_lens: list[int],
    dtype: torch.dtype,
    device: torch.device,
    extra_table_columns: int = 2,
) -> PagedCase:
    """Sequence i owns ``cdiv(seq_lens[i], block_size)`` random blocks (not contiguous, not sorted; about
    half the pool stays unused). Unused blocks, the null block and the slots past each sequence's end
    hold NaN, so a kernel that reads a key it should not read returns NaN."""
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = 1 + 2 * sum(blocks_needed) + 3
    pool = (torch.randperm(num_blocks - 1) + 1).tolist()  # every block but the null block 0
    max_blocks = max(blocks_needed, default=0) + extra_table_columns
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for i, (seq_len, n) in enumerate(zip(seq_lens, blocks_needed, strict=True)):
        ids = pool[2 * sum(blocks_needed[:i]) :][: 2 * n : 2]  # every other block: gaps between them
        block_tables[i, :n] = torch.tensor(ids, dtype=torch.int32)
        for j, block in enumerate(ids):
            used = min(block_size, seq_len - j * block_size)
            k_cache[block, :used] = torch.randn(used, num_kv_heads, head_dim).to(dtype)
            v_cache[block, :used] = torch.randn(used, num_kv_heads, head_dim).to(dtype)
    query_start_loc = [0]
    for n in query_lens:
        query_start_loc.append(query_start_loc[-1] + n)
    query = torch.randn(query_start_loc[-1], num_heads, head_dim).to(dtype)
    return PagedCase(
        query.to(device),
        k_cache.to(device),
        v_cache.to(device),
        block_tables.to(device),
        list(seq_lens),
        query_start_loc,
    )
