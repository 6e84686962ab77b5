"""The offline API on the real SmolLM2: prompt forms, sampling, stops, logprobs, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from inflight import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM(str(smollm2_path), max_model_len=512, max_queue_size=64)


def test_text_chat_and_token_prompts_agree(llm: LLM) -> None:
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = llm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    by_chat, by_ids = llm.generate([chat, ids], GREEDY)
    assert by_chat.prompt_token_ids == ids
    assert by_chat.token_ids == by_ids.token_ids
    assert "Paris" in by_chat.text
    assert by_chat.finish_reason == "stop" and by_chat.stop_reason == 2  # <|im_end|>, the checkpoint's EOS
    # The streamed text is the decode of the tokens, without the special EOS token.
    assert by_chat.text == llm.tokenizer.decode(by_chat.token_ids, skip_special_tokens=True)


def test_single_prompt_forms(llm: LLM) -> None:
    (a,) = llm.generate("The capital of France is", GREEDY)
    (b,) = llm.generate(llm.tokenizer.encode("The capital of France is"), GREEDY)
    assert a.token_ids == b.token_ids and a.num_input_tokens == b.num_input_tokens


def _generate_counting_queued(llm: LLM, prompts, params) -> tuple[list, list[int]]:
    """``llm.generate``, and the number of requests the engine held at each step's start."""
    engine, queued_at_step = llm.engine, []
    real_step = engine.step

    def step(*args, **kwargs):
        queued_at_step.append(len(engine._requests))
        return real_step(*args, **kwargs)

    engine.step = step
    try:
        return llm.generate(prompts, params), queued_at_step
    finally:
        engine.step = real_step


@pytest.mark.parametrize(
    "max_queue_size,first,most",
    [(3, 2, 2 + 2), (1, 1, 2 + 1)],  # most: running + waiting (max_num_seqs, or the smaller queue)
    ids=["step-intake", "queue-bound"],
)
def test_generate_queues_prompts_as_steps_take_them(smollm2_path, max_queue_size, first, most) -> None:
    """Before the first step generate queues only what that step can take (the rest while steps run, so the
    device does not wait for 1,000 adds), then a step's intake ahead (max_num_seqs waiting), never more than
    max_queue_size: more prompts than the waiting queue holds all complete, in order, with the tokens each
    gets alone."""
    llm = LLM(str(smollm2_path), max_model_len=256, max_num_seqs=2, max_num_batched_tokens=64,
              max_queue_size=max_queue_size)  # fmt: skip
    prompts = [llm.tokenizer.encode(f"Count to {n}: one, two,") for n in range(3, 10)]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    outs, queued_at_step = _generate_counting_queued(llm, prompts, params)
    assert [o.token_ids for o in outs] == alone
    assert [o.prompt_token_ids for o in outs] == prompts
    assert queued_at_step[0] == first and max(queued_at_step) == most
    engine = llm.engine
    assert engine.scheduler.kv_cache_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_max_tokens_min_tokens_ignore_eos(llm: LLM) -> None:
    chat = [{"role": "user", "content": "Say hi."}]
    (short,) = llm.generate(chat, SamplingParams(max_tokens=3, temperature=0))
    assert short.num_output_tokens == 3 and short.finish_reason == "length"
    (natural,) = llm.generate(chat, SamplingParams(max_tokens=64, temperature=0))
    assert natural.finish_reason == "stop" and natural.token_ids[-1] == 2
    n = natural.num_output_tokens
    (longer,) = llm.generate(chat, SamplingParams(max_tokens=64, min_tokens=n + 3, temperature=0))
    assert longer.num_output_tokens >= n + 3 and 2 not in longer.token_ids[: n + 3]
    (ignored,) = llm.generate(chat, SamplingParams(max_tokens=n + 5, ignore_eos=True, temperature=0))
    assert ignored.num_output_tokens == n + 5 and ignored.finish_reason == "length"
    assert ignored.token_ids[: n - 1] == natural.token_ids[: n - 1]


