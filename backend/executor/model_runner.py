"""Runs one scheduled step on the model: its flat token batch (``step_inputs``) through the forward to logits.

On CUDA, pure-decode steps replay a captured CUDA graph (``cuda_graphs.DecodeGraphs``), and so do small
steps with prefill tokens (``cuda_graphs.MixedGraphs``); the rest run eagerly.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from inflight.backend.executor.cuda_graphs import DecodeGraphs, MixedGraphs, graph_batch_sizes
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.prompt_logprobs import PromptLogprobRequest, PromptRows, prompt_rows
from inflight.backend.executor.step_inputs import AttentionMetadata, PendingTokens, StepInputs, flatten_step
from inflight.batching import SchedulerOutput


@dataclass
class ModelOutput:
    """Logits for the requests that sample a token this step, in scheduling order."""

    request_ids: list[str]
    logits: torch.Tensor  # [len(request_ids), vocab] fp32
    prompt_hidden: torch.Tensor | None = None  # [len(prompt_plan.rows), hidden]: final hidden states
    prompt_plan: PromptRows | None = None  # the step's prompt-logprob rows, if any request wants them


@dataclass
class PreparedStep:
    """A step as the forward takes it: flat inputs, pending-token fill, prompt-logprob rows."""

    inputs: StepInputs
    fill: tuple[torch.Tensor, torch.Tensor] | None  # (rows of the flat batch, their ids) on the device
    plan: PromptRows | None


def kv_cache_bytes_per_block(
    cfg: ModelConfig, block_size: int, kv_dtype: torch.dtype, num_kv_heads: int
) -> int:
    """Bytes one block takes across all layers (K and V)."""
    itemsize = torch.empty(0, dtype=kv_dtype).element_size()
    return cfg.num_layers * 2 * block_size * num_kv_heads * cfg.head_dim * itemsize


class ModelRunner:
    """Owns the model and its KV cache; turns a ``SchedulerOutput`` into logits."""

    def __init__(self, model: nn.Module, device: torch.device, block_size: int, kv_dtype: torch.dtype,
                 max_model_len: int) -> None:  # fmt: skip
        self.model = model
        self.device = device
        self.block_size = block_size
        self.kv_dtype = kv_dtype  # the cache's: the model dtype, or float8_e4m3fn (its layers own the scales)
        self.max_model_len = max_model_len
        self.num_blocks = 0
        self.kv_cache: torch.Tensor | None = None
        # [num_host_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] in host memory (pinned on
        # CUDA): the KV of swapped-out requests, one block's layers and K/V together per row
        self.host_kv_cache: torch.Tensor | None = None
        self._swap_stream: torch.cuda.Stream | None = None
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.logits_sizes: list[int] = []  # row counts the logits GEMM is padded to (``warm_logits``)

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype | None = None) -> None:
        """``[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]``, bound to each layer;
        in ``kv_dtype`` unless ``dtype`` is given (the FP8 scales' calibration runs over a full-precision
        cache)."""
        layers = self.model.attention_layers()
        first = layers[0]
        self.kv_cache = None  # free a previous (profiling) cache first
        self.kv_cache = torch.zeros(len(layers), 2, num_blocks, self.block_size, first.num_kv_heads, first.head_dim,
                                    dtype=dtype or self.kv_dtype, device=self.device)  # fmt: skip
        self.num_blocks = num_blocks
        for i, layer in enumerate(layers):
            layer.bind_kv_cache(self.kv_cache[i, 0], self.kv_cache[i, 1])

    def allocate_host_cache(self, num_blocks: int) -> None:
        """Host blocks for swapped-out KV (see ``swap``); 0 allocates none."""
        assert self.kv_cache is not None, "allocate the device cache first"
        cache = self.kv_cache
        self.host_kv_cache = (
            torch.empty(
                (num_blocks, *cache.shape[:2], *cache.shape[3:]),
                dtype=cache.dtype,
                pin_memory=self.device.type == "cuda",
            )
            if num_blocks
            else None
        )
        if num_blocks and self.device.type == "cuda":
            self._swap_stream = torch.cuda.Stream(self.device)

    @torch.inference_mode()
    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copy blocks device -> host (``(device, host)`` pairs) and host -> device (``(host, device)``).

        Ordered on the device's stream before the step's forward: a swapped-out block is gathered after the
        step in flight wrote it and before this step reuses it, and a swapped-in one is in place before
        attention reads it. The host never reads or writes the host blocks itself.

        On CUDA the PCIe copies run on a stream of their own, in the order given (outs, then ins), so they
        overlap the forwards: the step in flight's while a swap-in's blocks come over, and this step's while
        a swap-out's go. Only the device-side gather and scatter are on the compute stream, which waits for
        a swap-in's copies just before its scatter (1000/1000 on an H100: 0.87 s of device time between
        steps went to copies on the compute stream, 2026-11-22).

        An FP8 cache is copied as bytes (``index_copy_`` has no float8 kernel on the CPU).
        """
        cache, host = self.kv_cache, self.host_kv_cache
        assert cache is not None and host is not None, "no host cache to swap with"
        if cache.dtype == torch.float8_e4m3fn:
            cache, host = cache.view(torch.uint8), host.view(torch.uint8)
        side = self._swap_stream
        main = torch.cuda.current_stream(self.device) if side is not None else None
        if swap_out:
            ids = torch.tensor([d for d, _ in swap_out], dtype=torch.int64, device=self.device)
            blocks = cache.index_select(2, ids).permute(2, 0, 1, 3, 4, 5).contiguous()  # [n, L, 2, ...]
            with _on(side, after=main):
                for row, (_, h) in enumerate(swap_out):
                    host[h].copy_(blocks[row], non_blocking=True)
            if side is not None:
                blocks.record_stream(side)  # not reused before the copies end
        if swap_in:
            with _on(side):
                staged = torch.empty((len(swap_in), *host.shape[1:]), dtype=host.dtype, device=self.device)
                for row, (h, _) in enumerate(swap_in):
                    staged[row].copy_(host[h], non_blocking=True)
            if side is not None:
                main.wait_stream(side)
                staged.record_stream(main)
            ids = torch.tensor([d for _, d in swap_in], dtype=torch.int64, device=self.device)
            cache.index_copy_(2, ids, staged.permute(1, 2, 0, 3, 4, 5))

    @torch.inference_mode()
    def profile_peak_bytes(self, num_tokens: int, num_sample_rows: int) -> int:
        """Peak activation memory of the largest step (one ``num_tokens`` prefill, logits for many rows)."""
        num_tokens = min(num_tokens, self.max_model_len)
        blocks = math.ceil(num_tokens / self.block_size)
        self.allocate_kv_cache(blocks + 1)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        table = np.arange(1, blocks + 1, dtype=np.int64)

        def prompt(n: int) -> StepInputs:
            pos = np.arange(n, dtype=np.int64)
            return StepInputs(np.zeros(n, np.int64), pos, table[pos // self.block_size] * self.block_size
                              + pos % self.block_size, table[None].astype(np.int32), [n], [0, n],
                              [n - 1] * num_sample_rows, [])  # fmt: skip

        hidden = self._forward_eager(prompt(num_tokens), None)
        self.model.compute_logits(hidden[-1:].expand(num_sample_rows, -1).contiguous())
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del hidden
        # NOTE: prefill attention picks its tiles by the step's longest query (SHORT_QUERY_TOKENS), so a
        # short prompt runs too: its kernels compile now, not in a user's first short request.
        from inflight.kernels.paged_prefill_attention import SHORT_QUERY_TOKENS

        if num_tokens > SHORT_QUERY_TOKENS:
            self._forward_eager(prompt(16), None)
        self.release_kv_cache()
        return peak

    @torch.inference_mode()
    def kv_amax(self, prompts: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        """``[num_layers, 2]`` fp32: each layer's largest ``|K|`` (after RoPE) and ``|V|`` over one eager
        prefill of ``prompts`` (token ids, each from position 0) through a temporary cache in ``dtype``,
        freed after. The FP8 cache's scales are calibrated by it (``kv_scales.py``)."""
        bs = self.block_size
        widths = [math.ceil(len(p) / bs) for p in prompts]
        tables = np.zeros((len(prompts), max(widths)), dtype=np.int32)
        slots, positions, first = [], [], 1  # block 0 is the null block
        for i, (prompt, width) in enumerate(zip(prompts, widths, strict=True)):
            tables[i, :width] = np.arange(first, first + width)
            pos = np.arange(len(prompt), dtype=np.int64)
            slots.append(tables[i, pos // bs].astype(np.int64) * bs + pos % bs)
            positions.append(pos)
            first += width
        starts = np.cumsum([0] + [len(p) for p in prompts]).tolist()
        inputs = StepInputs(np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts]),
                            np.concatenate(positions), np.concatenate(slots), tables, [len(p) for p in prompts],
                            starts, [], [])  # fmt: skip
        self.allocate_kv_cache(first, dtype)
        try:
            self._forward_eager(inputs, None, self._to_device(np.asarray(starts[1:], dtype=np.int64) - 1))
            # NOTE: unwritten slots (the null block, a last block's tail) hold zeros: no effect on the max.
            return self.kv_cache.abs().amax(dim=(2, 3, 4, 5)).float()
        finally:
            self.release_kv_cache()

    def release_kv_cache(self) -> None:
        """Unbind and free the cache (after a profiling or calibration pass)."""
        self.kv_cache = None
        for layer in self.model.attention_layers():
            layer.bind_kv_cache(None, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def capture_cuda_graphs(
        self, max_batch_size: int, max_prefill_tokens: int = 0, max_num_seqs: int = 1
    ) -> None:
        """Capture decode steps for a ladder of batch sizes up to ``max_batch_size`` and, if
        ``max_prefill_tokens``, steps with prefill tokens up to that many tokens (and 16 sequences)."""
        max_blocks = math.ceil(self.max_model_len / self.block_size)
        pool = None
        if max_prefill_tokens:
            self.mixed_graphs = MixedGraphs(self.model, self.device, min(max_prefill_tokens, self.max_model_len),
                                            max_num_seqs, max_blocks, self.max_model_len)  # fmt: skip
            pool = self.mixed_graphs.capture()  # the larger steps first, so the decode graphs share the pool
        self.graphs = DecodeGraphs(self.model, self.device, max_batch_size, max_blocks, self.max_model_len)
        self.graphs.capture(pool)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def _pending_tokens(
        self, inputs: StepInputs, pending: PendingTokens | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows of the flat batch, their token ids on the device) for the inputs still being sampled, or
        None when there are none or the host has them (written into ``inputs.input_ids`` then)."""
        if not inputs.pending_rows:
            return None
        if pending is None:
            raise ValueError("the step has pending input tokens but no previous step's tokens were given")
        if pending.host_ids is not None:
            inputs.input_ids[inputs.pending_rows] = [
                pending.host_ids[pending.rows[r]] for r in inputs.pending_ids
            ]
            return None
        index = np.array([inputs.pending_rows, [pending.rows[r] for r in inputs.pending_ids]], dtype=np.int64)
        index = self._to_device(index)
        return index[0], pending.device_ids.index_select(0, index[1])

    def _forward_eager(
        self,
        inputs: StepInputs,
        fill: tuple[torch.Tensor, torch.Tensor] | None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self._to_device(inputs.slot_mapping),
            block_tables=self._to_device(inputs.block_tables),
            seq_lens_tensor=self._to_device(np.asarray(inputs.seq_lens, dtype=np.int32)),
            query_start_loc_tensor=self._to_device(np.asarray(inputs.query_start_loc, dtype=np.int32)),
            seq_lens=inputs.seq_lens,
            query_start_loc=inputs.query_start_loc,
            max_query_len=max(
                b - a for a, b in zip(inputs.query_start_loc, inputs.query_start_loc[1:], strict=False)
            ),
            max_seq_len=max(inputs.seq_lens),
        )
        input_ids = self._to_device(inputs.input_ids)
        if fill is not None:
            input_ids.index_copy_(0, *fill)
        return self.model(input_ids, self._to_device(inputs.positions), meta, rows)

    def prepare(
        self,
        out: SchedulerOutput,
        pending: PendingTokens | None = None,
        prompt_logprobs: Mapping[str, PromptLogprobRequest] | None = None,
    ) -> PreparedStep:
        """A step's flat inputs (``StepInputs``), the device ids of its pending tokens, its prompt-logprob rows.

        ``pending`` is the previous step's sampled tokens: a chunk whose last token is pending
        (``last_token_pending``) takes its id from there. ``prompt_logprobs``: requests that want their
        prompt's log-probabilities.
        """
        inputs = flatten_step(out, self.block_size)
        fill = self._pending_tokens(inputs, pending)
        plan = prompt_rows(out, inputs.query_start_loc, prompt_logprobs) if prompt_logprobs else None
        return PreparedStep(inputs, fill, plan)

    @torch.inference_mode()
    def execute(
        self,
        out: SchedulerOutput,
        pending: PendingTokens | None = None,
        prompt_logprobs: Mapping[str, PromptLogprobRequest] | None = None,
        on_prepared: Callable[[PreparedStep], None] | None = None,
    ) -> ModelOutput:
        """``run(prepare(...))``: one step on the model (see both). ``on_prepared(step)`` before the run:
        tensor parallelism's rank 0 ships the step to the other ranks there."""
        step = self.prepare(out, pending, prompt_logprobs)
        if on_prepared is not None:
            on_prepared(step)
        return self.run(step)

    @torch.inference_mode()
    def run(self, step: PreparedStep) -> ModelOutput:
        """Run the model on one prepared step; logits only for the rows that end a request's tokens, and the
        final hidden states of the prompt-logprob rows (``prompt_hidden``) when the step has some.

        Every tensor-parallel rank runs this on the same ``step`` (rank 0 ships it to the others), so each
        takes the same branch below and issues the same collectives."""
        inputs, fill, plan = step.inputs, step.fill, step.plan
        num_seqs = len(inputs.seq_lens)
        if self.graphs is not None and inputs.is_decode and self.graphs.can_run(num_seqs):
            hidden = self.graphs.run(inputs, fill)
        elif (
            self.mixed_graphs is not None
            and not inputs.is_decode
            and self.mixed_graphs.can_run(len(inputs.input_ids), num_seqs)
        ):
            hidden = self.mixed_graphs.run(inputs, fill)
        elif plan is not None:
            # The last layer goes past attention for the sampled and the prompt-logprob rows only.
            rows = inputs.logits_rows + plan.rows
            hidden = self._forward_eager(inputs, fill, self._to_device(np.asarray(rows, dtype=np.int64)))
            return self._with_prompt_rows(inputs, hidden, plan)
        elif inputs.logits_rows and len(inputs.logits_rows) < len(inputs.input_ids):
            # The last layer goes past attention for the sampled rows only (padded as ``_logits`` would).
            index = self._to_device(self._padded_rows(inputs.logits_rows))
            hidden = self._forward_eager(inputs, fill, index)
            return ModelOutput(inputs.sample_ids, self._head(hidden, len(inputs.logits_rows)))
        else:
            hidden = self._forward_eager(inputs, fill)
        if plan is not None:
            # NOTE: a graph computes every row (padding after them): pick the sampled rows, then the plan's.
            rows = self._to_device(np.asarray(inputs.logits_rows + plan.rows, dtype=np.int64))
            return self._with_prompt_rows(inputs, hidden.index_select(0, rows), plan)
        if not inputs.logits_rows:
            return ModelOutput([], hidden.new_empty((0, 0), dtype=torch.float32))
        return ModelOutput(inputs.sample_ids, self._logits(hidden, len(inputs.input_ids), inputs.logits_rows))

    def _with_prompt_rows(self, inputs: StepInputs, picked: torch.Tensor, plan: PromptRows) -> ModelOutput:
        """``picked``: the final hidden states of the sampled rows, then of ``plan.rows``."""
        n = len(inputs.logits_rows)
        logits = (
            self._logits(picked, n + len(plan.rows), list(range(n)))
            if n
            else picked.new_empty((0, 0), dtype=torch.float32)
        )
        return ModelOutput(inputs.sample_ids, logits, picked[n:], plan)

    def warm_logits(self, max_rows: int, dtype: torch.dtype) -> None:
        """From now on the logits GEMM runs on a row count from ``graph_batch_sizes(max_rows)`` (the step's
        rows padded up, by 15 rows at most), each of which runs once here.

        NOTE: cuBLAS's first GEMM of a new shape costs up to ~12 ms of host time (this one's median on an
        H200: 4.8 ms, against 0.06 ms repeated: ``benchmarks/kernels/bench_gemm_first_call.py``) and can
        wait for the device to drain; the row count is the step's number of sampled requests, new at almost
        every step of a batch that winds down or fills up. Left alone, 128/128 of an 8B model on an H200
        (2026-12-03) idled the GPU 37 ms (gaps of 12 and 10 ms before the steps where requests finish, 8 and
        6 ms before prefill steps) and not at all on a second run of the same requests in the same process.
        """
        sizes = graph_batch_sizes(max_rows)
        hidden = torch.zeros(sizes[-1], self.model.config.hidden_size, dtype=dtype, device=self.device)
        with torch.inference_mode():
            for size in sizes:
                self.model.compute_logits(hidden[:size])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.logits_sizes = sizes

    def _logits(self, hidden: torch.Tensor, num_tokens: int, rows: list[int]) -> torch.Tensor:
        """Logits of ``rows`` of ``hidden`` (the step's ``num_tokens`` tokens, then any padding rows), with the
        GEMM's row count padded to ``logits_sizes`` (see ``warm_logits``)."""
        n = len(rows)
        if n == num_tokens and self._logits_size(n) <= hidden.shape[0]:
            picked = hidden[: self._logits_size(n)]  # every token is sampled (decode): in order, then padding
        else:
            picked = hidden.index_select(0, self._to_device(self._padded_rows(rows)))
        return self._head(picked, n)

    def _head(self, picked: torch.Tensor, n: int) -> torch.Tensor:
        """The logits of the first ``n`` of ``picked``'s rows (the rest pad the GEMM's row count)."""
        logits = self.model.compute_logits(picked)
        return logits if picked.shape[0] == n else logits[:n]

    def _logits_size(self, n: int) -> int:
        """The GEMM's row count for ``n`` rows: the next size of ``logits_sizes`` (``n`` past them)."""
        sizes = self.logits_sizes
        return sizes[bisect.bisect_left(sizes, n)] if sizes and n <= sizes[-1] else n

    def _padded_rows(self, rows: list[int]) -> np.ndarray:
        """``rows`` with the last repeated up to ``_logits_size`` rows, as an index array."""
        return np.asarray(rows + [rows[-1]] * (self._logits_size(len(rows)) - len(rows)), dtype=np.int64)


@contextlib.contextmanager
def _on(stream: torch.cuda.Stream | None, after: torch.cuda.Stream | None = None) -> Iterator[None]:
    """Run the block's work on ``stream`` (after what ``after`` has queued so far); None: where it is."""
    if stream is None:
        yield
        return
    if after is not None:
        stream.wait_stream(after)
    with torch.cuda.stream(stream):
        yield
