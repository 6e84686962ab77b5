"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``) against HF transformers in fp32.

For every prompt position i >= 1, the entry must be HF's ``log_softmax(model(prompt).logits)[i - 1]``: the
prompt token's own value and the top-k ids and values, within 1e-4. Also in chunks, beside requests that
do not ask, twice in a row (where a prefix-cache hit would skip positions), and under preemption.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inflight import LLM, SamplingParams
from inflight.backend.engine.outputs import TokenLogprob
from inflight.backend.engine.prompt_logprobs import PromptLogprobsState
from inflight.backend.engine.sampling_params import MAX_LOGPROBS
from inflight.backend.executor.prompt_logprobs import PromptLogprobs

from ..conftest import copy_tokenizer
from .conftest import random_prompts
from .test_hf_parity import _block_bytes
from .tiny_models import build_tiny_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path) -> tuple[Path, object]:
    from transformers import AutoModelForCausalLM

    path = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("prompt-logprobs"))
    copy_tokenizer(smollm2_path, path)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab]: row p is the distribution of the token after position p."""
    return model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)


def assert_matches_hf(entries: list[TokenLogprob | None] | None, prompt: list[int], expected: torch.Tensor,
                      k: int) -> None:  # fmt: skip
    assert entries is not None and len(entries) == len(prompt)
    assert entries[0] is None
    for i in range(1, len(prompt)):
        entry, row = entries[i], expected[i - 1]
        assert entry is not None and entry.token_id == prompt[i], f"position {i}"
        assert entry.logprob == pytest.approx(row[prompt[i]].item(), abs=TOL), f"position {i}"
        assert len(entry.top) == k
        values, ids = row.topk(k)
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=TOL), f"position {i}"
        assert [t for t, _ in entry.top] == ids.tolist(), f"position {i}"


def test_single_prompt_matches_hf(tiny) -> None:
    path, hf = tiny
    (prompt,) = random_prompts(11, [37])
    llm = LLM(str(path), max_model_len=128)
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=5))
    assert_matches_hf(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt), 5)
    assert out.logprobs is None  # the sampled tokens' logprobs were not asked


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_mixed_batch_in_chunks_matches_hf(tiny, async_scheduling: bool) -> None:
    """Chunked prefill (16 tokens a step, prompts up to 53): each chunk gives its positions, the last
    chunk's last row is the sampled one; requests without prompt_logprobs get None and the same tokens."""
    path, hf = tiny
    prompts = random_prompts(12, [53, 9, 40, 1, 17, 30])
    ks = [3, None, 0, 2, None, MAX_LOGPROBS]
    llm = LLM(str(path), max_model_len=128, max_num_batched_tokens=16, async_scheduling=async_scheduling)
    params = [SamplingParams(max_tokens=4, temperature=0, logprobs=1, prompt_logprobs=k) for k in ks]
    outputs = llm.generate(prompts, params)
    plain = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, logprobs=1))
    for out, base, prompt, k in zip(outputs, plain, prompts, ks, strict=True):
        if k is None:
            assert out.prompt_logprobs is None
        else:
            assert_matches_hf(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt), k)
        assert out.token_ids == base.token_ids  # the sampled tokens and their logprobs are untouched
        assert [lp.logprob for lp in out.logprobs] == pytest.approx(
            [lp.logprob for lp in base.logprobs], abs=TOL
        )


def test_second_identical_prompt_skips_the_prefix_cache(tiny) -> None:
    path, hf = tiny
    (prompt,) = random_prompts(13, [50])
    llm = LLM(str(path), max_model_len=128, block_size=16)
    stats = llm.engine.scheduler.kv_cache_manager.stats
    llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0))
    hits = stats.num_hit_tokens
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))
    assert stats.num_hit_tokens == hits  # no hit taken: every position computed
    expected = hf_logprobs(hf, prompt)
    assert_matches_hf(out.prompt_logprobs, prompt, expected, 1)
    (again,) = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))
    assert again.prompt_logprobs == out.prompt_logprobs
    # Its blocks are still cached for the others: a request without prompt_logprobs hits them.
    llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0))
    assert stats.num_hit_tokens - hits == 48


