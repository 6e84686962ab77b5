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
    with torch.device("meta"):
        model = MODEL_REGISTRY[cfg.architecture](cfg, dtype, max_position, parallel, quant, kv_cache_dtype)
    model.to_empty(device=device)
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    return model


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """``load_format="dummy"``: every parameter random as a checkpoint of that dtype would hold it, seeded.

    Norm weights 1; FP8 weights (an FP8 checkpoint's layout) E4M3 values of a standard normal with weight scales
    0.02 / 448 * 4 (unit-size scales elsewhere); K/V scales 0, so an FP8 KV cache calibrates them as for a
    checkpoint without any; every other tensor normal(0, 0.02). Full-precision linears that quantize at load
    do so afterwards, as loaded ones do.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
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
            generator = generators.get(param.device)
            if generator is None:
                generator = generators[param.device] = torch.Generator(param.device).manual_seed(seed)
            # NOTE: drawn in fp32 on the parameter's device (an 8B model in seconds), then cast: float8 has
            # no normal_
            values = torch.randn(param.shape, generator=generator, device=param.device)
            if param.dtype != torch.float8_e4m3fn:
                values.mul_(0.02)
            param.copy_(values.clamp(-448, 448).to(param.dtype))


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
    ``dummy``: random weights instead (``fill_dummy_weights``), nothing read from disk."""
    start = time.monotonic()
    model = empty_model(cfg, dtype, device, max_position, parallel, quant, kv_cache_dtype)
    if dummy:
        fill_dummy_weights(model)
    else:
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
