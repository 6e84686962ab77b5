"""llguidance against xgrammar on our tokenizers: the measurements behind the guided-decoding library choice.

    python -m benchmarks.guided_libs            # writes benchmarks/results/guided-libs-cpu.json

For each library and tokenizer (the default SmolLM2 one, 49,152 tokens, and a Llama-3-style 128,256-token
one built offline by ``benchmarks.llama3_style_tokenizer``):

- tokenizer set-up time (once per engine);
- compile time of a 10-field JSON schema (nested object, enum, array, integer range, number, boolean; all
  required), to the first mask: what a request waits at admission (median of 5, no compile cache);
- the host time of one step's masks at batch 1 and 64: each row follows its own valid document's tokens
  (the HF tokenizer's own encoding of a random instance), the masks of all live rows filled per step
  (the library's parallel batch call, with every core), then each row's token accepted;
- correctness: every token of 64 valid documents allowed by the mask and EOS allowed exactly at the end;
  64 invalid documents (a wrong enum value, a string for an integer, a missing field, a number past the
  range) refused at some token; 32 random walks through the mask (random allowed tokens, punctuation
  favoured so strings close) that must each end in a document ``jsonschema`` accepts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import environment, write_result

SMOLLM2 = Path(".cache/models/SmolLM2-135M-Instruct")
DEFAULT_OUT = Path("benchmarks/results/guided-libs-cpu.json")
# Both libraries compile the same language: no free whitespace, json.dumps' separators (the engine's choice).
LLG_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
WORDS = ["alpha", "beta", "gamma", "delta", "Paris", "Zürich", "blue", "data", "x y", "naïve", "42nd", "o'k"]

SCHEMA_10 = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "email": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "created": {"type": "string"},
    },
    "required": ["id", "name", "email", "age", "score", "active", "role", "tags", "address", "created"],
    "additionalProperties": False,
}


def instance(rng: random.Random) -> dict[str, Any]:
    """A random document valid under ``SCHEMA_10``."""
    word = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))  # noqa: E731
    return {
        "id": rng.randint(-10_000, 10_000_000),
        "name": word(),
        "email": f"{rng.choice(WORDS)}@example.com",
        "age": rng.randint(0, 150),
        "score": round(rng.uniform(-100, 100), rng.randint(0, 4)),
        "active": rng.random() < 0.5,
        "role": rng.choice(["admin", "user", "guest"]),
        "tags": [word() for _ in range(rng.randint(0, 4))],
        "address": {"street": word(), "city": rng.choice(WORDS), "zip": str(rng.randint(1000, 99999))},
        "created": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    }


def invalid_text(rng: random.Random, kind: int) -> str:
    """A document that breaks ``SCHEMA_10`` in one of four ways."""
    doc = instance(rng)
    if kind == 0:
        doc["role"] = "root"
    elif kind == 1:
        doc["id"] = "seven"
    elif kind == 2:
        del doc["email"]
    else:
        doc["age"] = 151 + rng.randint(0, 50)
    return json.dumps(doc, ensure_ascii=False)


class LLGuidance:
    """llguidance behind the benchmark's small interface."""

    name = "llguidance"

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        import llguidance
        import llguidance.hf

        self.lib = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        self.executor = llguidance.LLExecutor(num_threads=os.cpu_count())
        self.version = llguidance.__version__

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.lib.LLMatcher.grammar_from_json_schema(schema, defaults=LLG_JSON_OPTIONS)
        matcher = self.lib.LLMatcher(self.tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.lib.LLMatcher(self.tokenizer, compiled, log_level=0)

    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        from llguidance.numpy import fill_next_token_bitmask_par

        fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matcher: Any, token_id: int) -> bool:
        return matcher.consume_token(token_id)

    def is_terminated(self, matcher: Any) -> bool:
        return matcher.is_stopped()


