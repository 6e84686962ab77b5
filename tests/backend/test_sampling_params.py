"""SamplingParams: validation messages name the field and its limit; JSON dicts convert."""

import math

import pytest

from inflight.backend.engine.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm() -> None:
    params = SamplingParams()
    assert params.max_tokens == 16
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (1.0, 0, 1.0, 0.0)
    assert params.stop == [] and params.stop_token_ids == [] and params.bad_words == []
    assert params.seed is None and params.logprobs is None
    assert params.skip_special_tokens and not params.ignore_eos and not params.include_stop_str_in_output
    assert not params.is_greedy


def test_is_greedy_below_1e_5() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=9e-6).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": -3}, "max_tokens must be at least 1, got -3"),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ({"min_tokens": -1}, "min_tokens must be at least 0, got -1"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens must be at most max_tokens (10), got 20"),
        ({"temperature": -0.1}, "temperature must be a finite number >= 0, got -0.1"),
        ({"temperature": math.nan}, "temperature must be a finite number >= 0, got nan"),
        ({"temperature": math.inf}, "temperature must be a finite number >= 0, got inf"),
        ({"top_k": -2}, "top_k must be -1 or 0 (off) or at least 1, got -2"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": math.nan}, "top_p must be a finite number in (0, 1], got nan"),
        ({"min_p": 1.01}, "min_p must be in [0, 1], got 1.01"),
        ({"min_p": -0.5}, "min_p must be in [0, 1], got -0.5"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0, got 0.0"),
        ({"repetition_penalty": -math.inf}, "repetition_penalty must be a finite number > 0, got -inf"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3.0"),
        ({"seed": -1}, "seed must be in [0, 2**63 - 1], got -1"),
        ({"seed": 2**63}, f"seed must be in [0, 2**63 - 1], got {2**63}"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs must be in [0, 20], got 21"),
        ({"logprobs": -1}, "logprobs must be in [0, 20], got -1"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids must hold token ids >= 0, got -1"),
        ({"stop": ["ok", ""]}, "stop must hold non-empty strings, got str ''"),
        ({"stop": [1]}, "stop must hold non-empty strings, got int 1"),
        ({"bad_words": 3}, "bad_words must be a string or a list of strings, got int 3"),
    ],
)
def test_invalid_values_name_the_field_and_limit(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", True),  # bool is not an int
        ("max_tokens", 12.5),  # non-integral
        ("max_tokens", "12"),  # strings only through from_dict
        ("top_k", math.nan),
        ("seed", 1.5),
        ("logprobs", False),
        ("min_tokens", None),
        ("temperature", True),
        ("temperature", "0.5"),
        ("top_p", None),
        ("ignore_eos", 1),
        ("skip_special_tokens", "true"),
        ("include_stop_str_in_output", None),
        ("stop_token_ids", [1.5]),
        ("stop_token_ids", "12"),
    ],
)
def test_wrong_types_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_integral_floats_and_single_values_are_normalized() -> None:
    params = SamplingParams(max_tokens=12.0, top_k=5.0, temperature=1, stop="###", stop_token_ids=7)
    assert params.max_tokens == 12 and isinstance(params.max_tokens, int)
    assert params.top_k == 5 and isinstance(params.top_k, int)
    assert params.temperature == 1.0 and isinstance(params.temperature, float)
    assert params.stop == ["###"] and params.stop_token_ids == [7]
    assert SamplingParams(bad_words="darn").bad_words == ["darn"]


def test_boundaries_accepted() -> None:
    """Each limit itself is allowed and kept as given."""
    no_cap = SamplingParams(max_tokens=None, min_tokens=100)  # no cap: any min_tokens
    assert (no_cap.max_tokens, no_cap.min_tokens) == (None, 100)
    low = SamplingParams(max_tokens=5, min_tokens=5, top_k=-1, top_p=1.0, min_p=1.0, seed=0, logprobs=0)
    assert (low.max_tokens, low.min_tokens, low.top_k, low.top_p, low.min_p) == (5, 5, -1, 1.0, 1.0)
    assert (low.seed, low.logprobs) == (0, 0)
    high = SamplingParams(seed=2**63 - 1, logprobs=MAX_LOGPROBS, presence_penalty=-2, frequency_penalty=2)
    assert (high.seed, high.logprobs, high.presence_penalty, high.frequency_penalty) == (
        2**63 - 1,
        MAX_LOGPROBS,
        -2.0,
        2.0,
    )
    assert MAX_LOGPROBS == 20  # OpenAI's top_logprobs limit


def test_from_dict_converts_json_strings() -> None:
    params = SamplingParams.from_dict(
        {
            "max_tokens": "12",
            "temperature": "0.5",
            "top_k": " 40 ",
            "top_p": "0.9",
            "seed": "7",
            "ignore_eos": "true",
            "skip_special_tokens": "False",
            "stop": ["\n\n", "###"],
            "stop_token_ids": ["2", 3],
            "logprobs": "2.0",
        }
    )
    assert params.max_tokens == 12 and params.temperature == 0.5 and params.top_k == 40
    assert params.top_p == 0.9 and params.seed == 7 and params.logprobs == 2
    assert params.ignore_eos is True and params.skip_special_tokens is False
    assert params.stop == ["\n\n", "###"] and params.stop_token_ids == [2, 3]


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"max_tokens": "twelve"}, "max_tokens"),
        ({"max_tokens": "12.5"}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": "nan"}, "temperature"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"top_p": "1.5"}, "top_p"),
        ({"stop_token_ids": ["x"]}, "stop_token_ids"),
    ],
)
def test_from_dict_bad_strings_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} must"):
        SamplingParams.from_dict(values)