def test_stop_strings_and_stop_token_ids(llm: LLM) -> None:
    (full,) = llm.generate("Once upon a time", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    words = full.text.split()
    assert len(words) > 6
    stop = words[4][:3]  # probably spans a token boundary or sits inside one
    cut = full.text.index(stop)
    (stopped,) = llm.generate("Once upon a time", SamplingParams(max_tokens=40, temperature=0, stop=[stop]))
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == full.text[:cut]
    (kept,) = llm.generate(
        "Once upon a time",
        SamplingParams(max_tokens=40, temperature=0, stop=[stop], include_stop_str_in_output=True),
    )
    assert kept.text == full.text[: cut + len(stop)]
    stop_id = full.token_ids[5]
    (by_id,) = llm.generate(
        "Once upon a time", SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[stop_id])
    )
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id


def test_seeded_sampling_reproducible_alone_and_batched(llm: LLM) -> None:
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    prompt = "Write a sentence about the sea:"
    (alone,) = llm.generate(prompt, params)
    others = ["Tell me a joke.", "List three colours:", "Why is the sky blue?", prompt]
    batch = llm.generate(
        others + [prompt],
        [SamplingParams(max_tokens=30, temperature=0.8, seed=s) for s in range(4)] + [params],
    )
    assert batch[-1].token_ids == alone.token_ids
    (other_seed,) = llm.generate(
        prompt, SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, top_k=50, seed=99)
    )
    assert other_seed.token_ids != alone.token_ids


