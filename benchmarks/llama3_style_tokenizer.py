"""A Llama-3-style tokenizer built offline: byte-level BPE with Llama 3's pre-tokenizer split, 128,000 merged
tokens and 256 special tokens (vocabulary 128,256), trained with ``tokenizers`` on text found on this machine.

    python -m benchmarks.llama3_style_tokenizer --out .cache/tokenizers/llama3-style-128k

No hub is reachable here, so Meta's own tokenizer cannot be downloaded; this one has its shape (vocabulary
size, byte-level alphabet, the same pre-tokenizer regex, ``<|begin_of_text|>`` / ``<|eot_id|>``), which is what
a grammar library's per-token work depends on. Its merges come from the Python sources and documents of the
virtual environment and /usr/share (mostly code: longer identifier-like tokens than Meta's web-text merges).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

# Llama 3's pre-tokenizer split (tiktoken's cl100k-style pattern, as in its tokenizer.json).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
NUM_MERGED = 128_000
SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]  # fmt: skip
SPECIAL += [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - len(SPECIAL) + 3)]
DEFAULT_OUT = Path(".cache/tokenizers/llama3-style-128k")
CORPUS_ROOTS = (".venv/lib", "/usr/share", "/usr/lib/python3")
SUFFIXES = {".py", ".md", ".rst", ".txt", ".html", ".c", ".h", ".json"}


def corpus(max_bytes: int) -> Iterator[str]:
    """Text files from the roots, in a fixed order, until ``max_bytes`` are read."""
    read = 0
    for root in CORPUS_ROOTS:
        for path in sorted(Path(root).rglob("*")):
            if path.suffix not in SUFFIXES or not path.is_file():
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            yield text
            read += len(text)
            if read >= max_bytes:
                return


def build(out: Path, max_bytes: int = 120 << 20) -> Path:
    """Train the tokenizer and save it as a Hugging Face fast-tokenizer folder at ``out``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_MERGED,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    started = time.perf_counter()
    tokenizer.train_from_iterator(corpus(max_bytes), trainer)
    tokenizer.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    print(f"{out}: vocabulary {len(fast)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return out


def ensure(out: Path = DEFAULT_OUT) -> Path:
    """The tokenizer folder, built first if it is not there."""
    return out if (out / "tokenizer.json").is_file() else build(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--max-mb", type=int, default=120, help="corpus size to read")
    args = parser.parse_args()
    build(args.out, args.max_mb << 20)


if __name__ == "__main__":
    main()
