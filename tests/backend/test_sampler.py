"""Sampler: each filter against a direct computation on hand-made logits; seeds; logprobs."""

import pytest
import torch

from inflight.backend.engine.sampling_params import SamplingParams
from inflight.backend.executor.sampler import (
    Sampler,
    SamplingBatch,
    _step_seed,
    apply_penalties,
    filtered_probs,
)

# A 4-token distribution with no ties and no exact top-p / min-p boundaries near the thresholds used.
PROBS = [0.5, 0.3, 0.15, 0.05]


def _batch(
    params: list[SamplingParams],
    vocab_size: int,
    outputs: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
    **kwargs: object,
) -> SamplingBatch:
    outputs = outputs if outputs is not None else [[] for _ in params]
    prompts = prompts if prompts is not None else [[0] for _ in params]
    return SamplingBatch.build(params, prompts, outputs, vocab_size, "cpu", **kwargs)


def _kept(params: SamplingParams, probs: list[float] = PROBS) -> list[int]:
    """Token ids with non-zero probability after the filters, for one row of log(probs)."""
    logits = torch.tensor([probs]).log()
    kept = filtered_probs(logits.clone(), _batch([params], len(probs)))[0]
    return kept.nonzero().flatten().tolist()


def test_greedy_equals_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 101)
    batch = _batch([SamplingParams(temperature=0.0)] * 6, 101)
    out = Sampler()(logits, batch)
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))


def test_mixed_greedy_and_random_rows() -> None:
    """Greedy rows take the argmax; a seeded random row draws argmax(softmax(logits / T) / E), E ~ Exp(1)
    from the generator that (seed, number of output tokens) seeds (the module's documented method)."""
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=t, seed=3 + i) for i, t in enumerate((0.0, 1.0, 0.0, 0.7))]
    outputs = [[], [4, 4], [], [9]]
    out = Sampler()(logits, _batch(params, 50, outputs=outputs))
    for row, p in enumerate(params):
        if p.is_greedy:
            expected = int(logits[row].argmax())
        else:
            generator = torch.Generator().manual_seed(_step_seed(p.seed, len(outputs[row])))
            noise = torch.empty(50).exponential_(generator=generator)
            expected = int((torch.softmax(logits[row] / p.temperature, dim=-1) / noise).argmax())
        assert int(out.sampled_token_ids[row]) == expected, row


def test_sampler_does_not_modify_its_input() -> None:
    logits = torch.randn(2, 30)
    before = logits.clone()
    params = [SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5), SamplingParams(top_p=0.5)]
    Sampler()(logits, _batch(params, 30, outputs=[[1, 2], [3]]))
    assert torch.equal(logits, before)


@pytest.mark.parametrize("k", [1, 2, 3, 17])
def test_top_k_keeps_exactly_k(k: int) -> None:
    torch.manual_seed(k)
    logits = torch.randn(3, 40)
    params = [SamplingParams(top_k=k), SamplingParams(top_k=0), SamplingParams(top_k=k, top_p=0.999999)]
    probs = filtered_probs(logits.clone(), _batch(params, 40))
    for row in (0, 2):
        assert set(probs[row].nonzero().flatten().tolist()) == set(logits[row].topk(k).indices.tolist())
        expected = torch.softmax(logits[row].topk(k).values, dim=-1)
        assert torch.allclose(probs[row][logits[row].topk(k).indices], expected, atol=1e-6)
    assert torch.allclose(probs[1], logits[1].softmax(-1), atol=1e-7)  # top-k off: untouched


@pytest.mark.parametrize("ks", [[1, 2, 5, 3], [3, 0, 1]], ids=["mixed", "one-row-off"])
def test_top_k_only_path_keeps_each_rows_own_k(ks: list[int]) -> None:
    """No row has top-p, so the batch takes the top-k-only path (one `topk` of the batch's largest k):
    rows with a smaller k keep exactly their own k, not the batch's largest; k = 0 is off."""
    torch.manual_seed(11)
    logits = torch.randn(len(ks), 40)
    batch = _batch([SamplingParams(top_k=k) for k in ks], 40)
    assert batch.top_p is None and batch.max_top_k == (40 if 0 in ks else max(ks))
    probs = filtered_probs(logits.clone(), batch)
    for row, k in enumerate(ks):
        if k == 0:
            assert torch.allclose(probs[row], logits[row].softmax(-1), atol=1e-7)
            continue
        top = logits[row].topk(k)
        assert probs[row].nonzero().flatten().sort().values.tolist() == sorted(top.indices.tolist())
        assert torch.allclose(probs[row][top.indices], top.values.softmax(-1), atol=1e-6)