class XGrammar:
    """xgrammar behind the benchmark's small interface."""

    name = "xgrammar"

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        import xgrammar

        self.lib = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            hf_tokenizer, vocab_size=vocab_size, stop_token_ids=eos_ids
        )
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=os.cpu_count())
        self.version = xgrammar.__version__ if hasattr(xgrammar, "__version__") else "0.2.8"

    def compile(self, schema: dict[str, Any]) -> Any:
        # NOTE: a fresh compiler, cache off: each repetition compiles from scratch.
        compiler = self.lib.GrammarCompiler(self.info, max_threads=os.cpu_count(), cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled: Any) -> Any:
        return self.lib.GrammarMatcher(compiled)

    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        import torch

        self.batch.batch_fill_next_token_bitmask(matchers, torch.from_numpy(bitmask))

    def accept(self, matcher: Any, token_id: int) -> bool:
        return matcher.accept_token(token_id)

    def is_terminated(self, matcher: Any) -> bool:
        return matcher.is_terminated()


def allowed(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """The allowed token ids of one int32 bitmask row (bit i of word w: token 32 w + i)."""
    return np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab_size].nonzero()[0]


def timed_steps(lib: Any, compiled: Any, docs: list[list[int]], vocab_size: int) -> dict[str, float]:
    """Fill the masks of every live row, then accept each row's next token, until every document is done."""
    words = (vocab_size + 31) // 32
    matchers = [lib.matcher(compiled) for _ in docs]
    fill_us, accept_us = [], []
    for step in range(max(len(d) for d in docs)):
        live = [i for i, d in enumerate(docs) if step < len(d)]
        bitmask = np.full((len(live), words), -1, dtype=np.int32)
        rows = [matchers[i] for i in live]
        started = time.perf_counter()
        lib.fill(rows, bitmask)
        filled = time.perf_counter()
        for matcher, i in zip(rows, live, strict=True):
            assert lib.accept(matcher, docs[i][step])
        done = time.perf_counter()
        fill_us.append((filled - started) * 1e6)
        accept_us.append((done - filled) * 1e6)
    return {
        "steps": len(fill_us),
        "mask_us_mean": round(statistics.fmean(fill_us), 1),
        "mask_us_p50": round(statistics.median(fill_us), 1),
        "mask_us_p99": round(float(np.percentile(fill_us, 99)), 1),
        "accept_us_mean": round(statistics.fmean(accept_us), 1),
    }


def correctness(lib: Any, compiled: Any, hf: Any, vocab_size: int, eos_ids: list[int], seed: int) -> dict:
    """The checks of the module docstring; counts of passes."""
    import jsonschema

    rng = random.Random(seed)
    words = (vocab_size + 31) // 32
    bitmask = np.zeros((1, words), dtype=np.int32)
    valid_ok = 0
    for _ in range(64):
        ids = hf.encode(json.dumps(instance(rng), ensure_ascii=False), add_special_tokens=False)
        matcher, ok = lib.matcher(compiled), True
        for token_id in ids:
            lib.fill([matcher], bitmask)
            allow = set(allowed(bitmask[0], vocab_size).tolist())
            ok &= token_id in allow and not (allow & set(eos_ids))
            ok &= lib.accept(matcher, token_id)
        lib.fill([matcher], bitmask)
        valid_ok += ok and bool(set(allowed(bitmask[0], vocab_size).tolist()) & set(eos_ids))
    invalid_refused = 0
    for k in range(64):
        ids = hf.encode(invalid_text(rng, k % 4), add_special_tokens=False)
        matcher, refused = lib.matcher(compiled), False
        for token_id in ids:
            lib.fill([matcher], bitmask)
            if token_id not in set(allowed(bitmask[0], vocab_size).tolist()):
                refused = True
                break
            lib.accept(matcher, token_id)
        invalid_refused += refused
    texts = [hf.decode([i]) for i in range(vocab_size)]
    punctuation = np.array([t.strip() != "" and not any(c.isalnum() for c in t) for t in texts])
    blank = np.array([t.strip() == "" for t in texts])
    walks_valid = walks_done = 0
    for _ in range(32):
        matcher, ids = lib.matcher(compiled), []
        for _ in range(600):
            lib.fill([matcher], bitmask)
            allow = allowed(bitmask[0], vocab_size)
            if set(allow.tolist()) & set(eos_ids):
                walks_done += 1
                break
            preferred = allow[punctuation[allow]]
            others = allow[~blank[allow]]
            pool = preferred if len(preferred) and rng.random() < 0.5 else (others if len(others) else allow)
            token_id = int(rng.choice(pool.tolist()))
            assert lib.accept(matcher, token_id)
            ids.append(token_id)
        try:
            jsonschema.validate(json.loads(hf.decode(ids)), SCHEMA_10)
            walks_valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    # NOTE: a walk still inside a string after 600 tokens is cut there (not a document yet, not a failure).
    return {"valid_docs_accepted": f"{valid_ok}/64", "invalid_docs_refused": f"{invalid_refused}/64",
            "random_walks_ended": f"{walks_done}/32", "ended_walks_valid": f"{walks_valid}/{walks_done}"}  # fmt: skip


