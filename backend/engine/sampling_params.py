"""Per-request sampling parameters: validated once at the door, then trusted by the engine."""

from __future__ import annotations

import dataclasses
import json as _json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1
# NOTE: temperatures below this are treated as greedy (argmax); dividing logits by ~0 would overflow.
GREEDY_TEMPERATURE = 1e-5

_INT_FIELDS = ("n", "max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs")
# logit_bias: a bias is added to a token's logit; OpenAI's and vLLM's range.
MAX_LOGIT_BIAS = 100.0
# The allowed range of each float field, as named in error messages.
_FLOAT_LIMITS = {
    "temperature": ">= 0",
    "top_p": "in (0, 1]",
    "min_p": "in [0, 1]",
    "repetition_penalty": "> 0",
    "presence_penalty": "in [-2, 2]",
    "frequency_penalty": "in [-2, 2]",
}
_FLOAT_FIELDS = tuple(_FLOAT_LIMITS)
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
_STR_LIST_FIELDS = ("stop", "bad_words")
_INT_LIST_FIELDS = ("stop_token_ids",)
_OPTIONAL_FIELDS = ("max_tokens", "seed", "logprobs", "prompt_logprobs")

# Names used by the TensorRT-LLM Triton backend, mapped to ours.
_ALIASES = {
    "min_length": "min_tokens",
    "random_seed": "seed",
    "stop_words": "stop",
    "runtime_top_k": "top_k",
    "runtime_top_p": "top_p",
}
# Accepted only with the value 1: this engine has no beam search.
_SINGLE_SEQUENCE_KEYS = {"beam_width": "beam search"}


