"""The grammar mask on the logits (executor/guided_mask.py) against llguidance's own numpy reference, and
the guided-decoding inputs: ``GuidedDecodingParams``, the ``guided_*`` keys and Triton inputs, each bad value
refused naming its field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llguidance.numpy import apply_token_bitmask_inplace

from inflight.backend.engine.sampling_params import GuidedDecodingParams, SamplingParams
from inflight.backend.executor.guided_mask import GuidedLogitsMask
from inflight.backend.executor.sampler import Sampler, SamplingBatch
from inflight.backend.serving.triton_inputs import parse_request


@pytest.mark.parametrize("vocab_size", [49152, 70, 33])
def test_mask_equals_llguidance_reference(vocab_size: int) -> None:
    rng = np.random.default_rng(vocab_size)
    num_seqs, rows = 5, [0, 3, 4]
    words = (vocab_size + 31) // 32
    bitmask = rng.integers(-(2**31), 2**31, size=(len(rows), words), dtype=np.int64).astype(np.int32)
    bitmask[1, :] = 0
    bitmask[1, 0] = 1 << 5  # one allowed token: 5
    logits = torch.from_numpy(rng.standard_normal((num_seqs, vocab_size)).astype(np.float32))
    expected = logits.numpy().copy()
    guided = expected[rows]
    apply_token_bitmask_inplace(guided, bitmask)
    expected[rows] = guided

    GuidedLogitsMask.from_host(rows, bitmask, torch.device("cpu")).apply_(logits)
    np.testing.assert_array_equal(logits.numpy(), expected)
    assert np.isfinite(logits[3]).sum() == 1 and torch.isfinite(logits[3, 5])


def test_sampler_picks_only_allowed_tokens() -> None:
    vocab_size = 100
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=0),
    ]
    batch = SamplingBatch.build(params, [[1]] * 3, [[]] * 3, vocab_size, "cpu")
    logits = torch.randn(3, vocab_size)
    logits[:, 7] = 50.0  # the best token everywhere, allowed on no guided row
    bitmask = np.zeros((2, 4), dtype=np.int32)
    bitmask[0, 1] = 1 << 10  # row 0: token 42 only
    bitmask[1, 0] = (1 << 3) | (1 << 9)  # row 2: tokens 3 and 9
    batch.guided = GuidedLogitsMask.from_host([0, 2], bitmask, torch.device("cpu"))
    out = Sampler()(logits.clone(), batch).sampled_token_ids.tolist()
    assert out[0] == 42 and out[1] == 7 and out[2] == int(3 if logits[2, 3] > logits[2, 9] else 9)


def test_all_greedy_batch_without_other_features_still_applies_the_grammar_mask() -> None:
    """Every row greedy with no penalty, ban or bias: the sampler's plain greedy path (the logits read as they
    are) is not taken when a grammar mask is set: the masked argmax wins, not the raw one."""
    vocab_size = 64
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0)]
    batch = SamplingBatch.build(params, [[1]] * 2, [[]] * 2, vocab_size, "cpu")
    logits = torch.zeros(2, vocab_size)
    logits[:, 7] = 50.0  # the raw argmax of both rows
    logits[0, 40], logits[0, 42] = 3.0, 2.0
    bitmask = np.zeros((1, 2), dtype=np.int32)
    bitmask[0, 1] = (1 << 8) | (1 << 10)  # row 0: tokens 40 and 42 only
    batch.guided = GuidedLogitsMask.from_host([0], bitmask, torch.device("cpu"))
    assert Sampler()(logits.clone(), batch).sampled_token_ids.tolist() == [40, 7]


def test_guided_params_from_keys_and_dict() -> None:
    params = SamplingParams.from_dict({"guided_json": '{"type": "object"}', "max_tokens": "8"})
    assert params.guided_decoding == GuidedDecodingParams(json='{"type": "object"}')
    assert params.guided_decoding.field_name == "guided_json"
    assert SamplingParams.from_dict(params.to_dict()) == params
    choice = SamplingParams.from_dict({"guided_choice": ["a", "b"], "guided_json": None})
    assert (
        choice.guided_decoding.choice == ["a", "b"] and choice.guided_decoding.field_name == "guided_choice"
    )
    nested = SamplingParams.from_dict({"guided_decoding": {"regex": "[0-9]+"}})
    assert nested.guided_decoding == GuidedDecodingParams(regex="[0-9]+")


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"guided_json": "{not json"}, "guided_json is not valid JSON"),
        ({"guided_json": "[1, 2]"}, "guided_json must be a JSON schema object"),
        ({"guided_regex": ""}, "guided_regex must be a non-empty string"),
        ({"guided_choice": []}, "guided_choice must be a non-empty list"),
        ({"guided_choice": ["a", ""]}, "guided_choice must be a non-empty list"),
        (
            {"guided_json": "{}", "guided_regex": "a"},
            "exactly one of guided_json, guided_regex or guided_choice",
        ),
        ({"guided_decoding": {"grammar": "x"}}, "guided_decoding takes json, regex or choice"),
        ({"guided_decoding": {"json": "{}"}, "guided_regex": "a"}, "guided_decoding given together"),
    ],
)
def test_bad_guided_values_name_the_field(values: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        SamplingParams.from_dict(values)


def _getter(values: dict):
    def get(name: str):
        value = values.get(name)
        if value is None:
            return None
        if isinstance(value, list):
            return np.array([v.encode() for v in value], dtype=np.object_)
        return np.array([value.encode()], dtype=np.object_)

    return get


def test_triton_guided_inputs() -> None:
    request = parse_request(_getter({"text_input": "hi", "guided_choice": ["yes", "no"]}))
    assert request.params.guided_decoding == GuidedDecodingParams(choice=["yes", "no"])
    request = parse_request(_getter({"text_input": "hi", "guided_regex": "[a-z]+"}))
    assert request.params.guided_decoding == GuidedDecodingParams(regex="[a-z]+")
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
    request = parse_request(
        _getter({"text_input": "hi", "sampling_parameters": f'{{"guided_json": {schema}}}'})
    )
    assert request.params.guided_decoding.json == {"type": "object", "properties": {"a": {"type": "integer"}}}
    with pytest.raises(ValueError, match="guided_json is not valid JSON"):
        parse_request(_getter({"text_input": "hi", "guided_json": "{"}))