def agreement(libs: list[tuple[Any, Any]], hf: Any, vocab_size: int, seed: int) -> dict[str, int]:
    """Over 16 valid documents' steps: masks bit-for-bit the same, the first library's a strict subset of the
    second's (llguidance keeps forced text to its canonical tokens: ``{"`` but not ``{`` then ``"``), other."""
    rng = random.Random(seed)
    words = (vocab_size + 31) // 32
    counts = {"identical": 0, "first_strict_subset": 0, "other": 0}
    for _ in range(16):
        ids = hf.encode(json.dumps(instance(rng), ensure_ascii=False), add_special_tokens=False)
        matchers = [lib.matcher(compiled) for lib, compiled in libs]
        for token_id in [*ids, None]:
            masks = []
            for (lib, _), matcher in zip(libs, matchers, strict=True):
                bitmask = np.zeros((1, words), dtype=np.int32)
                lib.fill([matcher], bitmask)
                masks.append(set(allowed(bitmask[0], vocab_size).tolist()))
                if token_id is not None:
                    lib.accept(matcher, token_id)
            key = (
                "identical"
                if masks[0] == masks[1]
                else "first_strict_subset"
                if masks[0] < masks[1]
                else "other"
            )
            counts[key] += 1
    return counts


def measure(lib_cls: type, tokenizer_path: Path, label: str) -> tuple[dict[str, Any], Any, Any]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_path)
    vocab_size = len(hf)
    eos_ids = [hf.eos_token_id]
    started = time.perf_counter()
    lib = lib_cls(hf, vocab_size, eos_ids)
    setup_s = time.perf_counter() - started
    compile_ms = []
    for _ in range(5):
        started = time.perf_counter()
        compiled = lib.compile(SCHEMA_10)
        matcher = lib.matcher(compiled)
        lib.fill([matcher], np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32))
        compile_ms.append((time.perf_counter() - started) * 1e3)
    rng = random.Random(0)
    docs = [
        hf.encode(json.dumps(instance(rng), ensure_ascii=False), add_special_tokens=False) for _ in range(64)
    ]
    result = {
        "library": lib.name,
        "version": lib.version,
        "tokenizer": label,
        "vocab_size": vocab_size,
        "tokenizer_setup_s": round(setup_s, 3),
        "compile_to_first_mask_ms_median": round(statistics.median(compile_ms), 2),
        "compile_to_first_mask_ms_all": [round(x, 2) for x in compile_ms],
        "batch_1": timed_steps(lib, compiled, docs[:8], vocab_size)
        | {"note": "8 documents one after another"},
        "batch_64": timed_steps(lib, compiled, docs, vocab_size),
        "correctness": correctness(lib, compiled, hf, vocab_size, eos_ids, seed=1),
    }
    print(json.dumps(result), flush=True)
    return result, lib, compiled


def main() -> None:
    from benchmarks.llama3_style_tokenizer import ensure

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    tokenizers = [(SMOLLM2, "SmolLM2-135M-Instruct (49,152)"), (ensure(), "Llama-3-style byte BPE (128,256)")]
    from transformers import AutoTokenizer

    runs, agreements = [], {}
    for path, label in tokenizers:
        measured = [measure(lib, path, label) for lib in (LLGuidance, XGrammar)]
        runs += [result for result, _, _ in measured]
        hf = AutoTokenizer.from_pretrained(path)
        agreements[label] = agreement([(lib, c) for _, lib, c in measured], hf, len(hf), seed=2)
        print(f"{label}: llguidance vs xgrammar masks {agreements[label]}", flush=True)
    write_result(args.out, {"environment": environment() | {"cpu_count": os.cpu_count()}, "schema": SCHEMA_10,
                            "runs": runs, "mask_comparison_llguidance_vs_xgrammar": agreements})  # fmt: skip


if __name__ == "__main__":
    main()