@dataclass
class SamplingParams:
    """How to pick the tokens of one request (vLLM's names and defaults).

    `max_tokens=None` means "up to the model's context length". `top_k` 0 or -1 turns top-k off.
    `logprobs` is the number of top alternatives returned per token (0: only the sampled token's
    logprob). `prompt_logprobs` (None: off) asks for the log-probability of every prompt token after the
    first under the model's raw distribution, with that many top alternatives per position (0: only the
    prompt token's own): `CompletionOutput.prompt_logprobs`, as vLLM. `bad_words` are kept as strings;
    the engine tokenizes them.

    `n` sequences are generated for the prompt (they share its KV blocks; sequence i samples with seed
    `seed + i` when a seed is given, so each is reproducible and they differ; at temperature 0 they are
    equal). `logit_bias` maps token ids to a bias in [-100, 100] added to their logits before the
    penalties and sampling (OpenAI's and vLLM's); returned logprobs stay those of the raw logits. The
    engine checks `n` against `max_num_seqs` and the token ids against the vocabulary.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    bad_words: list[str] = field(default_factory=list)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    guided_decoding: GuidedDecodingParams | None = None  # structured output (a dict is turned into one)

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            setattr(self, name, _as_int(name, value))
        for name in _FLOAT_FIELDS:
            setattr(self, name, _as_float(name, getattr(self, name)))
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a boolean, got {_describe(value)}")
        for name in _STR_LIST_FIELDS:
            setattr(self, name, _as_str_list(name, getattr(self, name)))
        self.stop_token_ids = _as_int_list("stop_token_ids", self.stop_token_ids)
        self.logit_bias = _as_logit_bias(self.logit_bias)
        self.guided_decoding = GuidedDecodingParams.coerce(self.guided_decoding)
        self._check_ranges()

    def _check_ranges(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be at least 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or at least 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        for token_id in self.stop_token_ids:
            if token_id < 0:
                raise ValueError(f"stop_token_ids must hold token ids >= 0, got {token_id}")

    @property
    def uses_penalties(self) -> bool:
        """A repetition, presence or frequency penalty is on (sampling reads the output so far)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def is_greedy(self) -> bool:
        """True when the request takes the argmax (temperature below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def top_k_enabled(self) -> bool:
        """True when top-k filtering is on (top_k >= 1)."""
        return self.top_k >= 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingParams:
        """Build from a JSON-like mapping (e.g. Triton's `sampling_parameters`).

        Numbers and booleans may arrive as strings ("12", "0.5", "true"); TensorRT-LLM backend names
        (`min_length`, `random_seed`, `stop_words`, `runtime_top_k`, `runtime_top_p`) are accepted, and
        `beam_width` only with the value 1. A null value means "use the default" except for the
        fields where None has a meaning (`max_tokens`, `seed`, `logprobs`, `prompt_logprobs`).
        `logit_bias` is a JSON object: its keys are token ids as strings.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"sampling parameters must be a mapping, got {_describe(values)}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = _with_guided_decoding(values)
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in _SINGLE_SEQUENCE_KEYS:
                if value is not None and _parse(key, value, int) != 1:
                    raise ValueError(f"{key} must be 1: {_SINGLE_SEQUENCE_KEYS[key]} is not supported")
                continue
            name = _ALIASES.get(key, key)
            if name not in known:
                raise ValueError(f"unknown sampling parameter {key!r}; known: {', '.join(sorted(known))}")
            if name in kwargs:
                raise ValueError(f"sampling parameter {name!r} given twice (as {name!r} and an alias)")
            if value is None and name not in _OPTIONAL_FIELDS:
                continue
            kwargs[name] = _convert(name, value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that `from_dict` turns back into equal params."""
        values = dataclasses.asdict(self)
        if self.logit_bias is not None:
            values["logit_bias"] = {str(t): b for t, b in self.logit_bias.items()}  # JSON keys are strings
        return values


def _as_logit_bias(value: object) -> dict[int, float] | None:
    """``{token id: bias}`` (ids may be strings of digits, as in JSON); None or empty: no bias."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"logit_bias must be an object of token id -> bias, got {_describe(value)}")
    bias: dict[int, float] = {}
    for key, raw in value.items():
        token = _parse("logit_bias", key, int) if isinstance(key, str) else key
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        number = _parse("logit_bias", raw, float)
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {raw!r} for token {key}")
        if not -MAX_LOGIT_BIAS <= number <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {number} for token {key}")
        bias[token] = float(number)
    return bias or None


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _as_int(name: str, value: object) -> int:
    # NOTE: bool is a subclass of int; True as a token count is almost always a client bug.
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {_describe(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise ValueError(f"{name} must be an integer, got {_describe(value)}")


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number {_FLOAT_LIMITS[name]}, got {_describe(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {_FLOAT_LIMITS[name]}, got {value}")
    return float(value)


def _as_str_list(name: str, value: object) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{name} must be a string or a list of strings, got {_describe(value)}")
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{name} must hold non-empty strings, got {_describe(item)}")
    return list(items)


def _as_int_list(name: str, value: object) -> list[int]:
    if value is None:
        return []
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{name} must be a list of integers, got {_describe(value)}")
    return [_as_int(name, item) for item in items]


def _parse(name: str, value: object, kind: type) -> object:
    """Turn a JSON string into `kind` (int, float or bool); other values pass through unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "false"):
                return lowered == "true"
            raise ValueError
        if kind is int:
            try:
                return int(text)
            except ValueError:
                return float(text)  # "12.0" is accepted; "12.5" is then rejected as non-integral.
        return float(text)
    except ValueError:
        expected = {bool: "a boolean", int: "an integer", float: "a number"}[kind]
        raise ValueError(f"{name} must be {expected}, got {_describe(value)}") from None


def _convert(name: str, value: object) -> object:
    """Convert one JSON value by the field's type; validation happens in `__post_init__`."""
    if name in _INT_FIELDS:
        return _parse(name, value, int)
    if name in _FLOAT_FIELDS:
        return _parse(name, value, float)
    if name in _BOOL_FIELDS:
        return _parse(name, value, bool)
    if name in _INT_LIST_FIELDS and isinstance(value, (list, tuple)):
        return [_parse(name, item, int) for item in value]
    if name in _INT_LIST_FIELDS:
        return _parse(name, value, int)
    return value


_GUIDED_KEYS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice"}


@dataclass
class GuidedDecodingParams:
    """Structured output (vLLM's names): exactly one of a JSON schema (``json``: an object or its JSON text),
    a regular expression (``regex``: the whole output matches it) or strings (``choice``: the output is one of
    them). The engine compiles it at admission (``guided.py``) and refuses one that does not compile."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None

    def __post_init__(self) -> None:
        given = [f"guided_{name}" for name in ("json", "regex", "choice") if getattr(self, name) is not None]
        if len(given) != 1:
            got = " and ".join(given) if given else "none"
            raise ValueError(f"guided decoding takes exactly one of guided_json, guided_regex or guided_choice, "
                             f"got {got}")  # fmt: skip
        if self.json is not None:
            self.json = _as_schema(self.json)
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"guided_regex must be a non-empty string, got {_describe(self.regex)}")
        if self.choice is not None:
            choice = self.choice
            valid = isinstance(choice, (list, tuple)) and all(isinstance(c, str) and c for c in choice)
            if not valid or not choice:
                raise ValueError(f"guided_choice must be a non-empty list of non-empty strings, got "
                                 f"{_describe(choice)}")  # fmt: skip
            self.choice = list(choice)

    @property
    def field_name(self) -> str:
        """The input that set it: ``guided_json``, ``guided_regex`` or ``guided_choice`` (error messages)."""
        if self.json is not None:
            return "guided_json"
        return "guided_regex" if self.regex is not None else "guided_choice"

    @property
    def text(self) -> str:
        """The schema, regex or choice list as one string (the grammar cache's key)."""
        if self.json is not None:
            return self.json if isinstance(self.json, str) else _json.dumps(self.json)  # key order kept
        return self.regex if self.regex is not None else _json.dumps(self.choice)

    @classmethod
    def coerce(cls, value: object) -> GuidedDecodingParams | None:
        """None, an instance, or a mapping with the keys json / regex / choice."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"guided_decoding must be an object (json, regex or choice): {_describe(value)}")
        unknown = set(value) - {"json", "regex", "choice"}
        if unknown:
            raise ValueError(f"guided_decoding takes json, regex or choice, got {sorted(unknown)}")
        return cls(**value)


def _as_schema(value: object) -> str | dict[str, Any]:
    """A JSON schema object, or its text (kept as given once it parses to an object)."""
    schema = value
    if isinstance(value, str):
        try:
            schema = _json.loads(value)
        except _json.JSONDecodeError as exc:
            raise ValueError(f"guided_json is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(schema, Mapping):
        raise ValueError(f"guided_json must be a JSON schema object, got {type(schema).__name__}")
    return value if isinstance(value, str) else dict(schema)


def _with_guided_decoding(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """``guided_json`` / ``guided_regex`` / ``guided_choice`` keys (vLLM's flat spelling) as one
    ``guided_decoding`` entry."""
    if not any(key in values for key in _GUIDED_KEYS):
        return values
    guided = {_GUIDED_KEYS[k]: v for k, v in values.items() if k in _GUIDED_KEYS and v is not None}
    rest = {k: v for k, v in values.items() if k not in _GUIDED_KEYS}
    if guided:
        if rest.get("guided_decoding") is not None:
            raise ValueError("guided_decoding given together with guided_json, guided_regex or guided_choice")
        rest["guided_decoding"] = guided
    return rest
