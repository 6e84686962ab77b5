"""Incremental detokenization of one request's output, with stop strings.

Decoding (vLLM's prefix/read offsets, the algorithm of `tokenizers.decoders.DecodeStream`):

    token_ids:  ... prompt tail ... | emitted output ........ | held back (incomplete UTF-8)
                ^ prefix_offset       ^ read_offset

Each new token decodes the short window `token_ids[prefix_offset:]` and emits what it adds to the
decode of `token_ids[prefix_offset:read_offset]`, unless that text ends in U+FFFD (a character whose
bytes are still arriving). Bytes that can never become a character (a run of stray continuation or lead
bytes, which a model with random or poor weights can repeat for its whole output) are not held to the
end: once three more tokens have settled them, they are emitted as the U+FFFD a full decode shows.
Decoding a window that starts a few tokens back keeps the space of the first output token ("▁Paris" /
"ĠParis" after a prompt) and costs O(new text) per token.

NOTE: `DecodeStream` itself is not used: it cannot flush bytes still held back when generation ends
mid-character (so the final text could differ from a full decode), it raises when a decode of the
window does not extend the previous one, and it needs a fast (Rust) tokenizer.

Byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2, Qwen: a fast tokenizer whose decoder is `ByteLevel`)
take a faster path with the same result: their decode is the UTF-8 decode (invalid bytes as U+FFFD) of
the tokens' bytes put end to end, so each token's bytes (looked up once per tokenizer) go through
Python's incremental UTF-8 decoder, which holds an incomplete character and emits bytes that can never
form one as soon as that is known. No window is decoded twice per token (2 Rust decodes of about 10 us
each; at 512 streams they were half the engine's host time per decode step on the 2-core CPU machine).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

# How many prompt tokens give the first output token its context (vLLM uses 5).
_NUM_CONTEXT_TOKENS = 6
_REPLACEMENT_CHAR = "\ufffd"
# Bytes followed by this many more cannot become part of a later character (UTF-8: at most 4 bytes).
_SETTLED_AFTER = 3


class IncrementalDetokenizer:
    """Turns one request's output token ids into text, token by token.

    `add_token` decodes the new token and checks the stop strings; `get_delta` returns the text not
    returned yet. Until the request finishes, the last `max(len(stop)) - 1` characters are held back
    (unless `include_stop_str_in_output`), so text that turns out to start a stop string is never
    streamed. Without a stop-string hit, the deltas concatenate to exactly the decode of the output
    (with the leading space that follows the prompt, which a decode of the output alone drops for
    sentencepiece-style tokenizers).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._decode = _make_decode(tokenizer, skip_special_tokens)
        self._special_ids = _special_ids(tokenizer)
        context = list(prompt_token_ids[max(len(prompt_token_ids) - _NUM_CONTEXT_TOKENS, 0) :])
        self._token_ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._bytes = _byte_level_table(tokenizer, skip_special_tokens)
        if self._bytes is not None:  # the byte-level path: the prompt's tail only sets the decoder's state
            self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            self._utf8.decode(b"".join(self._bytes.get(t) for t in context))
            self._prefix_text = ""
        else:
            self._prefix_text = self._decode(context)
        # NOTE: bytes of a character the prompt leaves unfinished show as one U+FFFD in the prompt's text; the
        # first character decoded with them (the finished character, or the U+FFFD of the invalid run) takes
        # that U+FFFD's place in a full decode, so it is not output text: the byte path skips it.
        self._skip_first_char = self._bytes is not None and bool(self._utf8.getstate()[0])

        stops = [stop] if isinstance(stop, str) else list(stop)
        self.stop = [s for s in stops if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        max_stop_len = max((len(s) for s in self.stop), default=0)
        self._stop_window = max(max_stop_len - 1, 0)
        self._hold_back = 0 if include_stop_str_in_output else self._stop_window

        self._chunks: list[str] = []  # all decoded text, stop handling not applied
        self._num_chars = 0  # total length of `_chunks`
        self._tail = ""  # the last `_stop_window` decoded characters
        self._unreturned = ""  # decoded text not yet returned by `get_delta`
        self._final_len: int | None = None  # the length of the final text once a stop string hit
        self._num_returned = 0
        self.matched_stop: str | None = None
        self.num_output_tokens = 0

    def add_token(self, token_id: int) -> str | None:
        """Decode one output token; return the stop string it completed, if any.

        After a stop string has been hit, further tokens are ignored.
        """
        if self.matched_stop is not None:
            return None
        self.num_output_tokens += 1
        if self._bytes is not None:
            text = self._utf8_text(self._bytes.get(token_id))
            if text:
                self._append_text(text)
            return self.matched_stop
        self._token_ids.append(token_id)
        text = self._decode(self._token_ids[self._prefix_offset :])
        if len(text) <= len(self._prefix_text):
            return None  # nothing new yet
        if text.endswith(_REPLACEMENT_CHAR):  # a character whose bytes may still be arriving
            self._emit_settled(text)
            return self.matched_stop
        self._advance(text)
        return self.matched_stop

    def check_stop(self) -> str | None:
        """The stop string that ended the text, or None."""
        return self.matched_stop

    @property
    def text(self) -> str:
        """All text decoded so far (without bytes still held back), truncated at a stop string."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        full = self._chunks[0] if self._chunks else ""
        return full if self._final_len is None else full[: self._final_len]

    def get_delta(self, finished: bool) -> str:
        """The text not returned before. With `finished`, everything: held-back characters and any
        incomplete trailing bytes (decoded as U+FFFD, as a full decode would)."""
        if finished:
            self._flush()
        if self._final_len is not None:
            limit = self._final_len - self._num_returned
        elif finished:
            limit = len(self._unreturned)
        else:
            limit = len(self._unreturned) - self._hold_back
        if limit <= 0:
            return ""
        delta, self._unreturned = self._unreturned[:limit], self._unreturned[limit:]
        self._num_returned += len(delta)
        return delta

    def _flush(self) -> None:
        """Emit the tokens held back for an incomplete character, with U+FFFD where bytes are missing."""
        if self.matched_stop is not None:
            return
        if self._bytes is not None:
            text = self._utf8_text(b"", final=True)
            if text:
                self._append_text(text)
            return
        if self._read_offset == len(self._token_ids):
            return
        text = self._decode(self._token_ids[self._prefix_offset :])
        if len(text) > len(self._prefix_text):
            self._advance(text)

    def _utf8_text(self, data: bytes, final: bool = False) -> str:
        """The byte path's text for the next bytes: the UTF-8 decoder's, past a character that takes the place
        of the prompt's unfinished one (see `__init__`)."""
        text = self._utf8.decode(data, final)
        if text and self._skip_first_char:
            self._skip_first_char = False
            return text[1:]
        return text

    def _emit_settled(self, text: str) -> None:
        """Emit the held text that no later token can change, if any; the rest stays held.

        A character has at most 4 bytes and every token but a special one adds at least one, so the bytes
        before the last ``_SETTLED_AFTER`` ordinary tokens are settled: a character they start has either
        come whole or can never come. Their decode is emitted when the window's decode `text` starts with
        it (invalid bytes show as the U+FFFD of a full decode; how many per byte is the decoder's choice).
        """
        ordinary = [i for i in range(self._read_offset, len(self._token_ids))
                    if self._token_ids[i] not in self._special_ids]  # fmt: skip
        if len(ordinary) <= _SETTLED_AFTER:
            return
        for cut in range(ordinary[-_SETTLED_AFTER], self._read_offset, -1):
            head = self._decode(self._token_ids[self._prefix_offset : cut])
            if len(head) > len(self._prefix_text) and text.startswith(head):
                self._advance(head, cut)
                return

    def _advance(self, text: str, upto: int | None = None) -> None:
        """Take the new text of `text`, the decode of the window up to token `upto` (default: all of
        it), and move the offsets past it."""
        new_text = text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids) if upto is None else upto
        self._prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        # NOTE: drop ids before the window so the list does not grow with the output.
        if self._prefix_offset > 0:
            del self._token_ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self._append_text(new_text)

    def _append_text(self, new_text: str) -> None:
        """Record new text and look for a stop string ending in it (searching only the tail window)."""
        start = self._num_chars - len(self._tail)  # absolute position of `_tail[0]`
        self._chunks.append(new_text)
        self._num_chars += len(new_text)
        self._unreturned += new_text
        if not self.stop:
            return
        window = self._tail + new_text
        hit: tuple[int, str] | None = None
        for stop in self.stop:
            index = window.find(stop)
            if index != -1 and (hit is None or index < hit[0]):
                hit = (index, stop)
        if hit is not None:
            index, stop = hit
            self.matched_stop = stop
            self._final_len = start + index + (len(stop) if self.include_stop_str_in_output else 0)
            self._unreturned = self._unreturned[: max(self._final_len - self._num_returned, 0)]
        elif self._stop_window:
            self._tail = window[-self._stop_window :]


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The tokenizer's special token ids, computed once per tokenizer (transformers rebuilds the list on each
    access: 250 us, a quarter of a request's admission on the 2-core CPU)."""
    cached = tokenizer.__dict__.get("_inflight_special_ids")
    if cached is None:
        cached = tokenizer.__dict__["_inflight_special_ids"] = frozenset(
            getattr(tokenizer, "all_special_ids", ())
        )
    return cached


