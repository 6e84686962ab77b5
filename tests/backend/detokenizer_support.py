"""Shared by the detokenizer tests: the prompt and outputs, a sentencepiece-style byte-fallback tokenizer
trained here, and streaming tokens as the engine does."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from inflight.backend.engine.detokenizer import IncrementalDetokenizer

PROMPT = "The capital of France is"
TEXTS = [
    " Paris. It is a lovely city, with many old streets.",
    " Paris 😀 and 日本語, 世界! héllo wörld 🇫🇷 ok",
    "\n\n  spaces   and\ttabs  😀😀 end",
]
CORPUS = [
    "The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! It is a lovely city.",
    "日本 is Japan; streaming text one token at a time.",
] * 4


def make_byte_fallback_tokenizer() -> PreTrainedTokenizerBase:
    """A Llama-2-style tokenizer trained here: "▁" for spaces, <0xNN> byte-fallback tokens, a decoder
    that strips the leading space of a decode."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    # NOTE: the trainer has no byte-fallback option: add the 256 byte tokens to the trained vocab.
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def output_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids a model would generate for `text` after the prompt (the text's own leading space kept)."""
    prompt_ids = ids(tokenizer, PROMPT)
    full_ids = ids(tokenizer, PROMPT + text)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    return full_ids[len(prompt_ids) :]


def decode(tokenizer: PreTrainedTokenizerBase, token_ids: list[int], skip_special_tokens: bool = True) -> str:
    return tokenizer.decode(
        token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    """Feed tokens one by one as the engine does; the last delta is the finishing one."""
    deltas = []
    for token_id in token_ids:
        stop = detokenizer.add_token(token_id)
        deltas.append(detokenizer.get_delta(finished=stop is not None))
        if stop is not None:
            return deltas
    deltas.append(detokenizer.get_delta(finished=True))
    return deltas


class SlowTokenizer:
    """Only `decode`: takes the detokenizer's generic path (no Rust backend tokenizer)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer

    def decode(self, token_ids: list[int], **kwargs: object) -> str:
        return self._tokenizer.decode(token_ids, **kwargs)
