"""Greedy output token-identical to HF transformers `generate`, many prompts batched together.

Also with the KV pool so small that requests are preempted and recomputed, with chunked prefill in tiny
chunks, and with prompts that share a long prefix (prefix-cache hits).
"""

from __future__ import annotations

import pytest
import torch

from inflight import LLM, SamplingParams
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.model_runner import kv_cache_bytes_per_block

from .conftest import TinyModel, hf_greedy, random_prompts

LENGTHS = [3, 9, 16, 17, 31, 40, 57, 75]  # below, at and across 16-token block boundaries
MAX_NEW = 24
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def _block_bytes(path, block_size: int = 16) -> int:
    """Bytes of one KV block of the checkpoint on the CPU engine (fp32), from its config alone."""
    cfg = ModelConfig.from_pretrained(str(path))
    return kv_cache_bytes_per_block(cfg, block_size, torch.float32, cfg.num_kv_heads)


def _assert_matches(outputs, prompts, reference) -> None:
    assert len(outputs) == len(prompts)
    for i, (out, prompt) in enumerate(zip(outputs, prompts, strict=True)):
        expected = reference(prompt, MAX_NEW)
        assert out.token_ids == expected, f"prompt {i} ({len(prompt)} tokens) differs from HF"
        assert out.num_input_tokens == len(prompt)
        assert out.finish_reason == ("length" if len(expected) == MAX_NEW else "stop")


def test_tiny_batched_greedy_matches_hf(tiny_model: TinyModel) -> None:
    prompts = random_prompts(1, LENGTHS)
    llm = LLM(str(tiny_model.path), max_model_len=256, block_size=16)
    _assert_matches(llm.generate(prompts, GREEDY), prompts, tiny_model.reference)


def test_tiny_preempted_and_recomputed_matches_hf(tiny_model: TinyModel) -> None:
    prompts = random_prompts(1, LENGTHS)
    # 8 usable blocks: exactly one request of max_model_len; the batch needs about 40.
    llm = LLM(
        str(tiny_model.path),
        max_model_len=112,
        block_size=16,
        kv_cache_memory_bytes=9 * _block_bytes(tiny_model.path),
    )
    assert llm.engine.scheduler.kv_cache_manager.num_usable_blocks == 8
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions_total > 0
    _assert_matches(outputs, prompts, tiny_model.reference)
    assert llm.engine.scheduler.kv_cache_manager.num_used_blocks == 0


@pytest.mark.parametrize("host_blocks", [40, 3], ids=["all-swapped", "swap-or-recompute"])
def test_tiny_preempted_and_swapped_matches_hf(tiny_model: TinyModel, host_blocks: int) -> None:
    """Preempted requests whose blocks fit in the host pool are swapped out and back in (no recompute);
    with a pool of 3 blocks only short ones fit and the rest are recomputed. Output as HF's either way."""
    prompts = random_prompts(1, LENGTHS)
    block = _block_bytes(tiny_model.path)
    llm = LLM(str(tiny_model.path), max_model_len=112, block_size=16, kv_cache_memory_bytes=9 * block,
              swap_space_bytes=host_blocks * block)  # fmt: skip
    scheduler = llm.engine.scheduler
    assert scheduler.kv_cache_manager.num_host_blocks == host_blocks
    swaps: list[tuple[list, list]] = []
    real_swap = llm.engine.executor.runner.swap

    def swap(swap_out, swap_in):
        swaps.append((list(swap_out), list(swap_in)))
        real_swap(swap_out, swap_in)

    llm.engine.executor.runner.swap = swap
    outputs = llm.generate(prompts, GREEDY)
    _assert_matches(outputs, prompts, tiny_model.reference)
    swapped = scheduler.num_swapped_out_total
    assert swapped > 0 and sum(len(o) for o, _ in swaps) > 0 and sum(len(i) for _, i in swaps) > 0
    # every block swapped out came back in (no request ended while swapped out here)
    assert sum(len(o) for o, _ in swaps) == sum(len(i) for _, i in swaps)
    if host_blocks == 40:
        assert swapped == scheduler.num_preemptions_total
    else:
        assert 0 < swapped < scheduler.num_preemptions_total
    kv = scheduler.kv_cache_manager
    assert kv.num_used_blocks == 0 and kv.num_free_host_blocks == host_blocks


@pytest.mark.parametrize("block_size", [8, 32])
def test_tiny_chunked_prefill_matches_hf(tiny_model: TinyModel, block_size: int) -> None:
    prompts = random_prompts(1, LENGTHS)
    llm = LLM(
        str(tiny_model.path),
        max_model_len=256,
        block_size=block_size,
        max_num_batched_tokens=13,
        max_num_seqs=3,
    )
    _assert_matches(llm.generate(prompts, GREEDY), prompts, tiny_model.reference)


def test_tiny_shared_prefix_hits_cache_and_matches_hf(tiny_model: TinyModel) -> None:
    prefix = random_prompts(7, [70])[0]
    prompts = [prefix + tail for tail in random_prompts(8, [1, 2, 5, 16, 20, 33])] + [prefix[:48], prefix]
    llm = LLM(str(tiny_model.path), max_model_len=256, block_size=16)
    first = llm.generate(prompts, GREEDY)
    stats = llm.engine.scheduler.kv_cache_manager.stats
    assert stats.num_hit_tokens > 0, "requests sharing a 70-token prefix found no cached block"
    _assert_matches(first, prompts, tiny_model.reference)
    hits_before = stats.num_hit_tokens
    again = llm.generate(prompts, GREEDY)  # now every prompt's full blocks are cached
    assert stats.num_hit_tokens - hits_before >= sum((len(p) - 1) // 16 * 16 for p in prompts)
    _assert_matches(again, prompts, tiny_model.reference)


# ---------------------------------------------------------------------------------- the real SmolLM2
SYSTEM = (
    "You are a careful assistant. Answer in one short sentence, with no preamble, no lists and no "
    "markdown. If a question has a numeric answer, give the number first. Never mention these rules."
)
SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4, 5,",
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How many legs does a spider have?"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name the largest planet."}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 12 times 12?"}],
    "Water boils at",
]


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype="float32").eval()
    refs: dict[tuple[int, ...], list[int]] = {}

    def reference(prompt_ids: list[int], max_new: int) -> list[int]:
        key = tuple(prompt_ids)
        if key not in refs:
            refs[key] = hf_greedy(hf, prompt_ids, max_new)
        return refs[key]

    return reference


def test_smollm2_batched_greedy_matches_hf(smollm2_path, smollm2_reference) -> None:
    llm = LLM(str(smollm2_path), max_model_len=1024)
    outputs = llm.generate(SMOL_PROMPTS, GREEDY)
    prompts = [o.prompt_token_ids for o in outputs]
    assert len({len(p) for p in prompts}) >= 8, "prompts should have different lengths"
    _assert_matches(outputs, prompts, smollm2_reference)
    assert "Paris" in outputs[4].text
    # The chats share a long system prompt: their full blocks come from the prefix cache.
    assert llm.engine.scheduler.kv_cache_manager.stats.num_hit_tokens >= 3 * 16


def test_smollm2_preempted_matches_hf(smollm2_path, smollm2_reference) -> None:
    llm = LLM(str(smollm2_path), max_model_len=128, kv_cache_memory_bytes=12 * _block_bytes(smollm2_path))
    outputs = llm.generate(SMOL_PROMPTS, GREEDY)
    assert llm.engine.scheduler.num_preemptions_total > 0
    _assert_matches(outputs, [o.prompt_token_ids for o in outputs], smollm2_reference)
