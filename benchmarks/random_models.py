"""Random-weight checkpoints of real model shapes as ordinary HF folders (GPU tests and benchmarks).

python -m benchmarks.random_models --shape llama3-8b --out /tmp/llama3-8b-random
python -m benchmarks.random_models --out /tmp/inflight-llama31-8b-random --tokenizer-dir .gpu/tok --pad-tokenizer
python -m benchmarks.random_models --shape llama3-70b --config-only --out /tmp/llama3-70b-config \
    --tokenizer-dir .gpu/tok --pad-tokenizer

`--config-only` writes the folder without weights (config.json, generation_config.json, the tokenizer): the
engine loads it with `load_format="dummy"` (random weights drawn on the device, module by module), which is
how a shape whose checkpoint would not fit the disk or the host, or whose full-precision weights would not fit
the device (70B quantized to FP8 at load on one H200), is benchmarked. HF transformers cannot load it.

`--pad-tokenizer` adds plain tokens (`<|pad_N|>`) to the copied tokenizer up to the model's vocabulary, so
every id the random model samples decodes to text, as with the model's real tokenizer. Without it, ids
past the smaller tokenizer decode to nothing and a streamed response waits for the next decodable token,
which inflates time-to-first-token in the serving benchmark.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

# What the Llama-3.1 family shares: vocabulary, context, RoPE scaling, special tokens.
_LLAMA3 = dict(
    vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192),
)  # fmt: skip
SHAPES = {
    # Llama-3.1-8B: 32 layers, 4096 hidden, 32 query / 8 KV heads, 14336 MLP, 128256 vocab.
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
    # Llama-3.1/3.3-70B: 80 layers, 8192 hidden, 64 query / 8 KV heads, 28672 MLP, 128256 vocab. Its bf16
    # checkpoint is ~141 GB: benchmarked from a config-only folder with load_format="dummy".
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
}  # fmt: skip
# The config fields that say a kept folder is of a shape (a folder of another shape is refused, not reused).
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size")  # fmt: skip


def _kept(out: Path, shape: str) -> bool:
    """Whether ``out`` already holds a model folder (of ``shape``: else ValueError)."""
    if not (out / "config.json").is_file():
        return False
    config = json.loads((out / "config.json").read_text())
    wrong = {k: config.get(k) for k in _SHAPE_FIELDS if config.get(k) != SHAPES[shape][k]}
    if wrong:
        raise ValueError(
            f"{out} holds another shape than {shape} ({wrong}): remove it or choose another folder"
        )
    return True


def _add_tokenizer(folder: Path, tokenizer_dir: Path | None, pad_tokenizer: bool, vocab_size: int) -> None:
    if tokenizer_dir is None:
        return
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / name)
    if pad_tokenizer:
        pad_tokenizer_to(folder, vocab_size)


def build_random_model(shape: str, out: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       tokenizer_dir: Path | None = None, pad_tokenizer: bool = False) -> Path:  # fmt: skip
    """Write a random ``shape`` Llama checkpoint to ``out`` (kept if it is already there)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if _kept(out, shape):
        return out
    start = time.monotonic()
    config = LlamaConfig(**SHAPES[shape], initializer_range=0.02)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = out.with_name(out.name + ".part")
    model.save_pretrained(tmp)
    _add_tokenizer(tmp, tokenizer_dir, pad_tokenizer, config.vocab_size)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tmp.rename(out)
    print(
        json.dumps({"built": shape, "path": str(out), "seconds": round(time.monotonic() - start, 1)}),
        flush=True,
    )
    return out


def build_config_only_model(shape: str, out: Path, dtype: torch.dtype = torch.bfloat16,
                            tokenizer_dir: Path | None = None, pad_tokenizer: bool = False) -> Path:  # fmt: skip
    """Write ``shape``'s folder without weights to ``out`` (kept if it is already there): the config.json and
    generation_config.json that ``build_random_model`` writes, and the tokenizer files, for
    ``load_format="dummy"``."""
    from transformers import GenerationConfig, LlamaConfig

    if _kept(out, shape):
        return out
    config = LlamaConfig(
        **SHAPES[shape], initializer_range=0.02, architectures=["LlamaForCausalLM"], dtype=dtype
    )
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    _add_tokenizer(tmp, tokenizer_dir, pad_tokenizer, config.vocab_size)
    tmp.rename(out)
    print(json.dumps({"built": shape, "path": str(out), "config_only": True}), flush=True)
    return out


def pad_tokenizer_to(folder: Path, vocab_size: int) -> int:
    """Add `<|pad_N|>` tokens to the tokenizer in `folder` until it has `vocab_size`; returns how many."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    missing = vocab_size - len(tokenizer)
    if missing > 0:
        tokenizer.add_tokens([f"<|pad_{i}|>" for i in range(missing)])
        tokenizer.save_pretrained(folder)
    return max(missing, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument(
        "--pad-tokenizer", action="store_true", help="pad the copied tokenizer to the model's vocabulary"
    )
    parser.add_argument(
        "--config-only", action="store_true", help='no weights: for load_format="dummy" (see above)'
    )
    args = parser.parse_args()
    build = build_config_only_model if args.config_only else build_random_model
    build(args.shape, args.out, tokenizer_dir=args.tokenizer_dir, pad_tokenizer=args.pad_tokenizer)


if __name__ == "__main__":
    main()