def test_from_dict_unknown_key() -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams.from_dict({"temperature": 0.5, "foo": 1})
    message = str(info.value)
    assert message.startswith("unknown sampling parameter 'foo'; known: ")
    assert "temperature" in message and "max_tokens" in message


def test_from_dict_tensorrt_llm_aliases() -> None:
    params = SamplingParams.from_dict(
        {
            "min_length": "3",
            "random_seed": 11,
            "stop_words": "END",
            "runtime_top_k": "5",
            "runtime_top_p": 0.7,
            "beam_width": 1,
            "n": "1",
        }
    )
    assert (params.min_tokens, params.seed, params.stop, params.top_k, params.top_p) == (
        3,
        11,
        ["END"],
        5,
        0.7,
    )


def test_from_dict_rejects_beam_search() -> None:
    with pytest.raises(ValueError, match="^beam_width must be 1: beam search is not supported"):
        SamplingParams.from_dict({"beam_width": 2})


def test_n_is_a_field_of_at_least_one() -> None:
    assert SamplingParams().n == 1
    assert SamplingParams.from_dict({"n": "3"}).n == 3
    for bad in (0, -2):
        with pytest.raises(ValueError) as info:
            SamplingParams(n=bad)
        assert str(info.value) == f"n must be at least 1, got {bad}"
    with pytest.raises(ValueError, match="^n must be an integer, got float 1.5"):
        SamplingParams.from_dict({"n": 1.5})


def test_logit_bias_keys_from_json_strings_and_limits() -> None:
    params = SamplingParams.from_dict({"logit_bias": {"7": 100, "12": "-100", "3": 0.5}})
    assert params.logit_bias == {7: 100.0, 12: -100.0, 3: 0.5}
    assert SamplingParams(logit_bias={}).logit_bias is None  # empty: no bias
    assert SamplingParams.from_dict(params.to_dict()) == params


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        ({"7": 100.5}, "logit_bias values must be in [-100, 100], got 100.5 for token 7"),
        ({5: -101}, "logit_bias values must be in [-100, 100], got -101 for token 5"),
        ({"-1": 1}, "logit_bias keys must be token ids (integers >= 0), got '-1'"),
        ({"x": 1}, "logit_bias must be an integer, got str 'x'"),
        ({"7": "big"}, "logit_bias must be a number, got str 'big'"),
        ({"7": math.nan}, "logit_bias values must be numbers in [-100, 100], got nan for token 7"),
        ([1, 2], "logit_bias must be an object of token id -> bias, got list [1, 2]"),
    ],
)
def test_bad_logit_bias_names_the_field_and_limit(bias: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(logit_bias=bias)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_from_dict_alias_and_name_together_rejected() -> None:
    with pytest.raises(ValueError, match="'top_k' given twice"):
        SamplingParams.from_dict({"top_k": 3, "runtime_top_k": 4})


def test_from_dict_null_means_default_except_for_optional_fields() -> None:
    params = SamplingParams.from_dict({"temperature": None, "max_tokens": None, "seed": None})
    assert params.temperature == 1.0 and params.max_tokens is None and params.seed is None


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(ValueError, match="must be a mapping"):
        SamplingParams.from_dict([("temperature", 1.0)])  # type: ignore[arg-type]


def test_to_dict_round_trip() -> None:
    params = SamplingParams(max_tokens=7, temperature=0.3, stop=["x"], seed=5, logprobs=3, bad_words=["no"])
    assert SamplingParams.from_dict(params.to_dict()) == params