# Powers of two: their log-softmax round-trips exactly in float32, so the top-p and min-p thresholds below
# fall exactly on a token's probability (the boundary itself is tested, not a value near it).
EXACT_PROBS = [0.5, 0.25, 0.125, 0.125]


def test_exact_probs_round_trip() -> None:
    """The precondition of the boundary tests: softmax(log(EXACT_PROBS)) and its ascending cumsum are exact."""
    logits = torch.tensor([EXACT_PROBS]).log()
    assert logits.softmax(-1).tolist() == [EXACT_PROBS]
    assert logits.sort(dim=-1).values.softmax(-1).cumsum(-1).tolist() == [[0.125, 0.25, 0.5, 1.0]]


@pytest.mark.parametrize(("top_p", "num_kept"), [(0.5, 1), (0.75, 2), (0.875, 3), (1.0, 4)])
def test_top_p_at_exactly_the_mass_of_the_best_tokens(top_p: float, num_kept: int) -> None:
    """top_p equal to the mass of the best n tokens keeps exactly those n: the set reaches top_p, so no
    further token is needed. At 0.875 tokens 2 and 3 tie: exactly one of them is kept."""
    kept = _kept(SamplingParams(top_p=top_p), EXACT_PROBS)
    assert len(kept) == num_kept
    assert kept[: min(num_kept, 2)] == [0, 1][:num_kept]
    if num_kept == 3:
        assert set(kept) in ({0, 1, 2}, {0, 1, 3})


@pytest.mark.parametrize(("min_p", "kept"), [(0.25, [0, 1, 2, 3]), (0.5, [0, 1]), (1.0, [0])])
def test_min_p_keeps_a_token_exactly_at_the_threshold(min_p: float, kept: list[int]) -> None:
    """A token is dropped when its probability is below min_p * max; exactly at it, it stays
    (0.25 * 0.5 = 0.125 keeps the tied pair; 0.5 * 0.5 = 0.25 keeps token 1; 1.0 keeps the best only)."""
    assert _kept(SamplingParams(min_p=min_p), EXACT_PROBS) == kept


def test_top_k_exact_even_with_ties() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    for params in (SamplingParams(top_k=2), SamplingParams(top_k=2, top_p=0.9999)):
        assert int((filtered_probs(logits.clone(), _batch([params], 5)) > 0).sum()) == 2


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.49, [0]), (0.79, [0, 1]), (0.81, [0, 1, 2]), (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_boundary(top_p: float, kept: list[int]) -> None:
    """The smallest set of best tokens whose mass reaches top_p (0.5, 0.8, 0.95, 1.0 cumulative)."""
    assert _kept(SamplingParams(top_p=top_p)) == kept


def test_top_p_renormalizes_and_keeps_the_top_token() -> None:
    logits = torch.tensor([PROBS]).log()
    probs = filtered_probs(logits.clone(), _batch([SamplingParams(top_p=0.79)], 4))[0]
    assert torch.allclose(probs, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]), atol=1e-6)
    assert _kept(SamplingParams(top_p=1e-6)) == [0]
    assert _kept(SamplingParams(top_p=1e-9)) == [0]  # 1 - 1e-9 rounds to 1.0 in float32


def test_top_p_applies_to_the_top_k_distribution() -> None:
    """After top-k 3 the best two hold 0.8 / 0.95 = 0.842 >= 0.83; without top-k only 0.8 < 0.83."""
    assert _kept(SamplingParams(top_k=3, top_p=0.83)) == [0, 1]
    assert _kept(SamplingParams(top_p=0.83)) == [0, 1, 2]