def test_preempted_and_recomputed_matches_hf(tiny) -> None:
    path, hf = tiny
    prompts = random_prompts(14, [75, 40, 57, 31, 9, 64])
    # 8 usable blocks of 16: one request of max_model_len; the batch needs far more (see test_hf_parity).
    llm = LLM(str(path), max_model_len=112, block_size=16, kv_cache_memory_bytes=9 * _block_bytes(path),
              max_num_batched_tokens=24)  # fmt: skip
    engine, scheduler = llm.engine, llm.engine.scheduler
    preempt, mid_prompt = scheduler._preempt, []

    def recording_preempt(request):
        state = engine._requests.get(request.request_id)
        mid_prompt.append(state is not None and not state.prompt_logprobs.complete)
        return preempt(request)

    scheduler._preempt = recording_preempt
    outputs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, prompt_logprobs=2))
    assert any(mid_prompt), "no request was preempted before its prompt logprobs were all in"
    for out, prompt in zip(outputs, prompts, strict=True):
        assert_matches_hf(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt), 2)


def test_state_skips_positions_it_holds() -> None:
    """A prompt computed again (a preempted request recomputed) gives positions already held: the state
    keeps each once, and hands the whole list out once, when complete."""
    prompt = [5, 6, 7, 8, 9]

    def part(start: int, count: int) -> PromptLogprobs:
        positions = range(start, start + count)
        return PromptLogprobs("r", start, [-float(p) for p in positions], [[p, 1] for p in positions],
                              [[-0.5, -1.5] for _ in positions])  # fmt: skip

    state = PromptLogprobsState(prompt, 1)
    state.add(part(0, 2))
    assert state.take() is None  # not complete yet
    state.add(part(0, 3))  # recomputed from the start: positions 0, 1 held, 2 new
    state.add(part(3, 1))
    entries = state.take()
    assert entries == [None] + [TokenLogprob(prompt[p + 1], -float(p), ((p, -0.5),)) for p in range(4)]
    assert state.take() is None  # once
    with pytest.raises(AssertionError):
        PromptLogprobsState(prompt, 0).add(part(2, 1))  # a gap: positions 0 and 1 never came


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got -1"),
        (MAX_LOGPROBS + 1, f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {MAX_LOGPROBS + 1}"),
        (1.5, "prompt_logprobs must be an integer, got float 1.5"),
        ("3", "prompt_logprobs must be an integer, got str '3'"),
        (True, "prompt_logprobs must be an integer, got bool True"),
    ],
)
def test_invalid_values_name_the_field(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(prompt_logprobs=value)
    assert str(info.value) == message


def test_from_dict_accepts_prompt_logprobs() -> None:
    assert SamplingParams.from_dict({"prompt_logprobs": "4"}).prompt_logprobs == 4
    assert SamplingParams.from_dict({"prompt_logprobs": None}).prompt_logprobs is None
    assert SamplingParams.from_dict(SamplingParams(prompt_logprobs=0).to_dict()).prompt_logprobs == 0
    with pytest.raises(ValueError, match=r"prompt_logprobs must be in \[0, 20\], got 21"):
        SamplingParams.from_dict({"prompt_logprobs": 21})


def test_smollm2_matches_hf(smollm2_path) -> None:
    """The default model, a text prompt: the entries are those of its tokens."""
    from transformers import AutoModelForCausalLM

    llm = LLM(str(smollm2_path), max_model_len=256)
    (out,) = llm.generate(
        "The capital of France is Paris, and the capital of Italy is",
        SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=4),
    )
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    assert_matches_hf(out.prompt_logprobs, out.prompt_token_ids, hf_logprobs(hf, out.prompt_token_ids), 4)
