"""IncrementalDetokenizer: streamed deltas against full decodes, with a byte-level BPE (SmolLM2) and a
sentencepiece-style byte-fallback BPE; stop strings split across tokens; hold-back while streaming."""

import pytest
from transformers import PreTrainedTokenizerBase

from inflight.backend.engine import detokenizer as detokenizer_module
from inflight.backend.engine.detokenizer import IncrementalDetokenizer
from tests.backend.detokenizer_support import PROMPT, TEXTS
from tests.backend.detokenizer_support import SlowTokenizer as _SlowTokenizer
from tests.backend.detokenizer_support import decode as _decode
from tests.backend.detokenizer_support import ids as _ids
from tests.backend.detokenizer_support import output_ids as _output_ids
from tests.backend.detokenizer_support import stream as _stream


def test_byte_fallback_tokenizer_really_splits_characters(
    byte_fallback_tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokens = byte_fallback_tokenizer.convert_ids_to_tokens(_ids(byte_fallback_tokenizer, "x 😀 世"))
    assert "▁" in tokens and "<0xF0>" in tokens and "<0xE4>" in tokens  # 😀 and 世 are byte sequences


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    prompt_ids = _ids(tokenizer, PROMPT)
    output_ids = _output_ids(tokenizer, text)
    deltas = _stream(IncrementalDetokenizer(tokenizer, prompt_ids), output_ids)
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == text
    # The decode of prompt + output, past the prompt: for a byte-level BPE also the decode of the output
    # alone; a sentencepiece-style decoder drops the leading space of a decode that starts the text.
    full = _decode(tokenizer, prompt_ids + output_ids)
    assert full.startswith(_decode(tokenizer, prompt_ids)) and "".join(deltas) == full[len(PROMPT) :]
    if tokenizer.convert_ids_to_tokens(output_ids[0])[0] == "Ġ":
        assert "".join(deltas) == _decode(tokenizer, output_ids)


@pytest.mark.parametrize("text", TEXTS)
def test_without_prompt_deltas_equal_decode_of_output(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    output_ids = _ids(tokenizer, text)
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    deltas = _stream(detokenizer, output_ids)
    assert "".join(deltas) == _decode(tokenizer, output_ids) == detokenizer.text
    assert not any("\ufffd" in delta for delta in deltas)


def test_first_token_keeps_its_space(tokenizer: PreTrainedTokenizerBase) -> None:
    output_ids = _output_ids(tokenizer, " Paris")
    detokenizer = IncrementalDetokenizer(tokenizer, _ids(tokenizer, PROMPT))
    detokenizer.add_token(output_ids[0])
    assert detokenizer.get_delta(finished=False).startswith(" P")


def test_multi_token_characters_are_held_until_complete(tokenizer: PreTrainedTokenizerBase) -> None:
    output_ids = _output_ids(tokenizer, " 😀")
    assert len(output_ids) >= 2  # the emoji's four bytes span several tokens in both tokenizers
    detokenizer = IncrementalDetokenizer(tokenizer, _ids(tokenizer, PROMPT))
    deltas = []
    for token_id in output_ids:
        detokenizer.add_token(token_id)
        deltas.append(detokenizer.get_delta(finished=False))
    assert "".join(deltas) == " 😀" and "😀" in deltas[-1]


def test_generation_ending_mid_character_flushes_like_a_full_decode(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    output_ids = _ids(tokenizer, "ok 😀")[:-1]  # the emoji's last byte never comes
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    streamed = [detokenizer.add_token(t) or detokenizer.get_delta(finished=False) for t in output_ids]
    assert not any("\ufffd" in delta for delta in streamed)
    final = detokenizer.get_delta(finished=True)
    assert "\ufffd" in final
    assert "".join(streamed) + final == _decode(tokenizer, output_ids) == detokenizer.text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> None:
    output_ids = _ids(tokenizer, "Hello world") + [tokenizer.eos_token_id] + _ids(tokenizer, "again")
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip_special_tokens)
    text = "".join(_stream(detokenizer, output_ids))
    assert text == _decode(tokenizer, output_ids, skip_special_tokens)
    assert (tokenizer.eos_token in text) is not skip_special_tokens


def test_generic_decode_path_gives_the_same_deltas(tokenizer: PreTrainedTokenizerBase, monkeypatch) -> None:
    """The window path: the Rust tokenizer's decode and the generic tokenizer.decode give the same deltas."""
    monkeypatch.setattr(detokenizer_module, "_byte_level_table", lambda *args: None)
    prompt_ids, output_ids = _ids(tokenizer, PROMPT), _output_ids(tokenizer, TEXTS[1])
    fast = _stream(IncrementalDetokenizer(tokenizer, prompt_ids), output_ids)
    slow = _stream(IncrementalDetokenizer(_SlowTokenizer(tokenizer), prompt_ids), output_ids)  # type: ignore[arg-type]
    assert fast == slow


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_byte_level_path_matches_the_window_path(
    smollm2_tokenizer: PreTrainedTokenizerBase, monkeypatch, skip_special_tokens: bool
) -> None:
    """SmolLM2 (a byte-level BPE) takes the byte path: the same text as the window path for every output,
    each piece of it streamed no later (a complete character is not held with the incomplete one after it)."""
    tokenizer = smollm2_tokenizer
    prompt_ids = _ids(tokenizer, PROMPT)
    special = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]
    outputs = [_output_ids(tokenizer, text) for text in TEXTS]
    outputs.append([*_ids(tokenizer, " 日本"), special[0], *_ids(tokenizer, "😀 x"), special[1], 49151])
    emoji = _ids(tokenizer, "😀")
    outputs.append(emoji[:1] + special + emoji[1:])  # a character split by special tokens
    for output_ids in outputs:
        fast = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
        assert fast._bytes is not None
        byte_deltas = _stream(fast, output_ids)
        with monkeypatch.context() as m:
            m.setattr(detokenizer_module, "_byte_level_table", lambda *args: None)
            window = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
            window_deltas = _stream(window, output_ids)
        assert "".join(byte_deltas) == "".join(window_deltas) == fast.text
        full = _decode(tokenizer, prompt_ids + output_ids, skip_special_tokens)
        assert fast.text == full[len(_decode(tokenizer, prompt_ids, skip_special_tokens)) :]
        for i in range(len(byte_deltas)):
            assert "".join(byte_deltas[: i + 1]).startswith("".join(window_deltas[: i + 1])), (output_ids, i)


def test_state_stays_small_over_a_long_output(tokenizer: PreTrainedTokenizerBase) -> None:
    """O(new text) per token: the decoded window does not grow with the output."""
    output_ids = _output_ids(tokenizer, TEXTS[1] * 40)
    detokenizer = IncrementalDetokenizer(tokenizer, _ids(tokenizer, PROMPT), stop=["never appears"])
    for token_id in output_ids:
        detokenizer.add_token(token_id)
        detokenizer.get_delta(finished=False)
        assert len(detokenizer._token_ids) <= 16 and len(detokenizer._tail) <= len("never appears") - 1
    assert detokenizer.text == TEXTS[1] * 40


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(tokenizer: PreTrainedTokenizerBase, include: bool) -> None:
    text = " Paris. It is a lovely city, with many old streets."
    stop = "lovely city"
    output_ids = _output_ids(tokenizer, text)
    pieces = [_decode(tokenizer, output_ids[: i + 1]) for i in range(len(output_ids))]
    completing = next(i for i, piece in enumerate(pieces) if stop in piece)
    assert all(stop not in _decode(tokenizer, [t]) for t in output_ids)  # no single token holds it

    detokenizer = IncrementalDetokenizer(
        tokenizer, _ids(tokenizer, PROMPT), stop=["zzz", stop], include_stop_str_in_output=include
    )
    matched = [detokenizer.add_token(t) for t in output_ids[: completing + 1]]
    assert matched == [None] * completing + [stop]
    expected = " Paris. It is a " + (stop if include else "")
    assert detokenizer.text == expected and detokenizer.check_stop() == stop
    assert detokenizer.get_delta(finished=True) == expected
    assert detokenizer.add_token(output_ids[-1]) is None and detokenizer.text == expected  # ignored


@pytest.mark.parametrize("stop", ["日本", "😀"])
def test_stop_string_of_multi_byte_characters(tokenizer: PreTrainedTokenizerBase, stop: str) -> None:
    output_ids = _output_ids(tokenizer, f" a b {stop} c")
    detokenizer = IncrementalDetokenizer(tokenizer, _ids(tokenizer, PROMPT), stop=[stop])
    assert "".join(_stream(detokenizer, output_ids)) == " a b " == detokenizer.text
    assert detokenizer.check_stop() == stop


def test_stop_string_at_the_very_start(tokenizer: PreTrainedTokenizerBase) -> None:
    output_ids = _output_ids(tokenizer, "\n\nUser: hi")
    detokenizer = IncrementalDetokenizer(tokenizer, _ids(tokenizer, PROMPT), stop=["\n\nUser:"])
    deltas = _stream(detokenizer, output_ids)
    assert set(deltas) == {""} and detokenizer.text == "" and detokenizer.check_stop() == "\n\nUser:"


@pytest.mark.parametrize("stop", [["lovely", "a lovely"], ["a lovely", "lovely"]])
def test_earliest_stop_string_wins(tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
    """Both stop strings end with the same token; the one that starts first in the text cuts it, in
    whichever order they are listed."""
    output_ids = _output_ids(tokenizer, " Paris. It is a lovely city")
    detokenizer = IncrementalDetokenizer(tokenizer, _ids(tokenizer, PROMPT), stop=stop)
    assert "".join(_stream(detokenizer, output_ids)) == " Paris. It is "
    assert detokenizer.check_stop() == "a lovely"


@pytest.mark.parametrize("stop", [["city", "It"], ["It", "city"]])
def test_earliest_stop_string_wins_in_separate_tokens(tokenizer: PreTrainedTokenizerBase, stop) -> None:
    """Stop strings completed by different tokens: the first one the text reaches wins, in either order."""
    output_ids = _output_ids(tokenizer, " Paris. It is a lovely city")
    detokenizer = IncrementalDetokenizer(tokenizer, _ids(tokenizer, PROMPT), stop=stop)
    assert "".join(_stream(detokenizer, output_ids)) == " Paris. "
    assert detokenizer.check_stop() == "It"


def test_hold_back_while_streaming(tokenizer: PreTrainedTokenizerBase) -> None:
    """Never stream the last len(longest stop) - 1 characters: "lovely ci" must not leak early."""
    text = " Paris. It is a lovely cit, lovely city"
    stops = ["lovely city", "END"]
    output_ids = _output_ids(tokenizer, text)
    detokenizer = IncrementalDetokenizer(tokenizer, _ids(tokenizer, PROMPT), stop=stops)
    streamed = ""
    for i, token_id in enumerate(output_ids):
        if detokenizer.add_token(token_id) is not None:
            break
        streamed += detokenizer.get_delta(finished=False)
        decoded = _decode(tokenizer, _ids(tokenizer, PROMPT) + output_ids[: i + 1])[len(PROMPT) :]
        assert streamed == decoded[: max(len(decoded) - (len("lovely city") - 1), 0)]
    assert streamed + detokenizer.get_delta(finished=True) == " Paris. It is a lovely cit, "


def test_no_hold_back_when_the_stop_string_is_included(tokenizer: PreTrainedTokenizerBase) -> None:
    output_ids = _output_ids(tokenizer, " Paris. It is")
    detokenizer = IncrementalDetokenizer(
        tokenizer, _ids(tokenizer, PROMPT), stop=["lovely city"], include_stop_str_in_output=True
    )
    streamed = "".join(detokenizer.add_token(t) or detokenizer.get_delta(finished=False) for t in output_ids)
    assert streamed == " Paris. It is"


def test_no_stop_strings_no_hold_back(tokenizer: PreTrainedTokenizerBase) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, _ids(tokenizer, PROMPT))
    for token_id in _output_ids(tokenizer, " Paris"):
        detokenizer.add_token(token_id)
    assert detokenizer.get_delta(finished=False) == " Paris" and detokenizer.get_delta(finished=True) == ""


def _stray_byte_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """A token of the single byte 0xE2 (a lead byte of 3-byte characters): "â" in a byte-level BPE."""
    token = "â" if "â" in tokenizer.get_vocab() else "<0xE2>"
    (token_id,) = tokenizer.convert_tokens_to_ids([token])
    assert _decode(tokenizer, [token_id, token_id]) == "\ufffd\ufffd"  # two bytes that never form a character
    return token_id


def test_stray_bytes_stream_as_replacement_characters(tokenizer: PreTrainedTokenizerBase) -> None:
    """A run of bytes that can never complete a character is not held until the end: each is streamed
    as the U+FFFD of a full decode once three more tokens have settled it (a character has at most 4 bytes)."""
    stray = _stray_byte_id(tokenizer)
    output_ids = [stray] * 12 + _ids(tokenizer, " Paris 😀 ok")
    detokenizer = IncrementalDetokenizer(tokenizer, _ids(tokenizer, PROMPT))
    deltas = _stream(detokenizer, output_ids)
    # The byte-level path (SmolLM2) knows a stray byte is invalid as soon as the next byte comes.
    held = 1 if detokenizer._bytes is not None else 3
    assert deltas[:held] == [""] * held and all(d.strip("\ufffd") == "" != d for d in deltas[held:12]), (
        deltas[:13]
    )
    full = _decode(tokenizer, _ids(tokenizer, PROMPT) + output_ids)
    assert "".join(deltas) == full[len(_decode(tokenizer, _ids(tokenizer, PROMPT))) :] == detokenizer.text
    assert len(detokenizer._token_ids) <= 16  # the window does not grow over the stray run


@pytest.mark.parametrize("stray_before", [False, True])
def test_a_character_split_by_skipped_special_tokens_is_still_held(
    tokenizer: PreTrainedTokenizerBase, stray_before: bool
) -> None:
    """Bytes of a character that may still complete are never emitted early, even when many tokens (here
    skipped special tokens) lie between them; a stray byte before them is emitted once settled."""
    emoji = _ids(tokenizer, "😀")
    assert len(emoji) >= 2
    eos = tokenizer.eos_token_id
    output_ids = (
        ([_stray_byte_id(tokenizer)] if stray_before else []) + emoji[:1] + [eos] * 5 + emoji[1:] + [eos]
    )
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    deltas = _stream(detokenizer, output_ids)
    text = "".join(deltas)
    assert text == _decode(tokenizer, output_ids) and text.endswith("😀")
    assert ("\ufffd" in text) is stray_before
    assert "😀" in "".join(deltas[: len(output_ids) - 1])  # streamed when its last byte came, not at the end
