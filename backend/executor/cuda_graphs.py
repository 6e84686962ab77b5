"""CUDA graphs for decode steps (one new token per sequence) and for small steps with prefill tokens.

Each kind is a ladder of sizes, captured largest first into one memory pool. A step replays the smallest
captured size that holds it: tokens past its own are padding with slot -1 (the cache write skips them),
sequences past its own have no query tokens and length 0 (attention gives them no work).

- Decode: a ladder of batch sizes. Decode attention inside a graph splits every sequence by
  ``max_model_len``, so the captured grid never depends on the step.
- Mixed (prefill chunks, maybe beside decodes): (token count, sequence count) buckets up to
  ``max_cuda_graph_prefill_tokens`` tokens and 16 sequences. Eagerly, such a step is bound by the host's
  kernel launches (a 467-token prefill of an 8B model: 23.5 ms a step for 10.9 ms of kernels on an H200).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from inflight.backend.executor.step_inputs import AttentionMetadata, StepInputs

logger = logging.getLogger("inflight")


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch_size`` (which is always included)."""
    sizes = {s for s in (1, 2, 4, 8) if s <= max_batch_size}
    sizes.update(range(16, max_batch_size + 1, 16))
    sizes.add(max_batch_size)
    return sorted(sizes)


def graph_token_sizes(max_tokens: int) -> list[int]:
    """Token counts of the mixed-step graphs: 32, 64, 128, then every multiple of 128 up to ``max_tokens``."""
    sizes = {s for s in (32, 64) if s < max_tokens}
    sizes.update(range(128, max_tokens + 1, 128))
    sizes.add(max_tokens)
    return sorted(sizes)


# Mixed steps of at most this many sequences replay a graph: a graph's prefill attention launches a program
# for every (sequence, query tile) the bucket allows, and those of short or padding sequences return at once.
MIXED_GRAPH_SEQS = (1, 2, 4, 8, 16)


def _sections(num_tokens: int, num_seqs: int) -> tuple[slice, ...]:
    """Where ``pack_step`` puts input_ids, positions, slot_mapping, seq_lens and query_start_loc, and where
    the block tables start."""
    T, S = num_tokens, num_seqs
    return (slice(0, T), slice(T, 2 * T), slice(2 * T, 3 * T), slice(3 * T, 3 * T + S),
            slice(3 * T + S, 3 * T + 2 * S + 1), slice(3 * T + 2 * S + 1, None))  # fmt: skip


def pack_step(inputs: StepInputs, host: np.ndarray, num_tokens: int, num_seqs: int) -> int:
    """Lay out a step's inputs, padded to a graph's ``num_tokens`` / ``num_seqs``, in one int64 host buffer.

    ``[input_ids T | positions T | slot_mapping T | seq_lens S | query_start_loc S + 1 | block_tables n x w]``;
    returns the length used. Padding tokens have slot -1 (the cache write skips them) and belong to no
    sequence; padding sequences have no query tokens (``query_start_loc`` stays at the real token count)
    and length 0, so attention gives them no work.
    """
    t, n = len(inputs.input_ids), len(inputs.seq_lens)
    parts = _sections(num_tokens, num_seqs)
    ids, pos, slots, lens, qsl, tables = (host[part] for part in parts)
    ids[:t], pos[:t], slots[:t], lens[:n] = (
        inputs.input_ids,
        inputs.positions,
        inputs.slot_mapping,
        inputs.seq_lens,
    )
    ids[t:], pos[t:], slots[t:], lens[n:] = 0, 0, -1, 0
    qsl[: n + 1] = inputs.query_start_loc
    qsl[n + 1 :] = t
    tables[: inputs.block_tables.size] = inputs.block_tables.reshape(-1)
    return parts[-1].start + inputs.block_tables.size


