"""Build a model on the meta device and fill it from an HF safetensors checkpoint, one tensor at a time."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.models import MODEL_REGISTRY
from inflight.backend.executor.parallel import SINGLE_RANK, ParallelConfig
from inflight.backend.executor.quantization import QuantConfig

logger = logging.getLogger("inflight")


def checkpoint_files(path: str | Path) -> list[Path]:
    """The checkpoint's safetensors files (from ``model.safetensors.index.json`` when sharded)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path}; only safetensors checkpoints are supported")
    return files


def iterate_weights(path: str | Path, show_progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor, memory-mapped from disk (no copy is made here)."""
    files = checkpoint_files(path)
    for i, file in enumerate(files):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if show_progress:
                logger.info(
                    "loading weights: file %d/%d %s (%d tensors)", i + 1, len(files), file.name, len(keys)
                )
            for key in keys:
                yield key, f.get_tensor(key)


def meta_model(
    cfg: ModelConfig,
    dtype: torch.dtype,
    max_position: int,
    parallel: ParallelConfig = SINGLE_RANK,
    quant: QuantConfig | None = None,
    kv_cache_dtype: str = "auto",
) -> nn.Module:
    """``cfg``'s model on the meta device: every parameter and buffer has its shape and dtype, no storage."""
    with torch.device("meta"):
        return MODEL_REGISTRY[cfg.architecture](cfg, dtype, max_position, parallel, quant, kv_cache_dtype)


def empty_model(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
    parallel: ParallelConfig = SINGLE_RANK,
    quant: QuantConfig | None = None,
    kv_cache_dtype: str = "auto",
) -> nn.Module:
    """``cfg``'s model on ``device`` with uninitialised parameters (one allocation each) and its buffers set."""
    model = meta_model(cfg, dtype, max_position, parallel, quant, kv_cache_dtype)
    model.to_empty(device=device)
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    return model


class _DummyFill:
    """The values of ``load_format="dummy"``, one parameter at a time in ``named_parameters`` order.

    Norm weights 1; FP8 weights (an FP8 checkpoint's layout) E4M3 values of a standard normal with weight scales
    0.02 / 448 * 4 (unit-size scales elsewhere); K/V scales 0, so an FP8 KV cache calibrates them as for a
    checkpoint without any; every other tensor normal(0, 0.02), drawn from one generator per device seeded
    with ``seed``, so the values depend only on the seed and the parameters' order, shapes and dtypes.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    @torch.no_grad()
    def __call__(self, name: str, param: torch.Tensor) -> None:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("k_scale", "v_scale"):
            param.zero_()
        elif "norm" in name:
            param.fill_(1.0)
        elif leaf == "weight_scale":
            param.fill_(0.02 * 4 / 448)
        elif leaf == "input_scale":
            param.fill_(1.0)
        else:
            generator = self.generators.get(param.device)
            if generator is None:
                generator = self.generators[param.device] = torch.Generator(param.device).manual_seed(
                    self.seed
                )
            # NOTE: drawn in fp32 on the parameter's device (an 8B model in seconds), then cast: float8 has
            # no normal_
            values = torch.randn(param.shape, generator=generator, device=param.device)
            if param.dtype != torch.float8_e4m3fn:
                values.mul_(0.02)
            param.copy_(values.clamp_(-448, 448).to(param.dtype))


def _materialize_own(
    module: nn.Module, device: torch.device, done: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> list[str]:
    """Give ``module``'s own meta parameters and buffers (not its children's) uninitialised storage on
    ``device``; a tensor shared with a module already seen gets that module's. Returns the names of the
    parameters given storage here, in registration order."""
    created = []
    for table, is_param in ((module._parameters, True), (module._buffers, False)):
        for key, tensor in table.items():
            if tensor is None or not tensor.is_meta:
                continue
            seen = done.get(id(tensor))
            if seen is not None:
                table[key] = seen[1]
                continue
            new = torch.empty_like(tensor, device=device)
            if is_param:
                new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                created.append(key)
            done[id(tensor)] = (tensor, new)  # NOTE: the meta tensor kept alive, so its id stays its own
            table[key] = new
    return created


@torch.no_grad()
def materialize_dummy(model: nn.Module, device: torch.device, seed: int = 0) -> None:
    """``load_format="dummy"`` on a model built on the meta device (``meta_model``), module by module: each
    module's own parameters and buffers get storage on ``device``, its buffers are set (``init_buffers``), its
    parameters are filled (``_DummyFill``, in ``named_parameters`` order: the same values as filling the whole
    model at once) and a linear layer is turned into its weight format at once (``process_weights_after_loading``,
    e.g. quantized). So the device never holds more than the finished layers, one layer's full-precision weight
    and its fill's fp32 draw: a model whose full-precision weights exceed the device (70B quantized to FP8 on
    an H200) loads. ``init_buffers`` and ``process_weights_after_loading`` touch their module's own tensors only.
    """
    fill = _DummyFill(seed)
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for prefix, module in model.named_modules():
        created = _materialize_own(module, device, done)
        if hasattr(module, "init_buffers"):
            module.init_buffers()
        for key in created:
            fill(f"{prefix}.{key}" if prefix else key, module._parameters[key])
        method = getattr(module, "linear_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def load_model(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
    parallel: ParallelConfig = SINGLE_RANK,
    quant: QuantConfig | None = None,
    kv_cache_dtype: str = "auto",
    dummy: bool = False,
) -> nn.Module:
    """Build ``cfg``'s model without initialising it, then copy each checkpoint tensor into its place (and
    turn it into the weight format's, e.g. quantize it, layer by layer). ``kv_cache_dtype`` "fp8": the
    attention layers take the checkpoint's K/V scales where it has them (else 0: calibrated later).
    ``dummy``: random weights instead, nothing read from disk, built module by module
    (``materialize_dummy``)."""
    start = time.monotonic()
    if dummy:
        model = meta_model(cfg, dtype, max_position, parallel, quant, kv_cache_dtype)
        materialize_dummy(model, device)
    else:
        model = empty_model(cfg, dtype, device, max_position, parallel, quant, kv_cache_dtype)
        loaded = model.load_weights(iterate_weights(cfg.path))
        missing = model.expected_weights() - loaded
        if missing:
            raise ValueError(
                f"checkpoint {cfg.path} lacks {len(missing)} weights, e.g. {sorted(missing)[:5]}"
            )
        for module in model.modules():
            method = getattr(module, "linear_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the full-precision weights quantized at load
    model.eval()
    num_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info(
        "model %s loaded%s: %.1f M parameters (%.2f GiB, %s%s) on %s in %.1f s",
        cfg.architecture,
        " with dummy (random) weights" if dummy else "",
        num_params / 1e6,
        weight_bytes / 2**30,
        dtype,
        f", linear layers FP8 ({quant.source})" if quant is not None else "",
        device,
        time.monotonic() - start,
    )
    return model
