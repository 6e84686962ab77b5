"""One step's inputs: the flat token batch a ``SchedulerOutput`` becomes, and its paged-attention metadata.

A step is one flat batch of tokens from every scheduled request (prefill chunks and decodes mixed)::

    input_ids   [ r0 t0..t4 | r1 t9 | r2 t0..t2 ]      positions [ 0..4 | 9 | 0..2 ]
    query_start_loc [0, 5, 6, 9]    seq_lens [5, 10, 3]    slot = block_table[pos // bs] * bs + pos % bs

``flatten_step`` builds it on the host (``StepInputs``); the model runner and the CUDA graphs copy it to the
device as ``AttentionMetadata`` plus ids and positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from inflight.batching import ScheduledRequest, SchedulerOutput


@dataclass
class AttentionMetadata:
    """Where a step's tokens sit in the paged KV cache; built once per step by the model runner."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset; -1 = padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with the null block 0
    seq_lens_tensor: torch.Tensor  # [num_seqs] int32: cached tokens after this step
    query_start_loc_tensor: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: list[int]  # the same on the host (the CPU reference path)
    query_start_loc: list[int]
    max_query_len: int
    max_seq_len: int  # an upper bound of seq_lens (a CUDA graph uses max_model_len)


@dataclass
class StepInputs:
    """One step's flattened inputs, on the host."""

    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    block_tables: np.ndarray  # [num_seqs, max_blocks] int32
    seq_lens: list[int]
    query_start_loc: list[int]
    logits_rows: list[int]  # rows of the flat batch whose logits are sampled
    sample_ids: list[str]
    pending_rows: list[int] = dataclasses.field(default_factory=list)  # rows whose id is on the device
    pending_ids: list[str] = dataclasses.field(default_factory=list)  # the request of each pending row

    @property
    def is_decode(self) -> bool:
        return len(self.input_ids) == len(self.seq_lens)


@dataclass
class PendingTokens:
    """The tokens of the step in flight: inputs of this step's decodes planned before they were sampled."""

    rows: dict[str, int]  # request id -> its row in `device_ids`
    device_ids: torch.Tensor  # [num_rows] int64 on the device
    host_ids: list[int] | None = None  # the same ids, when the host has them already


def flatten_step(out: SchedulerOutput, block_size: int) -> StepInputs:
    """The flat token batch of a scheduled step (see the module docstring).

    NOTE: vectorised over requests (a decode step of 256 long sequences would otherwise spend
    milliseconds in per-request numpy calls): one pass collects Python lists, numpy does the rest. A step
    of a few tokens (decodes at low load, where the host's time is the step's latency) is built in plain
    Python instead: numpy's per-call cost is most of the work there (4 decodes: 26 instead of 72 us).
    """
    if out.num_batched_tokens <= SMALL_STEP_TOKENS:
        return _flatten_small_step(out, block_size)
    scheduled = out.scheduled
    num_seqs = len(scheduled)
    lens = np.fromiter((len(r.token_ids) for r in scheduled), dtype=np.int64, count=num_seqs)
    starts = np.fromiter((r.start_position for r in scheduled), dtype=np.int64, count=num_seqs)
    widths = np.fromiter((len(r.block_ids) for r in scheduled), dtype=np.int64, count=num_seqs)
    num_tokens = int(lens.sum())
    assert num_tokens == out.num_batched_tokens, "scheduled tokens do not add up to num_batched_tokens"
    input_ids = np.fromiter(
        chain.from_iterable(r.token_ids for r in scheduled), dtype=np.int64, count=num_tokens
    )
    block_tables = np.zeros((num_seqs, int(widths.max())), dtype=np.int32)
    block_tables[np.arange(block_tables.shape[1]) < widths[:, None]] = np.fromiter(
        chain.from_iterable(r.block_ids for r in scheduled), dtype=np.int32, count=int(widths.sum())
    )
    ends = np.cumsum(lens)
    rows = np.repeat(np.arange(num_seqs), lens)  # the request of each token
    positions = starts[rows] + np.arange(num_tokens) - (ends - lens)[rows]
    slot_mapping = (
        block_tables[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size
    )
    return _step_inputs(scheduled, input_ids, positions, slot_mapping, block_tables, (starts + lens).tolist(),
                        [0, *ends.tolist()])  # fmt: skip


def _step_inputs(
    scheduled: list[ScheduledRequest],
    input_ids: np.ndarray,
    positions: np.ndarray,
    slot_mapping: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: list[int],
    query_start_loc: list[int],
) -> StepInputs:
    """``StepInputs`` with the sampled and pending rows: each the last token of its request's chunk."""
    sample = [i for i, r in enumerate(scheduled) if r.needs_sample]
    pending = [i for i, r in enumerate(scheduled) if r.last_token_pending]
    return StepInputs(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        block_tables=block_tables,
        seq_lens=seq_lens,
        query_start_loc=query_start_loc,
        logits_rows=[query_start_loc[i + 1] - 1 for i in sample],
        sample_ids=[scheduled[i].request_id for i in sample],
        pending_rows=[query_start_loc[i + 1] - 1 for i in pending],
        pending_ids=[scheduled[i].request_id for i in pending],
    )


SMALL_STEP_TOKENS = 32  # steps of at most this many tokens are flattened in plain Python


def _flatten_small_step(out: SchedulerOutput, block_size: int) -> StepInputs:
    """``flatten_step`` for a few tokens, request by request."""
    scheduled = out.scheduled
    block_tables = np.zeros((len(scheduled), max(len(r.block_ids) for r in scheduled)), dtype=np.int32)
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seq_lens: list[int] = []
    ends = [0]
    for i, r in enumerate(scheduled):
        table = r.block_ids
        block_tables[i, : len(table)] = table
        span = range(r.start_position, r.start_position + len(r.token_ids))
        ids += r.token_ids
        positions += span
        slots += [table[p // block_size] * block_size + p % block_size for p in span]
        seq_lens.append(span.stop)
        ends.append(len(ids))
    assert len(ids) == out.num_batched_tokens, "scheduled tokens do not add up to num_batched_tokens"
    return _step_inputs(scheduled, np.array(ids, dtype=np.int64), np.array(positions, dtype=np.int64),
                        np.array(slots, dtype=np.int64), block_tables, seq_lens, ends)  # fmt: skip