@pytest.mark.parametrize(
    ("min_p", "kept"), [(0.09, [0, 1, 2, 3]), (0.11, [0, 1, 2]), (0.29, [0, 1, 2]), (0.31, [0, 1])]
)
def test_min_p_boundary(min_p: float, kept: list[int]) -> None:
    """Drop tokens with prob < min_p * 0.5: thresholds 0.045, 0.055, 0.145, 0.155."""
    assert _kept(SamplingParams(min_p=min_p)) == kept


def test_min_p_threshold_is_each_rows_own() -> None:
    """min_p scales each row's own best probability: 0.5 * 0.8 drops row 0's 0.1s, 0.5 * 0.4 keeps row 1's."""
    logits = torch.tensor([[0.8, 0.1, 0.1], [0.4, 0.3, 0.3]]).log()
    probs = filtered_probs(logits.clone(), _batch([SamplingParams(min_p=0.5)] * 2, 3))
    assert (probs > 0).tolist() == [[True, False, False], [True, True, True]]


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    probs = filtered_probs(logits.clone(), _batch([SamplingParams(temperature=0.5)], 3))
    assert torch.allclose(probs, torch.softmax(logits / 0.5, dim=-1))


def test_penalties_exact_values() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0]])
    prompt, output = [[0]], [[1, 1, 3]]

    def penalized(**kwargs: float) -> list[float]:
        batch = _batch([SamplingParams(**kwargs)], 5, outputs=output, prompts=prompt)
        return apply_penalties(logits.clone(), batch)[0].tolist()

    # repetition (prompt + output seen: 0, 1, 3): positive / 2, negative * 2
    assert penalized(repetition_penalty=2.0) == [1.0, -2.0, 0.5, -1.0, 3.0]
    # presence / frequency on output counts only {1: 2, 3: 1}: token 0 (prompt only) untouched
    assert penalized(presence_penalty=0.5, frequency_penalty=0.25) == [2.0, -2.0, 0.5, -1.25, 3.0]
    assert penalized(repetition_penalty=2.0, presence_penalty=0.5) == [1.0, -2.5, 0.5, -1.5, 3.0]
    assert penalized() == logits[0].tolist()


def test_repetition_penalty_between_zero_and_one_divides() -> None:
    """Positive logits below 1 are divided too (and 0 stays 0): HF's rule is by sign, not by size."""
    logits = torch.tensor([[0.5, 1.0, 0.0, -0.5, 2.0]])
    batch = _batch([SamplingParams(repetition_penalty=2.0)], 5, prompts=[[0, 1, 2, 3, 4]])
    assert apply_penalties(logits.clone(), batch)[0].tolist() == [0.25, 0.5, 0.0, -1.0, 1.0]


def test_repetition_penalty_alone_changes_the_greedy_choice() -> None:
    """An all-greedy batch with only a repetition penalty (no presence, frequency or bans) is penalized:
    the seen token 0 drops from 3.0 to 1.5, below token 1."""
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    out = Sampler()(logits, _batch([SamplingParams(temperature=0, repetition_penalty=2.0)], 3, prompts=[[0]]))
    assert out.sampled_token_ids.tolist() == [1]


def test_penalties_change_the_greedy_choice_per_row() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0, frequency_penalty=0.2), SamplingParams(temperature=0)]
    out = Sampler()(logits, _batch(params, 3, outputs=[[0], [0]]))
    assert out.sampled_token_ids.tolist() == [1, 0]


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]] * 4)  # eos = 0 is the argmax, stop id 1 next
    params = [
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1]),
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1]),
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1], ignore_eos=True),
        SamplingParams(temperature=0, stop_token_ids=[1]),
    ]
    outputs = [[3], [3, 3], [3], []]
    out = Sampler()(logits, _batch(params, 4, outputs=outputs, eos_token_ids=[{0}, {0}, {0}, {0}]))
    assert out.sampled_token_ids.tolist() == [2, 0, 0, 0]


