"""Structured output (guided decoding) end to end in the engine, on the CPU.

The default SmolLM2 model answers 100 generated JSON schemas (seeded temperature 1 and greedy, in one
``LLM.generate`` call): every output parses and ``jsonschema`` accepts it. Regex and choice outputs match. The
greedy guided tokens equal HF transformers' argmax over the tokens that llguidance itself allows (a matcher
built here, not the engine's). Async scheduling on and off, with preemptions, give the same tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from inflight import LLM, SamplingParams
from inflight.backend.engine.sampling_params import GuidedDecodingParams

from ..conftest import copy_tokenizer
from .guided_schemas import schemas
from .test_hf_parity import _block_bytes
from .tiny_models import build_tiny_checkpoint

PROMPT = [{"role": "user", "content": "Reply with a short JSON object."}]
# The engine's JSON grammar options, stated here for the independent reference (docs/structured-output.md).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_path: Path) -> LLM:
    return LLM(str(smollm2_path), max_model_len=512, kv_cache_memory_bytes=256 << 20)


def _json(schema: dict) -> GuidedDecodingParams:
    return GuidedDecodingParams(json=schema)


def test_100_schemas_every_output_validates(smollm2_llm: LLM) -> None:
    all_schemas = schemas()
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=300, guided_decoding=_json(s))
              for i, s in enumerate(all_schemas)]  # fmt: skip
    params += [SamplingParams(temperature=0, max_tokens=300, guided_decoding=_json(s)) for s in all_schemas]
    outputs = smollm2_llm.generate([PROMPT] * len(params), params)
    failures = []
    for i, out in enumerate(outputs):
        schema = all_schemas[i % len(all_schemas)]
        try:
            assert out.finish_reason == "stop", out.finish_reason
            document = json.loads(out.text)
            jsonschema.validate(document, schema)
            assert list(document) == [k for k in schema["properties"] if k in document], (
                "the schema's key order"
            )
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append((i, out.text, str(exc)[:200]))
    assert not failures, failures[:5]
    # A completed object ends the sequence (grammar terminal: "stop"), without an EOS token.
    eos = smollm2_llm.engine.eos_token_ids
    assert all(out.stop_reason is None and not set(out.token_ids) & eos for out in outputs)
    assert smollm2_llm.engine.guided.num_masks >= sum(len(o.token_ids) for o in outputs)


REGEXES = [
    r"\d{3}-\d{4}",
    r"(cat|dog)s? (and|or) [a-z]{1,8}",
    r"[A-Z][a-z]{1,10}@example\.com",
    r"-?[0-9]+\.[0-9]{2}",
]
CHOICES = [["yes", "no"], ["Paris", "London", "New York (NY)"], ["a.b*c", "a+b?", "[x]"]]


def test_regex_and_choice_outputs_match(smollm2_llm: LLM) -> None:
    prompt = [{"role": "user", "content": "Answer briefly."}]
    params, expected = [], []
    for pattern in REGEXES:
        for temperature, seed in ((0.0, None), (1.0, 7)):
            params.append(SamplingParams(temperature=temperature, seed=seed, max_tokens=60,
                                         guided_decoding=GuidedDecodingParams(regex=pattern)))  # fmt: skip
            expected.append(lambda text, p=pattern: re.fullmatch(p, text) is not None)
    for choices in CHOICES:
        for temperature, seed in ((0.0, None), (1.0, 3)):
            params.append(SamplingParams(temperature=temperature, seed=seed, max_tokens=60,
                                         guided_decoding=GuidedDecodingParams(choice=choices)))  # fmt: skip
            expected.append(lambda text, c=choices: text in c)
    outputs = smollm2_llm.generate([prompt] * len(params), params)
    for out, p, matches in zip(outputs, params, expected, strict=True):
        assert out.finish_reason == "stop" and matches(out.text), (p.guided_decoding, out.text)


@torch.no_grad()
def test_greedy_guided_tokens_are_hf_argmax_over_llguidance_mask(
    smollm2_llm: LLM, smollm2_path: Path
) -> None:
    import llguidance
    import llguidance.hf
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
    from transformers import AutoModelForCausalLM, AutoTokenizer

    schema = schemas()[3]
    (out,) = smollm2_llm.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=200, guided_decoding=_json(schema))
    )
    assert out.finish_reason == "stop" and out.token_ids

    hf_tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    vocab_size = model.config.vocab_size
    tokenizer = llguidance.hf.from_tokenizer(
        hf_tokenizer, n_vocab=vocab_size, eos_token=sorted(smollm2_llm.engine.eos_token_ids)
    )
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    bitmask = allocate_token_bitmask(1, vocab_size)
    ids = list(out.prompt_token_ids)
    expected = []
    while not matcher.is_stopped():
        fill_next_token_bitmask(matcher, bitmask)
        allowed = np.unpackbits(bitmask[0].view(np.uint8), bitorder="little")[:vocab_size].astype(bool)
        logits = model(torch.tensor([ids])).logits[0, -1].numpy()
        token = int(np.argmax(np.where(allowed, logits, -np.inf)))
        expected.append(token)
        assert matcher.consume_token(token)
        ids.append(token)
        assert len(expected) <= len(out.token_ids), "the engine stopped before the grammar was complete"
    assert out.token_ids == expected


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_path) -> Path:
    path = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("guided-llama"))
    copy_tokenizer(smollm2_path, path)
    return path


@pytest.mark.parametrize("tight_kv", [False, True])
def test_async_scheduling_and_preemption_change_no_guided_token(tiny_llama: Path, tight_kv: bool) -> None:
    """Guided rows planned ahead take their mask after the previous token is accepted; a preempted and
    recomputed sequence feeds no token twice: the same tokens as the synchronous engine."""
    some = schemas()[:6]
    params = [SamplingParams(temperature=0, max_tokens=90, guided_decoding=_json(s)) for s in some]
    params += [
        SamplingParams(temperature=0.8, seed=5, max_tokens=90, guided_decoding=_json(some[0])),
        SamplingParams(
            temperature=0, max_tokens=40, guided_decoding=GuidedDecodingParams(regex=r"[a-z]+ [0-9]+")
        ),
        SamplingParams(temperature=0, max_tokens=30),  # unguided rows in the same steps
        SamplingParams(temperature=0.9, seed=2, max_tokens=30),
    ]
    prompts = [[3 + i, 40 + 7 * i, 300 + i] for i in range(len(params))]
    kwargs = (
        {"kv_cache_memory_bytes": 9 * _block_bytes(tiny_llama), "max_num_batched_tokens": 40}
        if tight_kv
        else {}
    )
    runs = {}
    for async_scheduling in (False, True):
        llm = LLM(str(tiny_llama), max_model_len=112, block_size=16, async_scheduling=async_scheduling,
                  async_scheduling_min_batch=0, **kwargs)  # fmt: skip
        early = []  # steps whose guided rows took the previous step's tokens inside the launch
        accept_step = llm.engine.guided.accept_step
        llm.engine.guided.accept_step = lambda step, seqs, e=early, a=accept_step: (
            e.append(step),
            a(step, seqs),
        )
        outputs = llm.generate(prompts, params)
        assert bool(early) == async_scheduling
        runs[async_scheduling] = [(o.token_ids, o.finish_reason) for o in outputs]
        assert all(o.finish_reason in ("stop", "length") for o in outputs), [o.finish_reason for o in outputs]
        if tight_kv:
            assert llm.engine.stats().num_preemptions_total > 0
        for out, p in zip(outputs, params, strict=True):
            if (
                p.guided_decoding is not None
                and p.guided_decoding.json is not None
                and out.finish_reason == "stop"
            ):
                jsonschema.validate(json.loads(out.text), p.guided_decoding.json)
    assert runs[True] == runs[False]


def test_guided_sequences_of_one_request_each_follow_the_grammar(smollm2_llm: LLM) -> None:
    schema = schemas()[1]
    (out,) = smollm2_llm.generate(
        [PROMPT], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=300, guided_decoding=_json(schema))
    )
    assert len(out.outputs) == 3
    for seq in out.outputs:
        assert seq.finish_reason == "stop"
        jsonschema.validate(json.loads(seq.text), schema)


@pytest.mark.parametrize(
    ("guided", "named"),
    [
        (GuidedDecodingParams(json={"type": "objectx"}), "guided_json"),
        (
            GuidedDecodingParams(json={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
            "guided_json",
        ),
        (GuidedDecodingParams(regex="a(b"), "guided_regex"),
    ],
)
def test_a_grammar_that_does_not_compile_is_refused_naming_the_field(
    smollm2_llm: LLM, guided: GuidedDecodingParams, named: str
) -> None:
    with pytest.raises(ValueError, match=f"^{named} does not compile"):
        smollm2_llm.generate(
            [PROMPT, PROMPT], [SamplingParams(max_tokens=4), SamplingParams(guided_decoding=guided)]
        )
    assert not smollm2_llm.engine.has_unfinished_requests()
    (out,) = smollm2_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3))
    assert len(out.token_ids) == 3