class _StepGraphs:
    """Captured forwards of one kind of step, their static input buffers and the host buffers that fill them."""

    kind = "step"

    def __init__(self, model: nn.Module, device: torch.device, max_tokens: int, max_seqs: int,
                 max_blocks_per_seq: int, max_model_len: int) -> None:  # fmt: skip
        self.model = model
        self.device = device
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = max_blocks_per_seq

        def buffer(*shape: int, dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.input_ids = buffer(max_tokens, dtype=torch.int64)
        self.positions = buffer(max_tokens, dtype=torch.int64)
        self.slot_mapping = buffer(max_tokens, dtype=torch.int64, fill=-1)
        self.block_tables = buffer(max_seqs, max_blocks_per_seq, dtype=torch.int32)
        self.seq_lens = buffer(max_seqs, dtype=torch.int32)
        self.query_start_loc = torch.arange(max_seqs + 1, dtype=torch.int32, device=device)
        # NOTE: one pinned host buffer and one asynchronous copy per step instead of six pageable ones
        # (``pack_step``'s layout). Two host buffers used in turn: with async scheduling the host fills step
        # N+1's while step N's copy may still be queued; step N-1's (the other buffer) is done.
        size = 3 * max_tokens + 2 * max_seqs + 1 + max_seqs * max_blocks_per_seq
        pinned = device.type == "cuda"  # (CPU: only the host-side tests build these)
        self._hosts = [torch.empty(size, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
        self._turn = 0
        self._staging = torch.empty(size, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.replays = 0

    def _keys(self) -> list[tuple[int, int]]:
        """(tokens, sequences) of every graph, largest first."""
        raise NotImplementedError

    def _max_query_len(self, num_tokens: int) -> int:
        """The longest query a graph of ``num_tokens`` tokens is captured for (fixes attention's grid)."""
        raise NotImplementedError

    def _meta(self, num_tokens: int, num_seqs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            block_tables=self.block_tables[:num_seqs],
            seq_lens_tensor=self.seq_lens[:num_seqs],
            query_start_loc_tensor=self.query_start_loc[: num_seqs + 1],
            seq_lens=[],
            query_start_loc=[],
            max_query_len=self._max_query_len(num_tokens),
            max_seq_len=self.max_model_len,
        )

    def _forward(self, num_tokens: int, num_seqs: int) -> torch.Tensor:
        meta = self._meta(num_tokens, num_seqs)
        return self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], meta)

    def _unpack(self, num_tokens: int, num_seqs: int) -> None:
        """Staged step (``pack_step``'s layout) -> the static inputs, block tables aside (their width is the
        step's). Captured at the start of each graph: a replay costs the host no copy launches."""
        T, S = num_tokens, num_seqs
        ids, pos, slots, lens, qsl, _ = (self._staging[part] for part in _sections(T, S))
        self.input_ids[:T].copy_(ids)
        self.positions[:T].copy_(pos)
        self.slot_mapping[:T].copy_(slots)
        self.seq_lens[:S].copy_(lens)
        self._copy_query_start_loc(qsl)

    @torch.inference_mode()
    def capture(self, pool: object = None) -> object:
        """Capture every graph into ``pool`` (a new one if None); returns the pool for the next captures."""
        start = time.monotonic()
        for key in self._keys():
            self._forward(*key)  # warm-up: compiles the kernels
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._unpack(*key)
                self.outputs[key] = self._forward(*key)
            pool = graph.pool()
            self.graphs[key] = graph
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d %s CUDA graphs in %.1f s", len(self.graphs), self.kind, time.monotonic() - start
        )
        return pool

    def _bucket(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        raise NotImplementedError

    def run(self, inputs: StepInputs, fill: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Replay the smallest graph that holds the step; returns the hidden states of the whole bucket:
        the step's tokens first, then the padding's rows (meaningless; a GEMM keeps rows apart).

        ``fill`` (rows, token ids on the device) overwrites input ids that the host does not know yet.
        """
        t, n = len(inputs.input_ids), len(inputs.seq_lens)
        T, S = key = self._bucket(t, n)
        host_tensor = self._hosts[self._turn]
        self._turn ^= 1
        end = pack_step(inputs, host_tensor.numpy(), T, S)
        self._staging[:end].copy_(host_tensor[:end], non_blocking=True)
        if fill is not None:
            self._staging.index_copy_(0, *fill)  # the input ids come first in the staged layout
        width = inputs.block_tables.shape[1]
        tables = self._staging[_sections(T, S)[-1].start :][: n * width]
        self.block_tables[:n, :width].copy_(tables.view(n, width))
        self.graphs[key].replay()  # starts with `_unpack`
        self.replays += 1
        return self.outputs[key]

    def _copy_query_start_loc(self, staged: torch.Tensor) -> None:
        self.query_start_loc[: staged.shape[0]].copy_(staged)


class DecodeGraphs(_StepGraphs):
    """Decode steps (one token per sequence) of a ladder of batch sizes.

    Decode attention inside a graph splits every sequence by ``max_model_len``, so the captured grid never
    depends on the step. ``query_start_loc`` is always ``0..n``, set once.
    """

    kind = "decode"

    def __init__(self, model: nn.Module, device: torch.device, max_batch_size: int, max_blocks_per_seq: int,
                 max_model_len: int) -> None:  # fmt: skip
        self.sizes = graph_batch_sizes(max_batch_size)
        n = self.sizes[-1]
        super().__init__(model, device, n, n, max_blocks_per_seq, max_model_len)

    def _keys(self) -> list[tuple[int, int]]:
        return [(bs, bs) for bs in reversed(self.sizes)]

    def _max_query_len(self, num_tokens: int) -> int:
        return 1

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def _bucket(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        bs = next(s for s in self.sizes if s >= num_seqs)
        return bs, bs

    def _copy_query_start_loc(self, staged: torch.Tensor) -> None:
        pass  # 0..bs, never changes (padding sequences are past the real ones, with length 0)


class MixedGraphs(_StepGraphs):
    """Steps with prefill tokens (a prompt or a chunk, maybe beside decodes) of few sequences and tokens.

    Such a step runs eagerly in about twice its GPU time on a large model: the host launches some ten
    kernels a layer. A graph per (token count, sequence count) bucket, the step padded up to it. Prefill
    attention in a graph launches its grid for the bucket's token count as the longest query, so every
    (sequence, query tile) of the step has a program; the others return at once.
    """

    kind = "mixed-step"

    def __init__(self, model: nn.Module, device: torch.device, max_tokens: int, max_seqs: int,
                 max_blocks_per_seq: int, max_model_len: int) -> None:  # fmt: skip
        self.token_sizes = graph_token_sizes(max_tokens)
        self.seq_sizes = sorted({min(s, max_seqs) for s in MIXED_GRAPH_SEQS})
        super().__init__(model, device, self.token_sizes[-1], self.seq_sizes[-1], max_blocks_per_seq,
                         max_model_len)  # fmt: skip
        self.query_start_loc.zero_()  # while capturing, no sequence has query tokens: attention does nothing

    def _keys(self) -> list[tuple[int, int]]:
        return [(t, s) for t in reversed(self.token_sizes) for s in reversed(self.seq_sizes) if s <= t]

    def _max_query_len(self, num_tokens: int) -> int:
        return num_tokens  # any sequence may hold all of the bucket's tokens

    def can_run(self, num_tokens: int, num_seqs: int) -> bool:
        return num_tokens <= self.token_sizes[-1] and num_seqs <= self.seq_sizes[-1]

    def _bucket(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        t = next(s for s in self.token_sizes if s >= num_tokens)
        return t, next(s for s in self.seq_sizes if s >= num_seqs)
