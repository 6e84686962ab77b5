"""IncrementalDetokenizer's stop strings: one given as a plain string, one occurring twice in a token, a
one-character stop, stop strings starting at the same character; and the count of output tokens."""

import pytest
from transformers import PreTrainedTokenizerBase

from inflight.backend.engine.detokenizer import IncrementalDetokenizer
from tests.backend.detokenizer_support import (
    PROMPT,
    decode,
    ids,
    output_ids,
    stream,
)

LOVELY = " Paris. It is a lovely city"


def _token_texts(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> list[str]:
    """Each token's own text (the first one's leading space included)."""
    texts = [
        decode(tokenizer, ids(tokenizer, PROMPT) + token_ids[: i + 1])[len(PROMPT) :]
        for i in range(len(token_ids))
    ]
    return [text[len(before) :] for before, text in zip(["", *texts[:-1]], texts, strict=True)]


def test_stop_given_as_one_string(tokenizer: PreTrainedTokenizerBase) -> None:
    """A single string is one stop string, not a list of one-character stops."""
    detokenizer = IncrementalDetokenizer(tokenizer, ids(tokenizer, PROMPT), stop="lovely city")
    assert "".join(stream(detokenizer, output_ids(tokenizer, LOVELY))) == " Paris. It is a "
    assert detokenizer.check_stop() == "lovely city"


def test_stop_string_twice_in_one_token_cuts_at_the_first(tokenizer: PreTrainedTokenizerBase) -> None:
    text = " hello world"
    token_ids = output_ids(tokenizer, text)
    assert any(piece.count("l") == 2 for piece in _token_texts(tokenizer, token_ids))  # "▁hello" / "Ġhello"
    detokenizer = IncrementalDetokenizer(tokenizer, ids(tokenizer, PROMPT), stop=["l"])
    assert "".join(stream(detokenizer, token_ids)) == text[: text.index("l")] == detokenizer.text


@pytest.mark.parametrize("text", [" Paris. X marks the spot", LOVELY])
def test_one_character_stop_string(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    """A one-character stop (no characters held back) cuts the text at its first occurrence, if any."""
    detokenizer = IncrementalDetokenizer(tokenizer, ids(tokenizer, PROMPT), stop=["X"])
    expected = text.split("X")[0]
    assert "".join(stream(detokenizer, output_ids(tokenizer, text))) == expected == detokenizer.text
    assert detokenizer.check_stop() == ("X" if "X" in text else None)


@pytest.mark.parametrize("stop", [["lo", "lov"], ["lov", "lo"]])
def test_stop_strings_starting_at_the_same_character(
    tokenizer: PreTrainedTokenizerBase, stop: list[str]
) -> None:
    """Both stop strings start at the same character and end in the same token: the one listed first wins
    (vLLM's precedence: the stop strings in their order)."""
    token_ids = output_ids(tokenizer, LOVELY)
    assert " lovely" in _token_texts(tokenizer, token_ids)
    detokenizer = IncrementalDetokenizer(
        tokenizer, ids(tokenizer, PROMPT), stop=stop, include_stop_str_in_output=True
    )
    assert "".join(stream(detokenizer, token_ids)) == " Paris. It is a " + stop[0]
    assert detokenizer.check_stop() == stop[0]


def test_num_output_tokens_counts_tokens_until_the_stop(tokenizer: PreTrainedTokenizerBase) -> None:
    """Every token added counts, up to the one completing a stop string; later ones are ignored."""
    token_ids = output_ids(tokenizer, LOVELY)
    plain = IncrementalDetokenizer(tokenizer, ids(tokenizer, PROMPT))
    assert plain.num_output_tokens == 0
    stream(plain, token_ids)
    assert plain.num_output_tokens == len(token_ids)

    texts = _token_texts(tokenizer, token_ids)
    completing = next(i for i in range(len(texts)) if "It" in "".join(texts[: i + 1]))
    stopped = IncrementalDetokenizer(tokenizer, ids(tokenizer, PROMPT), stop=["It"])
    for token_id in token_ids:
        stopped.add_token(token_id)
    assert stopped.num_output_tokens == completing + 1 < len(token_ids)
