"""The FP8 KV cache's per-layer scales (``kv_cache_dtype="fp8"``, docs/fp8.md): the checkpoint's, else
calibrated at load.

Each attention layer has a 0-dim fp32 ``k_scale`` and ``v_scale`` (dequantization: real = fp8 * scale).
A checkpoint's (``self_attn.k_scale`` / ``v_scale``, ModelOpt's ``self_attn.k_proj.k_scale`` /
``v_proj.v_scale``, ``k_proj.output_scale``) load into them (``models/llama.py``); any a checkpoint lacks
(left at 0) is calibrated here, before the real cache is allocated:

* the batch: ``CALIBRATION_SEQS`` sequences of ``CALIBRATION_TOKENS`` token ids (fewer when
  ``max_model_len`` is shorter), uniform over the vocabulary from a fixed seed, so a model's scales are the
  same at every load. Each sequence starts at position 0, where the attention-sink token's keys and values
  (large in many models, whatever the token) are made, and spans positions whose RoPE angles differ.
* one eager prefill of it through a temporary cache in the model's dtype; each layer's amax of the cached
  K (after RoPE) and V.
* ``scale = amax / 448 * SCALE_MARGIN``: the calibration batch's largest value lands at 448 / 2 = 224.
  A margin because real prompts can go past the amax of one random batch, and a value past 448 * scale
  saturates (clamped: its attention score or contribution is wrong, without bound in how far). Against
  that, E4M3's relative precision is the same (3 mantissa bits) over its normal range of 2^-6 .. 448, about
  15 binades: a margin of 2 moves one binade at the bottom into the subnormals, values under
  amax / 14,000, which weigh next to nothing in a dot product or a weighted sum.

Random token ids are not text: a model's K/V on real prompts can exceed them by more than the margin.
An FP8 checkpoint's scales (calibrated on text by the tool that made it) are then the better source.
"""

from __future__ import annotations

import logging

import torch

from inflight.backend.executor.model_runner import ModelRunner
from inflight.backend.executor.parallel import SINGLE_RANK, ParallelConfig
from inflight.kernels.fp8 import FP8_MAX

logger = logging.getLogger("inflight")

CALIBRATION_SEQS = 4
CALIBRATION_TOKENS = 256  # per sequence
CALIBRATION_SEED = 0
SCALE_MARGIN = 2.0


def calibration_prompts(vocab_size: int, max_model_len: int) -> list[list[int]]:
    """The calibration batch: ``CALIBRATION_SEQS`` x ``min(CALIBRATION_TOKENS, max_model_len)`` token ids."""
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    length = min(CALIBRATION_TOKENS, max_model_len)
    return torch.randint(0, vocab_size, (CALIBRATION_SEQS, length), generator=generator).tolist()


def init_kv_scales(runner: ModelRunner, vocab_size: int, dtype: torch.dtype, max_model_len: int,
                   parallel: ParallelConfig = SINGLE_RANK) -> str:  # fmt: skip
    """Set every attention layer's missing (not positive and finite) scales by calibration; log the range.
    Returns where the scales came from: "checkpoint", "calibrated" or "checkpoint + calibrated".
    With tensor parallelism each rank sees its own KV heads: the amax is the largest over the ranks, so every
    rank (and TP 1) gets the same scales."""
    layers = runner.model.attention_layers()
    params = [(layer.k_scale, layer.v_scale) for layer in layers]
    current = torch.stack([torch.stack(pair) for pair in params]).float().cpu()  # [num_layers, 2]
    missing = ~(torch.isfinite(current) & (current > 0))
    if missing.any():
        prompts = calibration_prompts(vocab_size, max_model_len)
        amax = parallel.all_reduce_max(runner.kv_amax(prompts, dtype)).cpu()
        calibrated = torch.where(amax > 0, amax / FP8_MAX * SCALE_MARGIN, torch.ones_like(amax))
        for (layer, j), value in zip(missing.nonzero().tolist(), calibrated[missing].tolist(), strict=True):
            params[layer][j].data.fill_(value)
        current = torch.where(missing, calibrated, current)
        how = (f"calibrated on {len(prompts)} x {len(prompts[0])} random token ids: amax / {FP8_MAX:g} * "
               f"{SCALE_MARGIN:g}")  # fmt: skip
        source = "calibrated" if missing.all() else "checkpoint + calibrated"
        if not missing.all():
            how = f"{int(missing.sum())} of {missing.numel()} {how}, the rest from the checkpoint"
    else:
        source, how = "checkpoint", "from the checkpoint"
    logger.info("KV cache FP8 (E4M3) scales %s: k_scale %.4g..%.4g, v_scale %.4g..%.4g over %d layers", how,
                current[:, 0].min(), current[:, 0].max(), current[:, 1].min(), current[:, 1].max(),
                len(layers))  # fmt: skip
    return source
