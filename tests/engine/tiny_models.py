"""Tiny random-weight checkpoints of each supported architecture, written as ordinary HF folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 49152  # the SmolLM2 tokenizer's, so text prompts work on the tiny models too
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    max_position_embeddings=512,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)

# Each architecture exercises its own feature: llama3 RoPE scaling and biases (Llama), a sliding window
# shorter than the prompts (Mistral), q/k/v biases with tied embeddings and 4:1 GQA (Qwen2), q/k norm with
# a head_dim that is not hidden/heads (Qwen3).
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=12, tie_word_embeddings=False),
    ),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3": (
        "Qwen3Config",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    ),
}


def build_tiny_checkpoint(name: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Write a random ``name`` model (safetensors + config + generation config) into ``out``; ``overrides``
    replace config fields (``vocab_size=1001``)."""
    import transformers

    config_cls, extra = TINY_CONFIGS[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return out