def _make_decode(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """A function decoding a list of ids like `tokenizer.decode(..., clean_up_tokenization_spaces=False)`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        # NOTE: the Rust tokenizer directly: the same text as the transformers wrapper, without its
        # per-call Python overhead (checked against `tokenizer.decode` by the tests).
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


class _ByteTable:
    """Each token's bytes in a byte-level BPE tokenizer's decode, looked up on first use and kept."""

    def __init__(self, backend: Tokenizer, skip_special_tokens: bool) -> None:
        self._backend = backend
        self._skip = skip_special_tokens
        self._added = backend.get_added_tokens_decoder()
        self._bytes: dict[int, bytes] = {}

    def get(self, token_id: int) -> bytes:
        found = self._bytes.get(token_id)
        if found is None:
            found = self._bytes[token_id] = self._lookup(token_id)
        return found

    def _lookup(self, token_id: int) -> bytes:
        added = self._added.get(token_id)
        if added is not None:  # an added token decodes to its content (nothing, if special and skipped)
            return b"" if added.special and self._skip else self._backend.decode([token_id], False).encode()
        token = self._backend.id_to_token(token_id)
        if token is None:
            return b""  # an id past the vocabulary decodes to nothing
        if _ALPHABET.issuperset(token):  # the common token: one C-level translation
            return token.translate(_TO_LATIN1).encode("latin-1")
        # NOTE: as in the ByteLevel decoder, a token with any character outside the byte alphabet stands for
        # its own UTF-8 bytes, all of it ("Ġ日" decodes to "Ġ日", not " 日").
        return token.encode()


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's map of the 256 byte values to printable characters, inverted: character -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


_BYTE_OF_CHAR = _byte_alphabet()
_ALPHABET = frozenset(_BYTE_OF_CHAR)
_TO_LATIN1 = str.maketrans({c: chr(b) for c, b in _BYTE_OF_CHAR.items()})  # then .encode("latin-1")


def _byte_level_table(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> _ByteTable | None:
    """The tokenizer's shared `_ByteTable` when its decode is byte-level BPE's (else None)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer) or type(backend.decoder).__name__ != "ByteLevel":
        return None
    # NOTE: cached on the tokenizer, one table per skip_special_tokens (the engine's requests share them).
    tables = tokenizer.__dict__.setdefault("_inflight_byte_tables", {})
    table = tables.get(skip_special_tokens)
    if table is None:
        table = tables[skip_special_tokens] = _ByteTable(backend, skip_special_tokens)
    return table
