"""The executor floor's one door: a model on a device, its KV cache, and each step's forward and sampling.

The engine hands it a scheduled step and the sampling rows' parameters, and gets back a ``StepHandle``: the
step is launched (forward, then sampler) and its tokens are on their way to the host. The engine reads them
with ``StepHandle.read()`` as plain lists; it never holds a tensor. A decode of the next step may be planned
before this one's tokens are read: ``execute(..., previous=handle)`` fills its input from the device.

Everything sized by memory is decided here, at load: the KV blocks a budget holds (on a GPU, a fraction of
what is free after a profiling pass of the largest step), the host blocks to swap to, the CUDA graphs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from inflight.backend.executor.guided_mask import GuidedLogitsMask
from inflight.backend.executor.kv_scales import init_kv_scales
from inflight.backend.executor.memory import MemoryFigures, gather_memory
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.model_runner import (
    ModelOutput,
    ModelRunner,
    kv_cache_bytes_per_block,
)
from inflight.backend.executor.parallel import (
    SINGLE_RANK,
    ParallelConfig,
    check_tensor_parallel,
    local_kv_heads,
)
from inflight.backend.executor.prompt_logprobs import (
    PromptLogprobRequest,
    PromptLogprobs,
    PromptLogprobTensors,
    PromptRows,
)
from inflight.backend.executor.prompt_logprobs import compute as compute_prompt_logprobs
from inflight.backend.executor.quantization import resolve_quantization
from inflight.backend.executor.sampler import RowParams, Sampler, SamplingBatch
from inflight.backend.executor.step_channel import STOP, SWAP, StepChannel
from inflight.backend.executor.step_handle import SampledTokens, StepHandle
from inflight.backend.executor.weight_loader import load_model
from inflight.batching import SchedulerOutput

# The executor floor's door: what the engine imports comes from here.
__all__ = ["EngineDeadError", "ExecutorConfig", "MemoryFigures", "ModelExecutor", "PromptLogprobRequest",
           "PromptLogprobs", "SampledTokens", "SamplingRows", "StepHandle", "StepObserver"]  # fmt: skip

if TYPE_CHECKING:
    from inflight.backend.executor.distributed import TensorParallelGroup

logger = logging.getLogger("inflight")

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # the CPU's KV budget when none is given (no free memory to measure)


class EngineDeadError(RuntimeError):
    """A fault the engine cannot recover from: ``LLMEngine.step`` re-raises it and the serving layer reports
    not ready (any other exception inside a step ends only that step's requests)."""


@dataclass(frozen=True)
class ExecutorConfig:
    """What the executor needs of the engine's options (``EngineArgs.executor_config`` builds it)."""

    model: str  # the checkpoint folder
    device: str  # "auto" | "cpu" | "cuda[:N]"
    dtype: str  # "auto" | a torch dtype name
    quantization: str | None  # None | "fp8" (quantize at load); FP8 checkpoints are detected either way
    kv_cache_dtype: str  # "auto" | "fp8"
    load_format: str  # "auto" (the checkpoint's safetensors) | "dummy" (random weights, nothing read)
    max_model_len: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_memory_bytes: int | None
    kv_cache_memory_fraction: float
    swap_space_bytes: int
    enable_cuda_graphs: bool
    max_cuda_graph_batch_size: int
    max_cuda_graph_prefill_tokens: int
    seed: int
    tensor_parallel_size: int = 1
    # "uni": this process alone (TP 1); "mp": a torch.distributed group of worker processes (distributed.py),
    # which TP > 1 needs and TP 1 may use (one GPU then runs the distributed path)
    distributed_executor_backend: str = "uni"


@dataclass
class SamplingRows:
    """The requests that sample a token this step, in scheduling order, as the sampler needs them."""

    params: list[RowParams]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]  # the known ones (the penalties and bad words read them)
    num_output_tokens: list[int]  # outputs before this step's token, those still being sampled included
    bad_words_token_ids: list[list[list[int]]]
    # Structured output: called once the forward is queued, before the sampler; returns the guided rows and
    # their host bitmasks ([num_guided, ceil(vocab / 32)] int32 numpy), see guided_mask.py. None: no row is.
    guided_masks: Callable[[], tuple[list[int], Any]] | None = None