def test_logprobs_match_the_model_distribution(llm: LLM, smollm2_path) -> None:
    from transformers import AutoModelForCausalLM

    (out,) = llm.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0, logprobs=3))
    assert out.logprobs is not None and len(out.logprobs) == 4
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([out.prompt_token_ids + out.token_ids])).logits[0].float()
    expected = torch.log_softmax(logits[len(out.prompt_token_ids) - 1 : -1], dim=-1)
    for step, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[step]
        assert lp.logprob == pytest.approx(expected[step, lp.token_id].item(), abs=1e-3)
        assert [t for t, _ in lp.top] == expected[step].topk(
            3
        ).indices.tolist()  # greedy: the top-1 is sampled
    assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs), abs=1e-4)
    assert all(math.isfinite(lp.logprob) and lp.logprob <= 0 for lp in out.logprobs)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: SamplingParams(max_tokens=-1), "max_tokens"),
        (lambda: SamplingParams(top_p=0.0), "top_p"),
        (lambda: SamplingParams(top_p=1.5), "top_p"),
        (lambda: SamplingParams(temperature=float("nan")), "temperature"),
        (lambda: SamplingParams.from_dict({"max_tokens": 4, "bogus": 1}), "bogus"),
    ],
)
def test_bad_sampling_params_name_the_field(make, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make()


def test_bad_requests_name_the_problem(llm: LLM) -> None:
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match=r"max_model_len is 512.*at most 511"):
        llm.generate([[5] * 512], GREEDY)
    # The longest prompt that fits leaves room for exactly one token, whatever max_tokens asks.
    (out,) = llm.generate([[5] * 511], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    with pytest.raises(ValueError, match=r"token id 49152 \(element 1\) is outside the vocabulary"):
        llm.generate([[5, 49152]], GREEDY)
    with pytest.raises(ValueError, match=r"token id -1 \(element 2\) is outside the vocabulary"):
        llm.generate([[5, 6, -1]], GREEDY)
    for bad in (True, 2.0, "7"):
        with pytest.raises(ValueError, match="must be integers; element 1"):
            llm.generate([[5, bad]], GREEDY)
    with pytest.raises(ValueError, match="characters"):
        llm.generate("word " * 200_000, GREEDY)
    assert llm.engine.scheduler.kv_cache_manager.num_used_blocks == 0
    assert not llm.engine.has_unfinished_requests()


def test_max_tokens_past_max_model_len_is_refused_at_the_engine_and_the_room_caps_the_rest(llm: LLM) -> None:
    """The engine's entry refuses max_tokens above max_model_len (LLM and the Triton model share it); up to
    max_model_len it is accepted and the room the prompt leaves ends the request ("length")."""
    with pytest.raises(ValueError, match=r"max_tokens is 513, more than max_model_len \(512\)"):
        llm.generate([[5] * 8], SamplingParams(max_tokens=513, temperature=0))
    with pytest.raises(ValueError, match="max_tokens is 513"):  # checked before any request is queued
        llm.generate([[5] * 8, [6] * 8], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=513)])
    assert not llm.engine.has_unfinished_requests()
    (out,) = llm.generate([[5] * 500], SamplingParams(max_tokens=512, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    (out,) = llm.generate([[5] * 500], SamplingParams(max_tokens=11, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 11 and out.finish_reason == "length"
    assert llm.engine.scheduler.kv_cache_manager.num_used_blocks == 0


def test_bad_engine_options_name_the_option(smollm2_path, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown engine option 'max_num_seq'"):
        LLM(str(smollm2_path), max_num_seq=4)
    with pytest.raises(ValueError, match="block_size"):
        LLM(str(smollm2_path), block_size=12)
    with pytest.raises(ValueError, match="swap_space_bytes must be at least 0, got -1"):
        LLM(str(smollm2_path), swap_space_bytes=-1)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(smollm2_path), max_model_len=100_000)
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint folder"):
        LLM(str(tmp_path / "nonexistent"))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\].*LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_kv_budget_too_small_names_blocks_and_largest_length(smollm2_path) -> None:
    # SmolLM2 in fp32: 30 layers * 2 * 16 tokens * 3 KV heads * 64 * 4 bytes = 737,280 bytes per block.
    with pytest.raises(ValueError) as info:
        LLM(str(smollm2_path), max_model_len=2048, kv_cache_memory_bytes=40 * 737_280)
    msg = str(info.value)
    assert "needs 128 blocks" in msg and "only 39 usable blocks" in msg
    assert "largest max_model_len that fits is 624" in msg


def test_generate_freezes_the_heap_only_while_it_runs(llm: LLM) -> None:
    """The engine's long-lived objects and the requests are out of the collector's walk during the steps
    (a full collection there stalled the GPU), and handed back once generate returns, also on error."""
    import gc

    engine = llm.engine
    seen: list[tuple[int, bool]] = []  # per step: frozen objects, whether a live request's state is frozen
    real_step = engine.step

    def step(*args, **kwargs):
        state = next(iter(engine._requests.values()), None)
        walked = state is not None and any(o is state for o in gc.get_objects())
        seen.append((gc.get_freeze_count(), state is not None and not walked))
        return real_step(*args, **kwargs)

    assert gc.get_freeze_count() == 0
    engine.step = step
    try:
        (out,) = llm.generate("Hello", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert out.num_output_tokens == 3 and len(seen) >= 3
        assert all(count > 0 for count, _ in seen)
        assert seen[0][1], "the requests added by generate are frozen with the rest"
        assert gc.get_freeze_count() == 0

        def fail(*args, **kwargs):
            raise RuntimeError("step failed")

        engine.step = fail
        with pytest.raises(RuntimeError, match="step failed"):
            llm.generate("Hello", SamplingParams(max_tokens=3))
        assert gc.get_freeze_count() == 0
    finally:
        engine.step = real_step
        for request_id in list(engine._requests):
            engine.abort(request_id)
        engine.step()
    assert not engine.has_unfinished_requests()


def test_heap_freeze_nests() -> None:
    import gc

    from inflight.backend.engine import gc_freeze

    assert gc.get_freeze_count() == 0
    gc_freeze.freeze()  # an outer user (the serving loop)
    with gc_freeze.frozen():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() > 0, "an inner user must not unfreeze the outer one's heap"
    gc_freeze.unfreeze()
    assert gc.get_freeze_count() == 0
    gc_freeze.unfreeze()  # unbalanced: ignored
    assert gc.get_freeze_count() == 0
