"""Random-weight checkpoints of real model shapes as ordinary HF folders (GPU tests and benchmarks).

python -m benchmarks.random_models --shape llama3-8b --out /tmp/llama3-8b-random
python -m benchmarks.random_models --out /tmp/inflight-llama31-8b-random --tokenizer-dir .gpu/tok --pad-tokenizer

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

SHAPES = {
    # Llama-3.1-8B: 32 layers, 4096 hidden, 32 query / 8 KV heads, 14336 MLP, 128256 vocab.
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
}  # fmt: skip


def build_random_model(shape: str, out: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       tokenizer_dir: Path | None = None, pad_tokenizer: bool = False) -> Path:  # fmt: skip
    """Write a random ``shape`` Llama checkpoint to ``out`` (kept if it is already there)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (out / "config.json").is_file():
        return out
    start = time.monotonic()
    config = LlamaConfig(**SHAPES[shape], initializer_range=0.02)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = out.with_name(out.name + ".part")
    model.save_pretrained(tmp)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, tmp / name)
        if pad_tokenizer:
            pad_tokenizer_to(tmp, config.vocab_size)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tmp.rename(out)
    print(
        json.dumps({"built": shape, "path": str(out), "seconds": round(time.monotonic() - start, 1)}),
        flush=True,
    )
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
    args = parser.parse_args()
    build_random_model(
        args.shape, args.out, tokenizer_dir=args.tokenizer_dir, pad_tokenizer=args.pad_tokenizer
    )


if __name__ == "__main__":
    main()