def test_bad_words_token_bans() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]] * 3)
    params = [SamplingParams(temperature=0)] * 3
    bad_words = [[[0]], [[2, 0]], [[2, 0]]]  # one-token word; two-token word after / not after token 2
    batch = _batch(params, 4, outputs=[[], [1, 2], [2, 1]], bad_words_token_ids=bad_words)
    assert Sampler()(logits, batch).sampled_token_ids.tolist() == [1, 1, 0]


def test_logprobs_are_of_the_raw_distribution() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 64) * 3
    params = [
        SamplingParams(temperature=0.3, top_k=5, repetition_penalty=1.3, logprobs=4),
        SamplingParams(temperature=0, presence_penalty=1.0, logprobs=0),
        SamplingParams(top_p=0.5, min_p=0.1),
    ]
    out = Sampler()(logits, _batch(params, 64, outputs=[[1, 2], [3], []]))
    expected = torch.log_softmax(logits, dim=-1)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (3,)
    assert torch.allclose(out.logprobs, expected.gather(1, out.sampled_token_ids[:, None])[:, 0], atol=1e-5)
    assert out.top_logprobs is not None and out.top_token_ids is not None
    assert out.top_logprobs.shape == (3, 4)
    top = expected.topk(4, dim=-1)
    assert torch.equal(out.top_token_ids, top.indices)
    assert torch.allclose(out.top_logprobs, top.values, atol=1e-5)


def test_no_logprobs_computed_when_nobody_asks() -> None:
    logits = torch.randn(2, 10)
    out = Sampler()(logits, _batch([SamplingParams(temperature=0), SamplingParams(seed=3)], 10))
    assert out.logprobs is None and out.top_logprobs is None
    assert out.sampled_token_ids[0] == logits[0].argmax()


def test_no_top_logprobs_unless_asked() -> None:
    logits = torch.randn(2, 10)
    out = Sampler()(logits, _batch([SamplingParams(logprobs=0), SamplingParams()], 10))
    assert out.top_logprobs is None and out.top_token_ids is None


def test_bfloat16_logits() -> None:
    logits = torch.randn(2, 33).to(torch.bfloat16)
    out = Sampler()(logits, _batch([SamplingParams(temperature=0, logprobs=2)] * 2, 33))
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
    assert torch.allclose(out.logprobs, expected.gather(1, out.sampled_token_ids[:, None])[:, 0], atol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0),  # plain greedy: the argmax of the logits as they are
        SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(temperature=0, stop_token_ids=[5], min_tokens=3),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7),
    ],
)
def test_bfloat16_logits_sample_as_their_float32_widening(params: SamplingParams) -> None:
    """The model's logits come in its dtype; any path samples exactly what the float32 values give."""
    torch.manual_seed(5)
    logits = (4 * torch.randn(8, 300)).to(torch.bfloat16)
    logits[3, 10] = logits[3, 11] = logits[3].max() + 1  # a tie: the first index, as in float32
    batch = _batch([params] * 8, 300, outputs=[[5, 9], [1], [], [2, 2], [7], [], [3], [4]], eos_token_ids={5})
    ours = Sampler()(logits, batch).sampled_token_ids
    widened = Sampler()(logits.float(), batch).sampled_token_ids
    assert torch.equal(ours, widened)
    if params.temperature == 0 and params.repetition_penalty == 1.0:
        assert ours[3] == 10


def _seeded_run(target: SamplingParams, others: list[SamplingParams], row: int, steps: int = 12) -> list[int]:
    """Sample `steps` tokens for `target` at `row` of a batch, the others around it (fresh noise)."""
    generator = torch.Generator().manual_seed(1234)
    base = torch.randn(steps, 80, generator=generator)  # the target's logits at each step
    output: list[int] = []
    params = others[:row] + [target] + others[row:]
    for step in range(steps):
        logits = torch.randn(len(params), 80)
        logits[row] = base[step]
        outputs = [[7] * step for _ in params]
        outputs[row] = list(output)
        out = Sampler()(logits, _batch(params, 80, outputs=outputs))
        output.append(int(out.sampled_token_ids[row]))
    return output


