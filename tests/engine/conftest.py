"""HF transformers references for the engine tests."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from ..conftest import copy_tokenizer
from .tiny_models import TINY_CONFIGS, VOCAB, build_tiny_checkpoint


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers `generate`, greedy, for one prompt without padding; the new tokens only."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return out[0, len(prompt_ids) :].tolist()


def random_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


class TinyModel:
    """A tiny checkpoint on disk, its HF model, and memoised HF greedy references."""

    def __init__(self, name: str, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.name, self.path = name, path
        self.hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self._refs: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def reference(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in self._refs:
            self._refs[key] = hf_greedy(self.hf, prompt_ids, max_new_tokens)
        return self._refs[key]


@pytest.fixture(scope="session", params=list(TINY_CONFIGS))
def tiny_model(request, tmp_path_factory, smollm2_path) -> TinyModel:
    path = build_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    copy_tokenizer(smollm2_path, path)
    return TinyModel(request.param, path)
