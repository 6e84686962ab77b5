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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from inflight.backend.executor.guided_mask import GuidedLogitsMask
from inflight.backend.executor.kv_scales import init_kv_scales
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.model_runner import ModelRunner, kv_cache_bytes_per_block
from inflight.backend.executor.prompt_logprobs import (
    PromptLogprobRequest,
    PromptLogprobs,
    PromptLogprobTensors,
    PromptRows,
)
from inflight.backend.executor.prompt_logprobs import compute as compute_prompt_logprobs
from inflight.backend.executor.quantization import resolve_quantization
from inflight.backend.executor.sampler import RowParams, Sampler, SamplerOutput, SamplingBatch
from inflight.backend.executor.step_inputs import PendingTokens
from inflight.backend.executor.weight_loader import load_model
from inflight.batching import SchedulerOutput

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
        return (f"memory on {self.device}: weights {self.weights_bytes / gib:.2f} GiB, activation peak {peak}, "
                f"KV cache {self.kv_cache_bytes / gib:.2f} GiB = {self.kv_blocks} blocks x {self.block_size} "
                f"tokens = {self.kv_tokens} tokens; longest sequence that fits {self.longest_sequence} tokens "
                f"(max_model_len {self.max_model_len})")  # fmt: skip


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


@dataclass
class SampledTokens:
    """A step's sampler output on the host, row i for the step's i-th sampling request."""

    token_ids: list[int]
    logprobs: list[float] | None  # log p(sampled token), when some row asked
    top_logprobs: list[list[float]] | None  # the best alternatives, best first, when some row asked
    top_token_ids: list[list[int]] | None
    prompt_logprobs: list[PromptLogprobs] | None = None  # when some request of the step asked


class StepObserver(Protocol):
    """Called around each step's device work (benchmarks' GPU timing, the reliability suite's faults)."""

    def before_forward(self, scheduled: SchedulerOutput) -> None: ...

    def after_step(self, scheduled: SchedulerOutput) -> None: ...


