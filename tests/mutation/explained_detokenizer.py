"""Explained survivors of `make mutate` in detokenizer (see explained.py)."""

from tests.mutation.report import Explained

_BYTE_ALPHABET_EXTRA_PAIR = (
    "The range then also yields 256, adding the pair 256 -> 'Ā'; but byte 0, the first byte outside "
    "the printable ranges, is given chr(256 + 0) == 'Ā' later in the loop, and the inverted map "
    "keeps the later pair, so the returned {character: byte} map is identical "
    "(test_byte_alphabet_is_gpt2s compares it with GPT-2's)."
)
_TABLES_KEY = (
    "The key under which the tables are cached in the tokenizer's __dict__ is read and written by "
    "this one setdefault call and read nowhere else, so any other key (None, another string) caches "
    "the same tables."
)
_OFFSET_SLICE_START = (
    "Until `_advance` overwrites it (its first statement after taking the new text), "
    "`_prefix_offset` is only used as a slice start, where None and 0 are the same (`ids[None:] == "
    "ids[0:]`)."
)
_CODEC_NAME = "Codec names are case-insensitive: both spellings look up the same codec."
_BYTE_PATH_PREFIX_TEXT = (
    "On the byte-level path `_prefix_text` is never read: add_token and _flush return before the "
    "window code, and _emit_settled/_advance run only on the window path, where the else branch sets "
    "it."
)
_NO_STOP_WINDOW = (
    "The default is used only without stop strings, where the window is max(max_stop_len - 1, 0): 0 "
    "for the default 0 and for 1 alike."
)
_TRIM_NOTHING = (
    "With `_prefix_offset == 0` the trim deletes no ids and subtracts 0 from `_read_offset`, so "
    "doing it for 0 too changes nothing."
)
_TRIM_LATER = (
    "Skipping the trim at `_prefix_offset == 1` keeps one already-decoded id before the window; "
    "every read slices from `_prefix_offset` or indexes from `_read_offset` (both left untrimmed, so "
    "consistent), and the next advance (offset >= 2) trims it: the same text, the window still "
    "bounded."
)
_UNRETURNED_AFTER_STOP = (
    "After a stop string hit, get_delta returns at most `_final_len - _num_returned` characters from "
    "the front of `_unreturned` and then nothing (tokens are ignored, _flush returns), so characters "
    "kept beyond that are never returned; get_delta's limit and this truncation guard the same bound "
    "twice."
)
_LIMIT_AFTER_STOP = (
    "At the hit `_append_text` already cut `_unreturned` to `_final_len - _num_returned` characters "
    "(>= 0: held-back text never passes a stop string's start), so a larger limit returns the same "
    "delta, all of it, and later calls find `_unreturned` empty."
)
_ZERO_LIMIT = (
    'With limit == 0 the slice returns "" and leaves `_unreturned` and `_num_returned` unchanged: '
    "the same as the early return."
)
_EXTRA_CUTS_ONLY_SPECIALS = (
    "The extra cases either put ordinary[-3] before `_read_offset` (an empty loop) or, with exactly "
    "three ordinary ids pending, try only cuts before the first of them, whose heads add only "
    "skipped special tokens: they decode to `_prefix_text`, not longer, so nothing is emitted (a "
    "kept special's text ends the window's decode, which is then emitted whole, so kept specials are "
    "never pending)."
)
_CUT_STEP = (
    "The loop can only succeed at its first cut, ordinary[-3]: every lower cut (or one at a skipped "
    "special, which decodes like the next ordinary one) was the first cut for an earlier token and "
    "failed then, and neither its head nor the <= 3 bytes after it, which decide whether `text` "
    "starts with it, have changed; skipping lower cuts changes nothing (no difference in 24,000 "
    "random window-path streams, with tokens ending one character and starting the next)."
)
_FLUSH_EQUAL_LENGTH = (
    "A final window decode no longer than `_prefix_text` would make `_advance` append "
    '`text[len(_prefix_text):] == ""`: no text and no stop match (its tail was searched already); '
    "only the offsets move, in _flush, which runs for the request's last get_delta(finished=True)."
)

