"""The decode-window paths of IncrementalDetokenizer: a tokenizer without a Rust backend (transformers'
`decode`, never cleaning up spaces), a fast tokenizer's Rust decode, the special ids computed once, invalid
UTF-8 spanning several tokens, and prompts shorter than the context window."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from inflight.backend.engine import detokenizer as detokenizer_module
from inflight.backend.engine.detokenizer import IncrementalDetokenizer
from tests.backend.detokenizer_support import (
    PROMPT,
    TEXTS,
    SlowTokenizer,
    decode,
    ids,
    output_ids,
    stream,
)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_tokenizer_without_a_rust_backend(
    tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool
) -> None:
    """An object with only `decode` (a slow tokenizer) streams the text of its own decode, special tokens
    skipped or kept as asked."""
    token_ids = [*output_ids(tokenizer, TEXTS[1]), tokenizer.eos_token_id, *ids(tokenizer, " again")]
    slow = SlowTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(slow, ids(tokenizer, PROMPT), skip_special_tokens)  # type: ignore[arg-type]
    text = "".join(stream(detokenizer, token_ids))
    full = decode(tokenizer, ids(tokenizer, PROMPT) + token_ids, skip_special_tokens)
    assert text == full[len(PROMPT) :] and (tokenizer.eos_token in text) is not skip_special_tokens


@pytest.fixture(scope="module")
def word_piece_tokenizer() -> PreTrainedTokenizerBase:
    """A BERT-style WordPiece tokenizer whose `decode` cleans up tokenization spaces by default
    (" ," -> ","), as transformers does for WordPiece."""
    vocab = ["[UNK]", "[SEP]", "hello", ",", "world", ".", "it", "'", "s", "fine", "!"]
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", clean_up_tokenization_spaces=True
    )


def test_generic_path_keeps_tokenization_spaces(word_piece_tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer = word_piece_tokenizer
    token_ids = [*ids(tokenizer, "hello, world. it's fine!"), tokenizer.sep_token_id]
    assert tokenizer.decode(token_ids, skip_special_tokens=True) == "hello, world. it's fine!"  # cleaned up
    detokenizer = IncrementalDetokenizer(SlowTokenizer(tokenizer), [])  # type: ignore[arg-type]
    text = "".join(stream(detokenizer, token_ids))
    assert text == decode(tokenizer, token_ids) == "hello , world . it ' s fine !"


def test_window_path_decodes_with_the_rust_tokenizer(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fast tokenizer's windows are decoded by its Rust tokenizer directly, not through `tokenizer.decode`
    (the same text without the wrapper's per-call overhead)."""
    prompt_ids, token_ids = ids(tokenizer, PROMPT), output_ids(tokenizer, TEXTS[1])
    calls: list[list[int]] = []

    def counting_decode(token_ids: list[int], **kwargs: object) -> str:
        calls.append(token_ids)
        return decode(tokenizer, token_ids)

    monkeypatch.setattr(detokenizer_module, "_byte_level_table", lambda *args: None)
    monkeypatch.setattr(tokenizer, "decode", counting_decode)
    assert "".join(stream(IncrementalDetokenizer(tokenizer, prompt_ids), token_ids)) == TEXTS[1]
    assert calls == []