def test_seeded_rows_are_reproducible_in_any_batch() -> None:
    target = SamplingParams(temperature=1.5, top_k=40, seed=42)
    torch.manual_seed(0)
    alone = _seeded_run(target, [], 0)
    torch.manual_seed(1)  # a different global RNG state must not matter
    others = [
        SamplingParams(temperature=0),
        SamplingParams(top_p=0.9, repetition_penalty=1.2),
        SamplingParams(seed=43, min_p=0.05, presence_penalty=0.5),
    ]
    in_batch = _seeded_run(target, others, 2)
    assert alone == in_batch
    assert len(set(alone)) > 3  # really random, not stuck on one token
    assert _seeded_run(SamplingParams(temperature=1.5, top_k=40, seed=7), [], 0) != alone


def test_seeded_token_depends_on_output_length_only() -> None:
    """A recompute after preemption (same seed, same output length) draws the same token."""
    logits = torch.zeros(1, 1000)
    params = [SamplingParams(seed=5)]
    first = Sampler()(logits, _batch(params, 1000, outputs=[[1, 2, 3]])).sampled_token_ids
    again = Sampler()(logits, _batch(params, 1000, outputs=[[9, 9, 9]])).sampled_token_ids
    next_step = Sampler()(logits, _batch(params, 1000, outputs=[[1, 2, 3, 4]])).sampled_token_ids
    assert first.item() == again.item() != next_step.item()


def _frequencies(token_ids: torch.Tensor, vocab_size: int) -> list[float]:
    return (torch.bincount(token_ids, minlength=vocab_size).float() / token_ids.numel()).tolist()


def test_distribution_matches_probs() -> None:
    torch.manual_seed(0)
    num_draws = 20_000  # std of a frequency <= 0.0036: a tolerance of 0.015 is > 4 std
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(num_draws, 3)
    out = Sampler()(logits, _batch([SamplingParams()] * num_draws, 3))
    assert _frequencies(out.sampled_token_ids, 3) == pytest.approx([0.5, 0.3, 0.2], abs=0.015)
    out = Sampler()(logits, _batch([SamplingParams(temperature=0.5)] * num_draws, 3))
    squared = [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38]  # p ** (1 / 0.5), renormalized
    assert _frequencies(out.sampled_token_ids, 3) == pytest.approx(squared, abs=0.015)


def test_distribution_over_seeds() -> None:
    num_draws = 4_000  # std of a frequency <= 0.008: a tolerance of 0.035 is > 4 std
    logits = torch.tensor([[0.6, 0.25, 0.1, 0.05]]).log().expand(num_draws, 4)
    params = [SamplingParams(seed=seed, top_k=3) for seed in range(num_draws)]
    out = Sampler()(logits, _batch(params, 4))
    expected = [0.6 / 0.95, 0.25 / 0.95, 0.1 / 0.95, 0.0]
    assert _frequencies(out.sampled_token_ids, 4) == pytest.approx(expected, abs=0.035)


def test_build_collects_per_request_tensors() -> None:
    params = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=3, logprobs=2, seed=1),
        SamplingParams(top_k=-1),
    ]
    batch = _batch(params, 10, outputs=[[], [4], []])
    assert not batch.all_greedy and not batch.all_random
    assert batch.is_greedy.tolist() == [True, False, False]
    assert batch.temperature.tolist() == [1.0, 1.0, 1.0]
    assert batch.top_k is not None and batch.top_k.tolist() == [10, 3, 10]
    assert batch.top_p is None and batch.min_p is None and batch.seen_mask is None
    assert batch.max_num_logprobs == 2
    assert batch.seeds[0] is None and batch.seeds[2] is None
    assert batch.seeds[1] is not None and 0 <= batch.seeds[1] < 2**63


def test_non_contiguous_logits() -> None:
    logits = torch.randn(40, 3).t()  # [3, 40], not contiguous
    params = [SamplingParams(temperature=0, stop_token_ids=[0], min_tokens=1)] * 3
    out = Sampler()(logits, _batch(params, 40, eos_token_ids={1}))
    masked = logits.clone()
    masked[:, :2] = float("-inf")
    assert torch.equal(out.sampled_token_ids, masked.argmax(dim=-1))