class StepObserver(Protocol):
    """Called around each step's device work (benchmarks' GPU timing, the reliability suite's faults)."""

    def before_forward(self, scheduled: SchedulerOutput) -> None: ...

    def after_step(self, scheduled: SchedulerOutput) -> None: ...


class ModelExecutor:
    """Loads the model, sizes and allocates the KV cache, captures graphs; runs and samples each step."""

    def __init__(self, config: ExecutorConfig, model_config: ModelConfig,
                 worker: tuple[ParallelConfig, StepChannel] | None = None) -> None:  # fmt: skip
        """``worker``: this process is a tensor-parallel worker (worker.py) with its rank and channel;
        otherwise it is rank 0, which starts the workers itself when the config asks for them."""
        self.config = c = config
        self.model_config = model_config
        self.device = resolve_device(c.device)
        self.tp: TensorParallelGroup | None = None  # rank 0's group, when distributed
        self.parallel, self.channel = worker if worker is not None else (SINGLE_RANK, None)
        if worker is None and c.distributed_executor_backend == "mp":
            cfg = model_config
            check_tensor_parallel(
                cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, c.tensor_parallel_size
            )
            from inflight.backend.executor.distributed import TensorParallelGroup

            self.tp = TensorParallelGroup(c, c.tensor_parallel_size, self.device)
            self.parallel, self.channel = self.tp.parallel, self.tp.channel
        try:
            self._load()
        except BaseException:
            self.shutdown()
            raise

    def _load(self) -> None:
        c, model_config = self.config, self.model_config
        self.dtype = resolve_dtype(c.dtype, self.device, model_config.checkpoint_dtype)
        # NOTE: an FP8 cache takes 1 byte an element: the same budget holds 2x the blocks of bf16 (4x fp32).
        self.kv_dtype = torch.float8_e4m3fn if c.kv_cache_dtype == "fp8" else self.dtype
        self.bytes_per_block = kv_cache_bytes_per_block(model_config, c.block_size, self.kv_dtype,
                                                        local_kv_heads(model_config.num_kv_heads,
                                                                       self.parallel.tp_size))  # fmt: skip
        if self.device.type == "cpu":
            # NOTE: on CPU the budget is known before loading, so a configuration that cannot work fails fast.
            self.num_blocks = self._num_blocks(c.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES)
        self.quant = resolve_quantization(c.quantization, model_config.path)
        model = load_model(model_config, self.dtype, self.device, c.max_model_len, self.parallel, self.quant,
                           kv_cache_dtype=c.kv_cache_dtype, dummy=c.load_format == "dummy")  # fmt: skip
        self.runner = ModelRunner(model, self.device, c.block_size, self.kv_dtype, c.max_model_len)
        self.kv_scales_source = None  # FP8: "checkpoint" | "calibrated" | "checkpoint + calibrated"
        if c.kv_cache_dtype == "fp8":
            # NOTE: before profiling and the real cache, whose steps quantize with them (and graphs read them).
            self.kv_scales_source = init_kv_scales(self.runner, model_config.vocab_size, self.dtype,
                                                   c.max_model_len, self.parallel)  # fmt: skip
        self.activation_peak_bytes: int | None = None
        if self.device.type == "cuda":
            self.num_blocks = self._num_blocks(self._gpu_kv_budget())
        if self.parallel.distributed:
            # NOTE: every rank's cache has the same blocks (rank 0's scheduler hands out their ids): the fewest.
            count = torch.tensor([self.num_blocks], dtype=torch.int64)
            dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.channel.cpu_group)
            self.num_blocks = int(count.item())
        self.runner.allocate_kv_cache(self.num_blocks)
        self.num_host_blocks = c.swap_space_bytes // self.bytes_per_block
        self.runner.allocate_host_cache(self.num_host_blocks)
        self._warn_pinned_rounding()
        if self.device.type == "cuda" and c.enable_cuda_graphs:
            self.runner.capture_cuda_graphs(min(c.max_num_seqs, c.max_cuda_graph_batch_size),
                                            c.max_cuda_graph_prefill_tokens, c.max_num_seqs)  # fmt: skip
        if self.device.type == "cuda":
            self.runner.warm_logits(c.max_num_seqs, self.dtype)
        self.sampler = Sampler()
        torch.manual_seed(c.seed)  # unseeded sampled requests draw from the global generator
        self.eos_token_ids = frozenset(model_config.eos_token_ids)
        self.observers: list[StepObserver] = []
        logger.info(
            "KV cache: %d blocks of %d tokens, %s (%.1f MiB), max_model_len %d; %d host blocks to swap to",
            self.num_blocks, c.block_size, str(self.kv_dtype).removeprefix("torch."),
            self.num_blocks * self.bytes_per_block / 2**20, c.max_model_len, self.num_host_blocks,
        )  # fmt: skip
        self.memory = MemoryFigures(
            device=str(self.device),
            rank=self.parallel.tp_rank,
            weights_bytes=sum(t.numel() * t.element_size() for t in model.parameters()),
            activation_peak_bytes=self.activation_peak_bytes,
            kv_cache_bytes=self.num_blocks * self.bytes_per_block,
            kv_blocks=self.num_blocks - 1,
            block_size=c.block_size,
            max_model_len=c.max_model_len,
        )
        logger.info(self.memory.describe())
        self.memory_by_rank = (
            gather_memory(self.memory, self.parallel.tp_size, self.channel.cpu_group)
            if self.parallel.distributed
            else [self.memory]
        )

    # --------------------------------------------------------------------------------------------- sizing
    def _gpu_kv_budget(self) -> int:
        """KV bytes on the GPU: a fraction of the memory free after a profiling pass of the largest step."""
        c = self.config
        if c.kv_cache_memory_bytes is not None:
            return c.kv_cache_memory_bytes
        peak = self.activation_peak_bytes = self.runner.profile_peak_bytes(c.max_num_batched_tokens,
                                                                           c.max_num_seqs)  # fmt: skip
        free, _ = torch.cuda.mem_get_info(self.device)
        # NOTE: the activation peak of the largest step (and the decode graphs' pool, which is smaller)
        # must still fit beside the cache.
        budget = int(free * c.kv_cache_memory_fraction) - peak
        logger.info("GPU memory: %.2f GiB free after loading, step peak %.2f GiB -> KV budget %.2f GiB",
                    free / 2**30, peak / 2**30, budget / 2**30)  # fmt: skip
        return max(budget, 0)

    def _num_blocks(self, budget: int) -> int:
        """Blocks (the null block included) that ``budget`` bytes hold; fails if one request cannot fit."""
        c, bytes_per_block = self.config, self.bytes_per_block
        num_blocks = budget // bytes_per_block
        usable = max(num_blocks - 1, 0)
        needed = math.ceil(c.max_model_len / c.block_size)
        # NOTE: blocks beyond what max_num_seqs full-length requests can hold would only ever serve the
        # prefix cache; cap there so a generous budget does not allocate memory nothing can use.
        num_blocks = min(num_blocks, c.max_num_seqs * needed + 1)
        if usable < needed:
            bs, length = c.block_size, c.max_model_len
            raise ValueError(
                f"KV cache too small: one request of max_model_len={length} tokens needs {needed} blocks of "
                f"{bs} tokens, but the KV budget of {budget} bytes holds only {usable} usable blocks "
                f"({bytes_per_block} bytes each). The largest max_model_len that fits is {usable * bs}; "
                f"lower max_model_len or raise kv_cache_memory_bytes / kv_cache_memory_fraction."
            )
        return num_blocks

    def _warn_pinned_rounding(self) -> None:
        host_bytes = self.num_host_blocks * self.bytes_per_block
        if self.device.type == "cuda" and host_bytes & (host_bytes - 1):
            # NOTE: torch's pinned-memory allocator rounds an allocation up to a power of two.
            logger.warning("swap space: %d host blocks take %.1f GiB, pinned as %.1f GiB (torch rounds pinned "
                           "allocations up to a power of two; ask for a power of two)", self.num_host_blocks,
                           host_bytes / 2**30, (1 << (host_bytes - 1).bit_length()) / 2**30)  # fmt: skip

    # ---------------------------------------------------------------------------------------------- steps
    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Queue a step's KV block copies to and from host memory (see ``ModelRunner.swap``)."""
        if swap_out or swap_in:
            if self.tp is not None:
                self._to_workers(self.channel.send_swap, swap_out, swap_in)
            self.runner.swap(swap_out, swap_in)

    def execute(
        self,
        scheduled: SchedulerOutput,
        rows: SamplingRows | None,
        previous: StepHandle | None = None,
        prompt_logprobs: dict[str, PromptLogprobRequest] | None = None,
    ) -> StepHandle | None:
        """Launch a step's forward and its sampling (``rows``: the requests that sample, in scheduling
        order); None when nothing samples and no prompt log-probabilities come. ``previous`` is the step in
        flight whose tokens are inputs of this one's decodes (planned before they were read).
        ``prompt_logprobs``: the step's requests that want their prompt's log-probabilities (those of
        the positions this step computes come back in ``StepHandle.read().prompt_logprobs``)."""
        # NOTE: the batch is built before the forward, so its host-to-device copies do not wait for the GPU.
        batch = self._sampling_batch(rows) if rows is not None else None
        for observer in self.observers:
            observer.before_forward(scheduled)
        pending = previous.pending_tokens() if previous is not None else None
        if self.tp is not None:
            send = self.channel.send_step
            model_output = self._to_workers(self.runner.execute, scheduled, pending, prompt_logprobs, send)
            prompt = self._to_workers(self._prompt_logprobs, model_output)
        else:
            model_output = self.runner.execute(scheduled, pending, prompt_logprobs)
            prompt = self._prompt_logprobs(model_output)
        if batch is not None and rows is not None and rows.guided_masks is not None:
            # NOTE: here, with the forward queued: the host builds the masks while the device runs it.
            batch.guided = GuidedLogitsMask.from_host(*rows.guided_masks(), self.device)
        out = self.sampler(model_output.logits, batch) if batch is not None else None
        for observer in self.observers:
            observer.after_step(scheduled)
        if out is None and prompt is None:
            return None
        return StepHandle(scheduled, model_output.request_ids, out, self.device, prompt)

    def _prompt_logprobs(self, model_output: ModelOutput) -> tuple[PromptRows, PromptLogprobTensors] | None:
        """The step's prompt log-probabilities when it has prompt-logprob rows (every tensor-parallel rank
        computes them: the logits are a collective)."""
        plan = model_output.prompt_plan
        if plan is None:
            return None
        assert model_output.prompt_hidden is not None
        with torch.inference_mode():
            return plan, compute_prompt_logprobs(
                model_output.prompt_hidden, plan, self.runner.model.compute_logits
            )

    # --------------------------------------------------------------------------- tensor parallelism
    def _to_workers(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` on rank 0 of a group: a failure there (a dead worker's collective, a channel that
        broke) leaves the ranks out of step for good, so it is fatal to the engine."""
        tp = self.tp
        assert tp is not None
        if tp.dead_reason is not None:
            raise EngineDeadError(tp.dead_reason)
        try:
            return call(*args)
        except Exception as exc:
            time.sleep(0.5)  # the watchdog (polling every 0.2 s) names the dead worker, if one died
            raise EngineDeadError(tp.dead_reason or f"tensor-parallel step failed: {exc}") from exc

    def serve_steps(self) -> None:
        """A worker's loop: run what rank 0 sends (steps, swaps) until STOP."""
        assert self.channel is not None and self.tp is None, "serve_steps runs on ranks 1..N-1"
        while True:
            message = self.channel.receive()
            if message.kind == STOP:
                return
            if message.kind == SWAP:
                self.runner.swap(message.swap_out, message.swap_in)
            else:
                self._prompt_logprobs(self.runner.run(message.step))

    def add_death_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(reason)`` when a tensor-parallel worker dies (never called without workers)."""
        if self.tp is not None:
            self.tp.add_death_listener(listener)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent); rank 0's own memory goes with the object."""
        if self.tp is not None:
            self.tp.shutdown()

    def _sampling_batch(self, rows: SamplingRows) -> SamplingBatch:
        return SamplingBatch.build(
            rows.params,
            rows.prompt_token_ids,
            rows.output_token_ids,
            num_output_tokens=rows.num_output_tokens,
            vocab_size=self.model_config.vocab_size,
            device=self.device,
            eos_token_ids=self.eos_token_ids,
            bad_words_token_ids=rows.bad_words_token_ids,
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA GPU is available")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return resolved


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
