"""The byte-level BPE path of IncrementalDetokenizer: GPT-2's byte alphabet, the per-tokenizer byte tables
(one per skip_special_tokens setting, each token looked up once), and tokens the byte table must decode like
the Rust ByteLevel decoder (special tokens, ids past the vocabulary, characters outside the alphabet)."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from inflight.backend.engine import detokenizer as detokenizer_module
from inflight.backend.engine.detokenizer import IncrementalDetokenizer
from tests.backend.detokenizer_support import PROMPT, decode, ids, output_ids, stream


@pytest.fixture
def fresh_smollm2(smollm2_path: Path) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer loaded for this test alone: no byte table cached on it by an earlier test."""
    return AutoTokenizer.from_pretrained(smollm2_path)


def test_byte_alphabet_is_gpt2s() -> None:
    """The alphabet inverts GPT-2's `bytes_to_unicode` (as transformers ships it) and is the character set of
    the Rust ByteLevel pre-tokenizer."""
    assert detokenizer_module._byte_alphabet() == {char: byte for byte, char in bytes_to_unicode().items()}
    assert set(detokenizer_module._byte_alphabet()) == set(ByteLevel.alphabet())


def _special_output(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Output ids with special tokens between ordinary ones and a repeated word."""
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    return [
        *output_ids(tokenizer, " Paris, Paris"),
        tokenizer.eos_token_id,
        *ids(tokenizer, " Paris"),
        im_start,
    ]


def test_byte_tables_per_skip_special_tokens(fresh_smollm2: PreTrainedTokenizerBase) -> None:
    """Requests with either setting, in turn, on one tokenizer: each gets the special tokens its setting asks
    for (a table built for one setting never serves the other)."""
    tokenizer, prompt_ids = fresh_smollm2, ids(fresh_smollm2, PROMPT)
    token_ids = _special_output(tokenizer)
    for skip in (True, False, True, False):
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
        assert detokenizer._bytes is not None  # the byte-level path
        text = "".join(stream(detokenizer, token_ids))
        assert text == decode(tokenizer, token_ids, skip) and (tokenizer.eos_token in text) is not skip


def test_each_token_is_looked_up_once_per_tokenizer_and_setting(
    fresh_smollm2: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token's bytes are looked up on its first use only: not again for a repeated token nor for a later
    request with the same skip_special_tokens (the table is shared); once more for the other setting."""
    lookups: list[int] = []
    lookup = detokenizer_module._ByteTable._lookup

    def counting_lookup(self: object, token_id: int) -> bytes:
        lookups.append(token_id)
        return lookup(self, token_id)

    monkeypatch.setattr(detokenizer_module._ByteTable, "_lookup", counting_lookup)
    tokenizer, prompt_ids = fresh_smollm2, ids(fresh_smollm2, PROMPT)
    token_ids = _special_output(tokenizer)
    distinct = set(prompt_ids) | set(token_ids)
    assert len(distinct) < len(prompt_ids) + len(token_ids)  # " Paris" comes three times
    for skip, looked_up in [(True, distinct), (True, set()), (False, distinct), (False, set())]:
        lookups.clear()
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
        assert "".join(stream(detokenizer, token_ids)) == decode(tokenizer, token_ids, skip)
        assert sorted(lookups) == sorted(looked_up)


def test_ids_past_the_vocabulary_decode_to_nothing(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer = smollm2_tokenizer
    token_ids = [*output_ids(tokenizer, " Paris"), len(tokenizer) + 7, *ids(tokenizer, " ok")]
    detokenizer = IncrementalDetokenizer(tokenizer, ids(tokenizer, PROMPT))
    assert detokenizer._bytes is not None
    assert "".join(stream(detokenizer, token_ids)) == decode(tokenizer, token_ids) == " Paris ok"


@pytest.fixture(scope="module")
def raw_unicode_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE whose vocabulary also holds tokens of characters outside the byte alphabet, which the
    ByteLevel decoder passes through as their own UTF-8."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    for token in ["日本", "€", "ĠParis", "語", "Ġ日"]:  # "Ġ日": byte-alphabet and other characters mixed
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def test_tokens_outside_the_byte_alphabet_decode_as_their_utf8(
    raw_unicode_tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenizer = raw_unicode_tokenizer
    assert not set("日本€語") & set(ByteLevel.alphabet())
    token_ids = tokenizer.convert_tokens_to_ids(["ĠParis", "Ġ", "日本", "€", "Ġ", "語", "!"])
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert detokenizer._bytes is not None
    text = "".join(stream(detokenizer, token_ids))
    assert text == decode(tokenizer, token_ids) == " Paris 日本€ 語!"


def test_a_token_mixing_byte_alphabet_and_other_characters_decodes_whole_as_utf8(
    raw_unicode_tokenizer: PreTrainedTokenizerBase,
) -> None:
    """The ByteLevel decoder maps a token through the byte alphabet only when every character is in it;
    otherwise the whole token is its own UTF-8: "Ġ日" stays "Ġ日" (its "Ġ" is not a space here)."""
    tokenizer = raw_unicode_tokenizer
    token_ids = tokenizer.convert_tokens_to_ids(["ĠParis", "Ġ日", "!"])
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert detokenizer._bytes is not None
    assert "".join(stream(detokenizer, token_ids)) == decode(tokenizer, token_ids) == " ParisĠ日!"
