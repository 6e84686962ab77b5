"""Async scheduling (step N+1 planned and launched before step N's tokens are read) changes nothing a user
sees: the same tokens, logprobs and finish reasons as the synchronous engine, also under preemption, stop
tokens, seeded sampling, penalties and aborts, and no KV block is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from inflight import LLM, SamplingParams
from inflight.batching import PENDING_TOKEN_ID

from ..conftest import copy_tokenizer
from .conftest import random_prompts
from .test_hf_parity import _block_bytes
from .tiny_models import build_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_path) -> Path:
    path = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("async-llama"))
    copy_tokenizer(smollm2_path, path)
    return path


def _params(stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=40),
        SamplingParams(temperature=0.9, seed=11, max_tokens=33),
        SamplingParams(temperature=0, max_tokens=50, stop_token_ids=[stop_token], logprobs=3),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=3, max_tokens=25, min_tokens=20),
        SamplingParams(
            temperature=0, max_tokens=8, repetition_penalty=1.3
        ),  # reads its history: runs in step
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0.7, seed=9, max_tokens=45, logprobs=1),
        SamplingParams(temperature=0, max_tokens=37, min_tokens=2),
    ]


def _run(
    path: Path, async_scheduling: bool, prompts, params, min_batch: int = 0, **kwargs
) -> tuple[list, LLM, list]:
    llm = LLM(str(path), max_model_len=112, block_size=16, async_scheduling=async_scheduling,
              async_scheduling_min_batch=min_batch, **kwargs)  # fmt: skip
    seen = _record_steps(llm)
    outputs = llm.generate(prompts, params)
    return outputs, llm, seen


def _record_steps(llm: LLM) -> list:
    """Every SchedulerOutput the runner executes from now on, in order."""
    seen = []
    execute = llm.engine.executor.runner.execute

    def recording_execute(out, pending=None, prompt_logprobs=None):
        seen.append(out)
        return execute(out, pending, prompt_logprobs)

    llm.engine.executor.runner.execute = recording_execute
    return seen


def _view(outputs) -> list[tuple]:
    return [(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in outputs]


@pytest.mark.parametrize("tight_kv", [False, True, "swap"])
def test_async_matches_sync(tiny_llama: Path, tight_kv: bool | str) -> None:
    prompts = random_prompts(5, [7, 30, 16, 50, 3, 21, 64, 12])
    # The greedy run tells which token request 2 emits 6th: stopping on it ends that request early.
    probe, _, _ = _run(tiny_llama, False, prompts[2:3], [SamplingParams(temperature=0, max_tokens=6)])
    params = _params(stop_token=probe[0].token_ids[5])
    kwargs = {}
    if tight_kv:  # 8 usable blocks of 16: one max_model_len request; the batch needs far more
        block = _block_bytes(tiny_llama)
        kwargs = {"kv_cache_memory_bytes": 9 * block, "max_num_batched_tokens": 40}
        if tight_kv == "swap":  # preempted requests swapped out to host blocks, some while a token is pending
            kwargs["swap_space_bytes"] = 24 * block
    sync, sync_llm, _ = _run(tiny_llama, False, prompts, params, **kwargs)
    ahead, llm, seen = _run(tiny_llama, True, prompts, params, **kwargs)
    assert _view(ahead) == _view(sync)
    assert ahead[2].finish_reason == "stop" and len(ahead[2].token_ids) == 6
    assert [len(o.token_ids) for o in ahead] == [len(o.token_ids) for o in sync]
    # It really ran ahead: decodes whose input token was still being sampled.
    assert sum(e.last_token_pending for out in seen for e in out.scheduled) > 50
    assert all(
        e.token_ids[-1] == PENDING_TOKEN_ID for out in seen for e in out.scheduled if e.last_token_pending
    )
    if tight_kv:
        assert llm.engine.scheduler.num_preemptions_total > 0
        assert sync_llm.engine.scheduler.num_preemptions_total > 0
    if tight_kv == "swap":
        assert llm.engine.scheduler.num_swapped_out_total > 0
        assert sync_llm.engine.scheduler.num_swapped_out_total > 0
    for engine in (llm.engine, sync_llm.engine):
        assert not engine.has_unfinished_requests()
        assert engine.scheduler.kv_cache_manager.num_used_blocks == 0


def _serve(engine, prompts, params, arrive_at: list[int], monkeypatch):
    """The serving loop's order: wait for a small step (handling what it returns), take in the requests due,
    step. Returns each request's tokens and finish reason, (in-flight step size, waited) before each
    iteration, and how many first tokens the waits returned."""
    from inflight.backend.executor.executor import StepHandle

    waits_on_device = []
    wait = StepHandle.wait
    monkeypatch.setattr(StepHandle, "wait", lambda self: (waits_on_device.append(1), wait(self)))
    tokens: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    waits, early_firsts = [], 0

    def take(outputs) -> None:
        for out in outputs:
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                assert out.request_id not in finish  # exactly one final each
                finish[out.request_id] = out.finish_reason

    for iteration in range(400):
        inflight, before = engine._overlap.in_flight, len(waits_on_device)
        early = engine.wait_for_small_step()
        early_firsts += sum(1 for out in early if out.new_token_ids and not tokens[out.request_id])
        take(early)
        waits.append((len(inflight.scheduled.scheduled) if inflight else 0, len(waits_on_device) > before))
        for i, due in enumerate(arrive_at):
            if due == iteration:
                engine.add_request(f"r{i}", prompts[i], params[i])
                tokens[f"r{i}"] = []
        take(engine.step())
        if iteration > max(arrive_at) and not engine.has_unfinished_requests():
            return tokens, finish, waits, early_firsts
    raise AssertionError("the requests did not finish")


def test_small_steps_are_waited_for_before_new_requests_and_outputs_match_sync(
    tiny_llama: Path, monkeypatch
) -> None:
    """A step of fewer than async_scheduling_min_batch requests is waited for before new requests come in,
    and still runs ahead of its outputs (its tokens pending in the next step), unless it ended a prompt:
    then the wait returns its outputs, first tokens included. Bigger steps are not waited for. Requests
    arriving mid-run get the synchronous engine's tokens, text and finish reasons."""
    prompts = random_prompts(6, [7, 30, 16, 50, 3, 21, 64, 12])
    probe, _, _ = _run(tiny_llama, False, prompts[2:3], [SamplingParams(temperature=0, max_tokens=9)])
    params = _params(stop_token=probe[0].token_ids[8])
    arrive_at = [0, 0, 3, 5, 5, 9, 12, 30]
    kwargs = {"max_model_len": 112, "block_size": 16}
    sync_llm = LLM(str(tiny_llama), async_scheduling=False, **kwargs)
    llm = LLM(str(tiny_llama), async_scheduling=True, async_scheduling_min_batch=5, **kwargs)
    seen = _record_steps(llm)
    sync_tokens, sync_finish, sync_waits, sync_early = _serve(sync_llm.engine, prompts, params, arrive_at,
                                                              monkeypatch)  # fmt: skip
    tokens, finish, waits, early_firsts = _serve(llm.engine, prompts, params, arrive_at, monkeypatch)
    assert tokens == sync_tokens and finish == sync_finish
    assert finish["r2"] == "stop" and len(tokens["r2"]) == 9
    assert not any(waited for _, waited in sync_waits) and sync_early == 0  # nothing is ever in flight
    # The late arrivals (r5: alone with r3, r6 and r7: few running) had their first token from a wait.
    assert early_firsts >= 2, early_firsts
    # Waited for exactly when a step of 1..4 requests was in flight; both kinds happened.
    assert all(waited == (0 < size < 5) for size, waited in waits)
    assert any(waited for _, waited in waits) and any(size >= 5 for size, _ in waits)
    # Small steps ran ahead too: a step of fewer than 5 requests followed by decodes of pending tokens.
    pending_after = [any(e.last_token_pending for e in out.scheduled) for out in seen[1:]]
    sizes = [len(out.scheduled) for out in seen[:-1]]
    assert any(pending and size < 5 for size, pending in zip(sizes, pending_after, strict=True))
    for engine in (llm.engine, sync_llm.engine):
        assert engine.scheduler.kv_cache_manager.num_used_blocks == 0 and not engine.scheduler.requests


def test_abort_while_a_step_is_in_flight_frees_everything(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), max_model_len=112, block_size=16, async_scheduling_min_batch=0)
    engine = llm.engine
    prompts = random_prompts(6, [9, 40, 17])
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=60))
    finals: dict[str, int] = {}
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    for step in range(200):
        if step == 4:
            assert engine._overlap.in_flight is not None  # a step is in flight when the abort comes
            assert engine.abort("r1")
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                finals[out.request_id] = finals.get(out.request_id, 0) + 1
                assert out.finish_reason == ("abort" if out.request_id == "r1" else "length")
        if not engine.has_unfinished_requests():
            break
    assert finals == {"r0": 1, "r1": 1, "r2": 1}
    assert len(tokens["r0"]) == len(tokens["r2"]) == 60 and len(tokens["r1"]) < 60
    assert engine.scheduler.kv_cache_manager.num_used_blocks == 0 and not engine.scheduler.requests
    # The survivors are unaffected by the abort.
    alone = llm.generate([prompts[0], prompts[2]], SamplingParams(temperature=0, max_tokens=60))
    assert [o.token_ids for o in alone] == [tokens["r0"], tokens["r2"]]
