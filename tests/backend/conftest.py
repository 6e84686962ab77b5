"""Fixtures of the detokenizer tests: the trained byte-fallback tokenizer, and `tokenizer`, which runs a test
with it and with the real SmolLM2 tokenizer (byte-level BPE)."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from tests.backend.detokenizer_support import make_byte_fallback_tokenizer


@pytest.fixture(scope="module")
def byte_fallback_tokenizer() -> PreTrainedTokenizerBase:
    return make_byte_fallback_tokenizer()


@pytest.fixture(params=["smollm2", "byte_fallback"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    name = "smollm2_tokenizer" if request.param == "smollm2" else "byte_fallback_tokenizer"
    return request.getfixturevalue(name)
