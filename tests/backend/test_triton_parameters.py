"""config.pbtxt parameters -> EngineArgs: every shipped parameter parses; bad ones are named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from inflight.backend.serving.triton_model import engine_args_from_parameters

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "model_repository" / "llm" / "config.pbtxt"


def _shipped_parameters() -> dict[str, dict[str, str]]:
    pairs = re.findall(r'key:\s*"([^"]+)",\s*value:\s*\{\s*string_value:\s*"([^"]*)"', CONFIG.read_text())
    return {key: {"string_value": value} for key, value in pairs}


def test_the_shipped_config_parses() -> None:
    params = _shipped_parameters()
    assert {"model_path", "max_model_len", "kv_cache_memory_bytes", "drain_timeout_s"} <= set(params)
    args = engine_args_from_parameters(params, cwd=str(REPO))
    assert args.model == str(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    assert args.block_size == 16 and args.max_queue_size == 1024 and args.enable_prefix_caching is True
    assert args.max_model_len is None and args.kv_cache_memory_bytes is None  # empty = default


def test_the_shipped_config_lists_every_engine_option() -> None:
    """A user sets every engine option in config.pbtxt: none may be missing from the shipped file."""
    from inflight.backend.engine.args import EngineArgs

    # `model` and `tokenizer` come from model_path and tokenizer_path.
    options = set(EngineArgs.__dataclass_fields__) - {"model", "tokenizer"}
    assert options - set(_shipped_parameters()) == set()


def test_values_are_converted_by_type() -> None:
    params = {
        **_shipped_parameters(),
        "max_model_len": {"string_value": "2048"},
        "kv_cache_memory_fraction": {"string_value": "0.5"},
        "enable_chunked_prefill": {"string_value": "no"},
        "quantization": {"string_value": "fp8"},
        "kv_cache_dtype": {"string_value": "fp8"},
    }
    args = engine_args_from_parameters(params, cwd=str(REPO))
    assert args.max_model_len == 2048 and args.kv_cache_memory_fraction == 0.5
    assert args.enable_chunked_prefill is False
    assert args.quantization == "fp8" and args.kv_cache_dtype == "fp8"
    shipped = engine_args_from_parameters(_shipped_parameters(), cwd=str(REPO))
    assert shipped.quantization is None and shipped.kv_cache_dtype == "auto"  # full precision unless asked


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("max_num_seqs", "many", "max_num_seqs"),
        ("enable_prefix_caching", "maybe", "enable_prefix_caching"),
        ("kv_cache_memory_fraction", "1.5", "kv_cache_memory_fraction"),
        ("max_num_seq", "8", "unknown config parameter 'max_num_seq'"),
        ("quantization", "awq", "quantization 'awq' is not supported; supported: fp8"),
        ("kv_cache_dtype", "int8", "kv_cache_dtype must be one of auto, fp8, got 'int8'"),
        ("load_format", "safetensors", "load_format must be one of auto, dummy, got 'safetensors'"),
        ("model_path", "", "model_path is required"),
    ],
)
def test_bad_parameters_are_named(key: str, value: str, named: str) -> None:
    params = {**_shipped_parameters(), key: {"string_value": value}}
    with pytest.raises(ValueError, match=re.escape(named)):
        engine_args_from_parameters(params, cwd=str(REPO))