class StepHandle:
    """A launched step: its sampled ids stay on the device (the next step's pending inputs) and are copied
    to the host, started at launch and read once."""

    def __init__(self, scheduled: SchedulerOutput, sample_ids: list[str], out: SamplerOutput | None,
                 device: torch.device,
                 prompt: tuple[PromptRows, PromptLogprobTensors] | None = None) -> None:  # fmt: skip
        self.scheduled = scheduled
        self.sample_ids = sample_ids  # the request of each sampled row
        # NOTE: a step may sample nothing and still have prompt log-probabilities (a prompt's first chunks).
        if out is None:
            out = SamplerOutput(torch.empty(0, dtype=torch.int64, device=device))
        self._sampled = out.sampled_token_ids
        tensors = [out.sampled_token_ids, out.logprobs, out.top_logprobs, out.top_token_ids]
        self._prompt_segments = None
        if prompt is not None:
            plan, lp = prompt
            self._prompt_segments = plan.segments
            tensors += [lp.logprobs, lp.top_logprobs, lp.top_token_ids]
        self._event = None
        if device.type == "cuda":
            # NOTE: pinned buffers and non_blocking copies: the host does not wait for the step here.
            tensors = [None if t is None else _pinned_copy(t) for t in tensors]
            self._event = torch.cuda.Event()
            self._event.record()
        self._tensors = tensors
        self.waited = False  # the host has waited for the step: its tokens can be read at no cost
        self._read: SampledTokens | None = None

    @property
    def num_requests(self) -> int:
        return len(self.scheduled.scheduled)

    @property
    def ends_a_prompt(self) -> bool:
        """The step samples some request's first token (a prefill's last chunk, not a decode)."""
        return any(e.needs_sample and len(e.token_ids) > 1 for e in self.scheduled.scheduled)

    def wait(self) -> None:
        """Until the step and its copies are done on the device."""
        if self._event is not None:
            self._event.synchronize()
        self.waited = True

    def read(self) -> SampledTokens:
        """Waits for the copies (the step's one host synchronisation) and returns them as lists."""
        if self._read is None:
            self.wait()
            tensors = self._tensors
            read = SampledTokens(*(None if t is None else t.tolist() for t in tensors[:4]))
            if self._prompt_segments is not None:
                lp = PromptLogprobTensors(*tensors[4:])
                read.prompt_logprobs = lp.to_host(self._prompt_segments)
            self._read = read
        return self._read

    def pending_tokens(self) -> PendingTokens:
        """This step's tokens as the next step's pending inputs (from the host if it was waited for)."""
        rows = {request_id: i for i, request_id in enumerate(self.sample_ids)}
        return PendingTokens(rows, self._sampled, self.read().token_ids if self.waited else None)


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class ModelExecutor:
    """Loads the model, sizes and allocates the KV cache, captures graphs; runs and samples each step."""

    def __init__(self, config: ExecutorConfig, model_config: ModelConfig) -> None:
        self.config = c = config
        self.model_config = model_config
        self.device = resolve_device(c.device)
        self.dtype = resolve_dtype(c.dtype, self.device, model_config.checkpoint_dtype)
        # NOTE: an FP8 cache takes 1 byte an element: the same budget holds 2x the blocks of bf16 (4x fp32).
        self.kv_dtype = torch.float8_e4m3fn if c.kv_cache_dtype == "fp8" else self.dtype
        self.bytes_per_block = kv_cache_bytes_per_block(model_config, c.block_size, self.kv_dtype,
                                                        model_config.num_kv_heads)  # fmt: skip
        if self.device.type == "cpu":
            # NOTE: on CPU the budget is known before loading, so a configuration that cannot work fails fast.
            self.num_blocks = self._num_blocks(c.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES)
        self.quant = resolve_quantization(c.quantization, model_config.path)
        model = load_model(model_config, self.dtype, self.device, c.max_model_len, quant=self.quant,
                           kv_cache_dtype=c.kv_cache_dtype, dummy=c.load_format == "dummy")  # fmt: skip
        self.runner = ModelRunner(model, self.device, c.block_size, self.kv_dtype, c.max_model_len)
        self.kv_scales_source = None  # FP8: "checkpoint" | "calibrated" | "checkpoint + calibrated"
        if c.kv_cache_dtype == "fp8":
            # NOTE: before profiling and the real cache, whose steps quantize with them (and graphs read them).
            self.kv_scales_source = init_kv_scales(self.runner, model_config.vocab_size, self.dtype,
                                                   c.max_model_len)  # fmt: skip
        self.activation_peak_bytes: int | None = None
        if self.device.type == "cuda":
            self.num_blocks = self._num_blocks(self._gpu_kv_budget())
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
            weights_bytes=sum(t.numel() * t.element_size() for t in model.parameters()),
            activation_peak_bytes=self.activation_peak_bytes,
            kv_cache_bytes=self.num_blocks * self.bytes_per_block,
            kv_blocks=self.num_blocks - 1,
            block_size=c.block_size,
            max_model_len=c.max_model_len,
        )
        logger.info(self.memory.describe())

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
        model_output = self.runner.execute(scheduled, pending, prompt_logprobs)
        if batch is not None and rows is not None and rows.guided_masks is not None:
            # NOTE: here, with the forward queued: the host builds the masks while the device runs it.
            batch.guided = GuidedLogitsMask.from_host(*rows.guided_masks(), self.device)
        out = self.sampler(model_output.logits, batch) if batch is not None else None
        plan, prompt = model_output.prompt_plan, None
        if plan is not None:
            assert model_output.prompt_hidden is not None
            with torch.inference_mode():
                prompt = (
                    plan,
                    compute_prompt_logprobs(
                        model_output.prompt_hidden, plan, self.runner.model.compute_logits
                    ),
                )
        for observer in self.observers:
            observer.after_step(scheduled)
        if out is None and prompt is None:
            return None
        return StepHandle(scheduled, model_output.request_ids, out, self.device, prompt)

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
