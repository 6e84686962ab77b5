"""GPU tests: run by `make test-gpu` on a CUDA machine (never collected by `make test`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.exit("tests/gpu needs a CUDA GPU: run `make test-gpu` on a GPU machine", returncode=1)

_REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = Path(os.environ.get("INFLIGHT_TOKENIZER_DIR", _REPO / ".gpu" / "tok"))
LLAMA8B_DIR = Path(os.environ.get("INFLIGHT_LLAMA8B_DIR", "/tmp/inflight-llama31-8b-random"))


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.fail(f"no tokenizer files in {TOKENIZER_DIR} (set INFLIGHT_TOKENIZER_DIR)", pytrace=False)
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def llama8b_path(tokenizer_dir) -> Path:
    from benchmarks.random_models import build_random_model

    return build_random_model("llama3-8b", LLAMA8B_DIR, tokenizer_dir=tokenizer_dir)