class _CountingSpecialIds(SlowTokenizer):
    """A tokenizer counting reads of `all_special_ids` (transformers rebuilds that list on each read)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer)
        self.reads = 0

    @property
    def all_special_ids(self) -> list[int]:
        self.reads += 1
        return self._tokenizer.all_special_ids


def test_special_ids_are_read_once_per_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    counting = _CountingSpecialIds(tokenizer)
    prompt_ids, token_ids = ids(tokenizer, PROMPT), [*output_ids(tokenizer, " Paris"), tokenizer.eos_token_id]
    for _ in range(3):
        detokenizer = IncrementalDetokenizer(counting, prompt_ids)  # type: ignore[arg-type]
        assert "".join(stream(detokenizer, token_ids)) == " Paris"
    assert counting.reads == 1


# Byte-level tokens (bytes): an invalid 3-byte prefix over three tokens, then two stray lead bytes.
INVALID_RUNS = [["ð", "Ł", "Ł", "â", "â"], ["ð", "ĺ", "¤", "â", "âĢ"], ["ð", "Ł", "ĺ", "ðŁ", "ðŁ"]]


@pytest.mark.parametrize("tokens", INVALID_RUNS)
@pytest.mark.parametrize("window_path", [False, True])
def test_invalid_bytes_spanning_tokens_stream_like_a_full_decode(
    smollm2_tokenizer: PreTrainedTokenizerBase,
    monkeypatch: pytest.MonkeyPatch,
    tokens: list[str],
    window_path: bool,
) -> None:
    """One U+FFFD per maximal invalid byte sequence, as the full decode has it, also when that sequence spans
    several tokens and its first byte was emitted (settled) before the rest came."""
    tokenizer = smollm2_tokenizer
    if window_path:
        monkeypatch.setattr(detokenizer_module, "_byte_level_table", lambda *args: None)
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    full = decode(tokenizer, token_ids)
    assert full.strip("\ufffd") == "" and len(full) < len(tokens)  # fewer U+FFFD than tokens
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert "".join(stream(detokenizer, token_ids)) == full == detokenizer.text


@pytest.mark.parametrize("num_prompt_tokens", [1, 2, 4])
def test_short_prompt_gives_the_first_output_token_its_space(
    tokenizer: PreTrainedTokenizerBase, num_prompt_tokens: int
) -> None:
    """A prompt of fewer tokens than the context window is all context: the first output token keeps the
    space a sentencepiece-style decode strips at the start of a text."""
    all_ids = ids(tokenizer, PROMPT) + output_ids(tokenizer, TEXTS[0])
    prompt_ids, token_ids = all_ids[:num_prompt_tokens], all_ids[num_prompt_tokens:]
    expected = decode(tokenizer, all_ids)[len(decode(tokenizer, prompt_ids)) :]
    assert expected.startswith(" ")
    assert "".join(stream(IncrementalDetokenizer(tokenizer, prompt_ids), token_ids)) == expected


@pytest.mark.parametrize("output", ["invalidates", "completes", "nothing"])
@pytest.mark.parametrize("window_path", [False, True], ids=["byte-level", "window"])
def test_a_prompt_ending_mid_character_streams_like_a_full_decode(
    smollm2_tokenizer: PreTrainedTokenizerBase,
    monkeypatch: pytest.MonkeyPatch,
    output: str,
    window_path: bool,
) -> None:
    """The prompt ends with the first two bytes of a 4-byte character (F0 9F, two tokens), which its text shows
    as one U+FFFD. The output text is what a full decode adds past the prompt's text: the character the output
    finishes (or the U+FFFD its invalid run makes) takes that U+FFFD's place and is not output text."""
    tokenizer = smollm2_tokenizer
    if window_path:
        monkeypatch.setattr(detokenizer_module, "_byte_level_table", lambda *args: None)
    prompt_ids = ids(tokenizer, PROMPT) + tokenizer.convert_tokens_to_ids(["ð", "Ł"])  # bytes F0 9F
    assert decode(tokenizer, prompt_ids).endswith("\ufffd")
    smiley = ids(tokenizer, "😀")  # "ðŁ" (F0 9F), "ĺ" (98), "Ģ" (80)
    assert tokenizer.convert_ids_to_tokens(smiley)[0] == "ðŁ"
    token_ids = {
        "invalidates": ids(tokenizer, " Paris is nice."),
        "completes": smiley[1:] + ids(tokenizer, " ok then"),
        "nothing": [tokenizer.eos_token_id],  # skipped special token: no bytes at all
    }[output]
    expected = decode(tokenizer, prompt_ids + token_ids)[len(decode(tokenizer, prompt_ids)) :]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    assert (detokenizer._bytes is None) is window_path
    assert "".join(stream(detokenizer, token_ids)) == expected