DETOKENIZER: list[Explained] = [
    Explained(
        "backend/engine/detokenizer.py",
        "_byte_alphabet",
        '*range(ord("®"), ord("ÿ") + 1),',
        '*range(ord("®"), ord("ÿ") + 2),',
        _BYTE_ALPHABET_EXTRA_PAIR,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "_byte_level_table",
        'tables = tokenizer.__dict__.setdefault("_inflight_byte_tables", {})',
        "tables = tokenizer.__dict__.setdefault(None, {})",
        _TABLES_KEY,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "_byte_level_table",
        'tables = tokenizer.__dict__.setdefault("_inflight_byte_tables", {})',
        'tables = tokenizer.__dict__.setdefault("XX_inflight_byte_tablesXX", {})',
        _TABLES_KEY,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "_byte_level_table",
        'tables = tokenizer.__dict__.setdefault("_inflight_byte_tables", {})',
        'tables = tokenizer.__dict__.setdefault("_INFLIGHT_BYTE_TABLES", {})',
        _TABLES_KEY,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer.__init__",
        "self._prefix_offset = 0",
        "self._prefix_offset = None",
        _OFFSET_SLICE_START,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer.__init__",
        'self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")',
        'self._utf8 = codecs.getincrementaldecoder("UTF-8")("replace")',
        _CODEC_NAME,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer.__init__",
        'self._prefix_text = ""',
        "self._prefix_text = None",
        _BYTE_PATH_PREFIX_TEXT,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer.__init__",
        'self._prefix_text = ""',
        'self._prefix_text = "XXXX"',
        _BYTE_PATH_PREFIX_TEXT,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer.__init__",
        "max_stop_len = max((len(s) for s in self.stop), default=0)",
        "max_stop_len = max((len(s) for s in self.stop), default=1)",
        _NO_STOP_WINDOW,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer._advance",
        "if self._prefix_offset > 0:",
        "if self._prefix_offset >= 0:",
        _TRIM_NOTHING,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer._advance",
        "if self._prefix_offset > 0:",
        "if self._prefix_offset > 1:",
        _TRIM_LATER,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer._advance",
        "self._prefix_offset = 0",
        "self._prefix_offset = None",
        _OFFSET_SLICE_START,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer._append_text",
        "self._unreturned = self._unreturned[: max(self._final_len - self._num_returned, 0)]",
        "self._unreturned = self._unreturned[: max(self._final_len + self._num_returned, 0)]",
        _UNRETURNED_AFTER_STOP,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer._append_text",
        "self._unreturned = self._unreturned[: max(self._final_len - self._num_returned, 0)]",
        "self._unreturned = self._unreturned[: max(self._final_len - self._num_returned, 1)]",
        _UNRETURNED_AFTER_STOP,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer.get_delta",
        "limit = self._final_len - self._num_returned",
        "limit = self._final_len + self._num_returned",
        _LIMIT_AFTER_STOP,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer.get_delta",
        "if limit <= 0:",
        "if limit < 0:",
        _ZERO_LIMIT,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer._emit_settled",
        "ordinary = [i for i in range(self._read_offset, len(self._token_ids))",
        "ordinary = [i for i in range(len(self._token_ids))",
        _EXTRA_CUTS_ONLY_SPECIALS,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer._emit_settled",
        "if len(ordinary) <= _SETTLED_AFTER:",
        "if len(ordinary) < _SETTLED_AFTER:",
        _EXTRA_CUTS_ONLY_SPECIALS,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer._emit_settled",
        "for cut in range(ordinary[-_SETTLED_AFTER], self._read_offset, -1):",
        "for cut in range(ordinary[-_SETTLED_AFTER], self._read_offset, -2):",
        _CUT_STEP,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer._flush",
        "if len(text) > len(self._prefix_text):",
        "if len(text) >= len(self._prefix_text):",
        _FLUSH_EQUAL_LENGTH,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "_ByteTable._lookup",
        'return token.translate(_TO_LATIN1).encode("latin-1")',
        'return token.translate(_TO_LATIN1).encode("LATIN-1")',
        _CODEC_NAME,
    ),
    Explained(
        "backend/engine/detokenizer.py",
        "IncrementalDetokenizer._utf8_text",
        "self._skip_first_char = False",
        "self._skip_first_char = None",
        "The flag is only read for truth (`if text and self._skip_first_char`); None is falsy like False.",
    ),
]
