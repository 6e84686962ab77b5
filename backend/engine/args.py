"""Engine options: one validated dataclass for ``inflight.LLM`` and the Triton model's parameters."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inflight.backend.executor.executor import ExecutorConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("fp8",)  # methods a full-precision checkpoint can be quantized to at load
KV_CACHE_DTYPES = ("auto", "fp8")
LOAD_FORMATS = ("auto", "dummy")  # "dummy": random weights of the checkpoint's shapes, nothing read from disk
# vLLM's names: "uni" one process, "mp" worker processes (tensor parallelism)
EXECUTOR_BACKENDS = ("auto", "uni", "mp")


@dataclass
class EngineArgs:
    """How to load and run a model.

    ``kv_cache_memory_bytes`` fixes the KV cache size; otherwise it is ``kv_cache_memory_fraction`` of the
    GPU memory free after loading, or 1 GiB on CPU.
    """

    model: str
    tokenizer: str | None = None  # defaults to the model folder
    dtype: str = "auto"  # float32 on CPU; the checkpoint's 16-bit dtype (else bfloat16) on CUDA
    device: str = "auto"  # "cuda" when available, else "cpu"
    # "fp8": quantize a full-precision checkpoint's linear layers at load (E4M3, per-channel weight scales,
    # dynamic per-token activations). None: as the checkpoint is (an FP8 checkpoint loads as FP8 either way).
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # "auto": the model dtype; "fp8": E4M3 K/V with per-layer scales
    # "auto": the folder's safetensors; "dummy" (vLLM's name): random weights of the right shapes and dtypes from
    # config.json alone (the tokenizer still comes from the folder), for sizing and benchmarks
    load_format: str = "auto"
    # Ranks the model is split over (its heads and MLP columns), one process and device each: this one is rank
    # 0 and starts the others (docs/scaling.md). "auto": worker processes ("mp") when above 1; "mp" at 1 runs
    # the distributed path (a process group of one) on this process alone.
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "auto"
    block_size: int = 16
    kv_cache_memory_fraction: float = 0.9
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # 8192 with chunked prefill, else max_model_len
    max_model_len: int | None = None  # defaults to the checkpoint's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_queue_size: int | None = None  # waiting requests beyond this are refused
    # Host memory for the KV of preempted requests: one whose blocks fit is swapped out to it and back in
    # when there is room again, instead of recomputing its prompt and output (0: always recompute).
    swap_space_bytes: int = 0
    seed: int = 0  # seeds the generator of unseeded sampled requests
    enable_cuda_graphs: bool = True  # replay captured CUDA graphs for decode steps (CUDA only)
    max_cuda_graph_batch_size: int = 256  # decode batches up to this size replay a graph
    # Steps with prefill tokens of up to this many tokens (and at most 16 sequences) replay a graph too
    # (eagerly such a step waits on the host's kernel launches); 0: they run eagerly.
    max_cuda_graph_prefill_tokens: int = 1024
    async_scheduling: bool = True  # plan and launch step N+1 before reading step N's tokens
    # With async_scheduling, the serving loop waits for a step of fewer requests than this to end before it
    # takes in new requests and plans the next one (its planning is short there): a request that arrives
    # meanwhile gets into the very next step (TTFT one step shorter). The step's detokenizing and outputs
    # still overlap the next step.
    async_scheduling_min_batch: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be the path of a Hugging Face checkpoint folder")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization {self.quantization!r} is not supported; supported: {', '.join(QUANTIZATIONS)} "
                "(or leave it unset: a quantized checkpoint is detected from its config.json)"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}"
            )
        _int(self, "tensor_parallel_size", 1, 64)
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, "
                             f"got {self.distributed_executor_backend!r}")  # fmt: skip
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError(
                f"distributed_executor_backend 'uni' runs one process; tensor_parallel_size "
                f"{self.tensor_parallel_size} needs 'mp' (or 'auto')"
            )
        _int(self, "block_size", 1, 1024)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        frac = self.kv_cache_memory_fraction
        if (
            isinstance(frac, bool)
            or not isinstance(frac, int | float)
            or not (0 < frac <= 1)
            or math.isnan(frac)
        ):
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {frac!r}")
        _int(self, "kv_cache_memory_bytes", 1, None, optional=True)
        _int(self, "max_num_seqs", 1, None)
        _int(self, "max_num_batched_tokens", 1, None, optional=True)
        _int(self, "max_model_len", 2, None, optional=True)
        _int(self, "max_queue_size", 0, None, optional=True)
        _int(self, "swap_space_bytes", 0, None)
        _int(self, "seed", 0, 2**63 - 1)
        _int(self, "max_cuda_graph_batch_size", 1, None)
        _int(self, "max_cuda_graph_prefill_tokens", 0, None)
        _int(self, "async_scheduling_min_batch", 0, None)
        for name in (
            "enable_prefix_caching",
            "enable_chunked_prefill",
            "enable_cuda_graphs",
            "async_scheduling",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def max_batched_tokens(self, max_model_len: int) -> int:
        """The step's token budget: as given, else 8192 with chunked prefill, else one whole prompt."""
        return self.max_num_batched_tokens or (8192 if self.enable_chunked_prefill else max_model_len)

    def executor_config(self, max_model_len: int) -> ExecutorConfig:
        """The executor's part of these options, with the model's context length resolved."""
        return ExecutorConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            quantization=self.quantization,
            kv_cache_dtype=self.kv_cache_dtype,
            load_format=self.load_format,
            max_model_len=max_model_len,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_batched_tokens(max_model_len),
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            kv_cache_memory_fraction=self.kv_cache_memory_fraction,
            swap_space_bytes=self.swap_space_bytes,
            enable_cuda_graphs=self.enable_cuda_graphs,
            max_cuda_graph_batch_size=self.max_cuda_graph_batch_size,
            max_cuda_graph_prefill_tokens=self.max_cuda_graph_prefill_tokens,
            seed=self.seed,
            tensor_parallel_size=self.tensor_parallel_size,
            distributed_executor_backend=(
                self.distributed_executor_backend
                if self.distributed_executor_backend != "auto"
                else ("mp" if self.tensor_parallel_size > 1 else "uni")
            ),
        )

    @classmethod
    def from_options(cls, model: str, options: Mapping[str, Any]) -> EngineArgs:
        """Build from keyword options, naming any unknown one."""
        known = {f.name for f in dataclasses.fields(cls)} - {"model"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown engine option {unknown[0]!r}; known options: {', '.join(sorted(known))}"
            )
        return cls(model=model, **options)


def _int(args: EngineArgs, name: str, low: int, high: int | None, optional: bool = False) -> None:
    value = getattr(args, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        limit = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {limit}, got {value}")
