"""The few facts about a checkpoint that the engine needs, read from its HF ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inflight.backend.executor.layers.rotary import rope_parameters

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only checkpoint."""

    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]  # per layer: a window in tokens, or None for full attention
    rope: dict[str, Any]
    checkpoint_dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    hf_config: Any

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``path/config.json`` (and ``generation_config.json`` for EOS ids)."""
        from transformers import AutoConfig

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model path {str(path)!r} is not a Hugging Face checkpoint folder (no config.json)"
            )
        hf = AutoConfig.from_pretrained(path)
        archs = list(getattr(hf, "architectures", None) or [])
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or hf.model_type!r} in {path}/config.json; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        is_qwen = arch.startswith("Qwen")
        return cls(
            path=str(path),
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # NOTE: Qwen2 always has q/k/v biases; Llama-style configs say so in `attention_bias`.
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(hf, "attention_bias", False)),
            o_proj_bias=not is_qwen and bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_windows=_sliding_windows(hf),
            rope=rope_parameters(hf),
            checkpoint_dtype=_dtype_of(hf),
            eos_token_ids=_eos_token_ids(path, hf),
            hf_config=hf,
        )


def _sliding_windows(hf: Any) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if getattr(hf, "use_sliding_window", True) is False:
        window = None
    return (window,) * hf.num_hidden_layers


def _dtype_of(hf: Any) -> torch.dtype:
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _eos_token_ids(path: Path, hf: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (path / "generation_config.json", None):
        value = json.loads(source.read_text()).get("eos_token_id") if source and source.is_file() else None
        if source is None:
            value = getattr(hf, "eos_token_id", None)
        for token in [value] if isinstance(value, int) else value or []:
            if token not in ids:
                ids.append(token)
    return tuple(ids)
