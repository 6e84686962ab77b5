"""Guided decoding (structured output): a grammar per request, one matcher per sequence, a token mask per step.

``SamplingParams.guided_decoding`` (a JSON schema, a regex or a list of choices) is compiled by llguidance at
admission (a grammar that does not compile is refused with a ``ValueError`` naming ``guided_json`` /
``guided_regex`` / ``guided_choice``). Each sequence of the request gets its own ``GuidedMatcher`` (n > 1:
n matchers of one grammar), fed with each token the sequence accepts, in output order, exactly once: a
matcher knows how many output tokens it has consumed, so a token offered again (read early for a mask, then
processed; a preempted sequence recomputed) is skipped.

Each step, the host fills the guided rows' bitmasks (one bit per vocabulary entry, 1 = allowed; EOS only where
the grammar accepts) while the device runs the step's forward; the executor applies them to the logits before
sampling. With async scheduling a guided row of step N+1 may be planned before its token of step N is read:
the mask is then built after N's tokens are read inside N+1's launch (the forward already queued, the
sampler not yet), so every mask follows every token (``LLMEngine`` and docs/structured-output.md).

llguidance over xgrammar: ``benchmarks/guided_libs.py`` (compile to first mask 1.2-1.4 ms against 4-11 ms,
per-step masks at 128k vocabulary 1.6-2.4x faster, and no torch import in the engine floor).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

import llguidance
import llguidance.hf
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par

from inflight.backend.engine.sampling_params import GuidedDecodingParams

# NOTE: no free whitespace between JSON tokens (json.dumps' separators): with llguidance's default (any
# amount anywhere) small models can spend their whole budget on newlines inside an object.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_GRAMMAR_CACHE_SIZE = 256

# A guided row's mask source for the executor: (row indices in the step's sampling rows, int32 bitmask
# [len(rows), ceil(vocab_size / 32)]).
GuidedMasks = tuple[list[int], np.ndarray]


class GuidedMatcher:
    """One sequence's grammar state: the output tokens consumed so far, in order."""

    __slots__ = ("matcher", "num_accepted", "error")

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher
        self.num_accepted = 0  # output tokens consumed
        self.error: str | None = None

    def accept(self, index: int, token_id: int) -> None:
        """Consume the sequence's output token number ``index`` (0-based) unless already consumed."""
        if index < self.num_accepted or self.error is not None:
            return
        if index > self.num_accepted:
            self.error = f"guided decoding: output token {index} offered before token {self.num_accepted}"
        elif not self.matcher.consume_token(token_id):
            self.error = (
                f"guided decoding: token {token_id} refused by the grammar: {self.matcher.get_error()}"
            )
        else:
            self.num_accepted += 1

    def finish(self, index: int, token_id: int) -> tuple[str, None] | None:
        """Accept output token ``index``; ("stop", None) when the grammar is complete (nothing else may follow),
        ("error", None) when the token broke it (``error`` says how), else None."""
        self.accept(index, token_id)
        if self.error is not None:
            return "error", None
        return ("stop", None) if self.matcher.is_stopped() else None


class _GuidedSequence(Protocol):
    """What the mask source reads of the engine's state of a sequence."""

    guided: GuidedMatcher | None
    request: Any  # batching.Request: output_token_ids, num_pending_tokens


class _LaunchedStep(Protocol):
    sample_ids: list[str]

    def read(self) -> Any: ...  # SampledTokens: token_ids


