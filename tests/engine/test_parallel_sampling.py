"""Parallel sampling (``SamplingParams.n``) in the engine: every greedy sequence equals HF's greedy output
through prefix caching on and off, chunked prefill, preemption, swapping and synchronous steps; the prompt is
prefilled once and its full blocks shared (exact block ids); seeded sequence i is the n = 1 request with
seed + i; aborting frees every block; limits are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from inflight import LLM, SamplingParams
from inflight.batching import QueueFullError

from ..conftest import copy_tokenizer
from .conftest import TinyModel, random_prompts
from .test_hf_parity import _block_bytes
from .tiny_models import build_tiny_checkpoint

LENGTHS = [5, 16, 17, 40, 70]  # below one block, exactly one (nothing to share), one + 1, several
GREEDY_N3 = SamplingParams(n=3, temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path) -> TinyModel:
    path = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("n-llama"))
    copy_tokenizer(smollm2_path, path)
    return TinyModel("llama", path)


def _options(path: Path, kind: str) -> dict:
    block = _block_bytes(path)
    return {
        "prefix-cache": {},
        "no-prefix-cache": {"enable_prefix_caching": False},
        "chunked": {"max_num_batched_tokens": 13, "max_num_seqs": 4},
        "sync": {"async_scheduling": False},
        # 8 usable blocks of 16: one max_model_len sequence; 15 sequences need far more
        "preempted": {"kv_cache_memory_bytes": 9 * block},
        "swapped": {"kv_cache_memory_bytes": 9 * block, "swap_space_bytes": 40 * block},
    }[kind]


@pytest.mark.parametrize(
    "kind", ["prefix-cache", "no-prefix-cache", "chunked", "sync", "preempted", "swapped"]
)
def test_every_greedy_sequence_equals_hf(tiny: TinyModel, kind: str) -> None:
    prompts = random_prompts(3, LENGTHS)
    llm = LLM(str(tiny.path), max_model_len=112, block_size=16, **_options(tiny.path, kind))
    outputs = llm.generate(prompts, GREEDY_N3)
    for out, prompt in zip(outputs, prompts, strict=True):
        expected = tiny.reference(prompt, 12)
        assert [o.index for o in out.outputs] == [0, 1, 2] and out.outputs[0] is out
        for seq in out.outputs:  # temperature 0: the n sequences are the same (vLLM's too)
            assert seq.token_ids == expected and seq.prompt_token_ids == prompt
            assert seq.finish_reason in ("stop", "length")
    scheduler = llm.engine.scheduler
    if kind in ("preempted", "swapped"):
        assert scheduler.num_preemptions_total > 0
    if kind == "swapped":
        assert scheduler.num_swapped_out_total > 0
    assert scheduler.kv_cache_manager.num_used_blocks == 0 and not llm.engine.has_unfinished_requests()


class _Plans:
    """A step observer keeping each step's plan (block tables copied: the manager's lists grow)."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[str, int, int, list[int]]]] = []

    def before_forward(self, scheduled) -> None:
        self.steps.append(
            [(s.request_id, s.start_position, s.num_tokens, list(s.block_ids)) for s in scheduled.scheduled]
        )

    def after_step(self, scheduled) -> None:
        pass


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_prompt_prefilled_once_and_its_full_blocks_shared(tiny: TinyModel, caching: bool) -> None:
    llm = LLM(str(tiny.path), max_model_len=112, block_size=16, enable_prefix_caching=caching)
    engine, plans = llm.engine, _Plans()
    engine.add_step_observer(plans)
    prompt = random_prompts(4, [40])[0]  # blocks [0..15] [16..31] full, [32..39] the last token's
    engine.add_request("r", prompt, SamplingParams(n=3, temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()
    # sequence 0 computes the 40 tokens; 1 and 2 take blocks 1, 2 and compute tokens 32..39 only
    assert plans.steps[0] == [("r#0", 0, 40, [1, 2, 3]), ("r#1", 32, 8, [1, 2, 4]), ("r#2", 32, 8, [1, 2, 5])]
    kv = engine.scheduler.kv_cache_manager
    assert [kv.block_pool.blocks[i].ref_cnt for i in (1, 2, 3, 4, 5)] == [3, 3, 1, 1, 1]
    assert kv.num_used_blocks == 5
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert sorted({o.index for o in outputs}) == [0, 1, 2] and {o.request_id for o in outputs} == {"r"}
    assert [o.finished for o in outputs].count(True) == 1 and outputs[-1].finished
    assert sorted(o.index for o in outputs if o.finish_reason is not None) == [0, 1, 2]
    assert kv.num_used_blocks == 0


def test_abort_ends_every_sequence_and_frees_every_block(tiny: TinyModel) -> None:
    llm = LLM(str(tiny.path), max_model_len=112, block_size=16)
    engine = llm.engine
    kv = engine.scheduler.kv_cache_manager
    prompt = random_prompts(5, [40])[0]
    engine.add_request("r", prompt, SamplingParams(n=3, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert kv.num_used_blocks == 2 + 3  # the two shared blocks and each sequence's own third block
    assert engine.abort("r") and not engine.abort("r")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    aborted = [o for o in outputs if o.finish_reason == "abort"]
    assert sorted(o.index for o in aborted) == [0, 1, 2]
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == kv.num_usable_blocks
    assert engine.num_requests == 0


def test_seeded_sequence_i_is_the_single_request_with_seed_plus_i(tiny: TinyModel) -> None:
    llm = LLM(str(tiny.path), max_model_len=112, block_size=16)
    prompt = random_prompts(6, [37])[0]
    sampled = dict(temperature=1.0, max_tokens=8, ignore_eos=True)
    (out,) = llm.generate([prompt], SamplingParams(n=3, seed=1234, **sampled))
    singles = [
        llm.generate([prompt], SamplingParams(seed=1234 + i, **sampled))[0].token_ids for i in range(3)
    ]
    assert [o.token_ids for o in out.outputs] == singles
    assert len({tuple(t) for t in singles}) == 3, "the sequences of one prompt sampled the same tokens"
    (again,) = llm.generate([prompt], SamplingParams(n=3, seed=1234, **sampled))
    assert [o.token_ids for o in again.outputs] == singles


def test_prompt_logprobs_come_with_sequence_0(tiny: TinyModel) -> None:
    llm = LLM(str(tiny.path), max_model_len=112, block_size=16)
    prompt = random_prompts(7, [35])[0]
    (one,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2))
    (out,) = llm.generate([prompt], SamplingParams(n=2, temperature=0, max_tokens=3, prompt_logprobs=2))
    assert out.outputs[0].prompt_logprobs == one.prompt_logprobs and out.outputs[1].prompt_logprobs is None
    assert out.outputs[1].token_ids == one.token_ids


def test_limits_are_named(tiny: TinyModel) -> None:
    llm = LLM(str(tiny.path), max_model_len=112, block_size=16, max_num_seqs=4, max_queue_size=8)
    with pytest.raises(
        ValueError, match=r"^n must be in \[1, 4\] \(max_num_seqs and max_queue_size\), got 5$"
    ):
        llm.generate([[5, 6, 7]], SamplingParams(n=5))
    with pytest.raises(ValueError, match=r"^n must be at least 1, got 0$"):
        SamplingParams(n=0)
    with pytest.raises(
        ValueError, match=r"^logit_bias token id 49152 is outside the vocabulary \[0, 49152\)$"
    ):
        llm.generate([[5, 6, 7]], SamplingParams(logit_bias={49152: 1.0}))
    engine = llm.engine
    for i in range(3):  # 6 sequences waiting: 3 more do not fit max_queue_size 8, and none is queued
        engine.add_request(f"q{i}", [5, 6, 7], SamplingParams(n=2 if i < 3 else 1, max_tokens=2))
    with pytest.raises(QueueFullError, match="no room for n=3 sequences"):
        engine.add_request("late", [5, 6, 7], SamplingParams(n=3))
    assert engine.num_waiting == 6
    with pytest.raises(ValueError, match="'q0' is already in use"):
        engine.add_request("q0", [5, 6, 7], SamplingParams(n=2))
    for i in range(3):
        engine.abort(f"q{i}")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.kv_cache_manager.num_used_blocks == 0