class GuidedDecoding:
    """The engine's grammar side: check and compile at admission, matchers per sequence, masks per step."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Collection[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None  # built at the first guided request (~0.3-1 s)
        self._executor: llguidance.LLExecutor | None = None
        self._grammars: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.num_masks = 0  # masks filled (rows), for the stats
        self.mask_seconds = 0.0  # host time spent filling them

    @property
    def words(self) -> int:
        """int32 words per mask row."""
        return (self.vocab_size + 31) // 32

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids
            )
            # NOTE: llguidance's thread pool fills the rows of a step in parallel (GIL released).
            self._executor = llguidance.LLExecutor(num_threads=min(os.cpu_count() or 1, 32))
        return self._tokenizer

    def grammar(self, params: GuidedDecodingParams) -> str:
        """The llguidance grammar of ``params``, checked; ``ValueError`` naming the field when it does not
        compile. Cached by its text (a request's n sequences, and repeated schemas, compile once)."""
        field, text = params.field_name, params.text
        key = (field, text)
        cached = self._grammars.get(key)
        if cached is not None:
            self._grammars.move_to_end(key)
            return cached
        try:
            if params.json is not None:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
            elif params.regex is not None:
                grammar = llguidance.LLMatcher.grammar_from_regex(text)
            else:
                grammar = llguidance.LLMatcher.grammar_from_regex(choice_regex(params.choice or []))
        except ValueError as exc:
            raise ValueError(f"{field} does not compile: {exc}") from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self._llg_tokenizer()
        )
        if is_error:
            raise ValueError(f"{field} does not compile: {' '.join(messages).strip()}")
        self._grammars[key] = grammar
        if len(self._grammars) > _GRAMMAR_CACHE_SIZE:
            self._grammars.popitem(last=False)
        return grammar

    def check(self, params: GuidedDecodingParams | None) -> None:
        """Refuse a grammar that does not compile (``ValueError`` naming the field)."""
        if params is not None:
            self.grammar(params)

    def matcher(self, params: GuidedDecodingParams | None) -> GuidedMatcher | None:
        """A new matcher at the grammar's start (one per sequence), or None when the request is not guided."""
        if params is None:
            return None
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), self.grammar(params), log_level=0)
        if matcher.is_error():
            raise ValueError(f"{params.field_name} does not compile: {matcher.get_error()}")
        return GuidedMatcher(matcher)

    def mask_source(
        self,
        states: Sequence[_GuidedSequence],
        previous: _LaunchedStep | None,
        sequences: dict[str, _GuidedSequence],
    ) -> Callable[[], GuidedMasks] | None:
        """What the executor calls between the step's forward and its sampler to get the guided rows' masks
        (``states``: the step's sampling rows, in order); None when no row is guided. ``previous``: the step in
        flight, whose tokens some rows were planned without: they are accepted first (``sequences``: the
        engine's sequences by id)."""
        rows = [i for i, s in enumerate(states) if s.guided is not None]
        if not rows:
            return None
        guided = [states[i] for i in rows]

        def build() -> GuidedMasks:
            # NOTE: num_pending_tokens counts this step's token too: 2 means the previous one is unread.
            if previous is not None and any(s.request.num_pending_tokens > 1 for s in guided):
                self.accept_step(previous, sequences)
            return rows, self.fill(guided)

        return build

    @staticmethod
    def accept_step(step: _LaunchedStep, sequences: dict[str, _GuidedSequence]) -> None:
        """Feed a launched step's tokens to its guided sequences' matchers before the engine appends them
        (waits for the step: its tokens are the one host synchronisation it had anyway)."""
        sampled = step.read()
        for request_id, token_id in zip(step.sample_ids, sampled.token_ids, strict=True):
            state = sequences.get(request_id)
            if state is not None and state.guided is not None:
                # NOTE: not appended yet: the token's output index is the current output length.
                state.guided.accept(len(state.request.output_token_ids), token_id)

    def fill(self, guided: Sequence[_GuidedSequence]) -> np.ndarray:
        """The rows' masks, [len(guided), words] int32, one bit per token (bit t % 32 of word t // 32)."""
        for s in guided:
            request, matcher = s.request, s.guided
            assert matcher is not None
            sampling = len(request.output_token_ids) + request.num_pending_tokens - 1  # this step's token
            if matcher.error is None and matcher.num_accepted != sampling:
                # NOTE: an invariant, not user input: the mask would be for the wrong position.
                raise RuntimeError(f"guided decoding of {request.request_id}: matcher at output token "
                                   f"{matcher.num_accepted}, sampling token {sampling}")  # fmt: skip
        started = time.perf_counter()
        bitmask = np.full((len(guided), self.words), -1, dtype=np.int32)
        assert self._executor is not None
        # NOTE: a matcher in error computes an all-EOS mask: its sequence ends when the token is processed.
        fill_next_token_bitmask_par(self._executor, [(s.guided.matcher, i) for i, s in enumerate(guided)],
                                    bitmask)  # fmt: skip
        self.mask_seconds += time.perf_counter() - started
        self.num_masks += len(guided)
        return bitmask


def choice_regex(choices: Sequence[str]) -> str:
    """A regex matching exactly one of ``choices`` (every character that is not a letter, digit, ``_`` or space
    written as ``\\x{HEX}``)."""
    return "(" + "|".join("".join(_literal(c) for c in choice) for choice in choices) + ")"


def _literal(char: str) -> str:
    return char if char.isascii() and (char.isalnum() or char in "_ ") else f"\\x{{{ord(char):X}}}"
