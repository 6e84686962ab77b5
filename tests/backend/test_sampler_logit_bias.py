"""The sampler's logit_bias: added to the rows that have one, before the penalties (vLLM's order), invisible in
the returned logprobs, and no tensor at all for a batch without any bias."""

import pytest
import torch

from inflight.backend.engine.sampling_params import SamplingParams
from inflight.backend.executor.sampler import Sampler, SamplingBatch


def _batch(
    params: list[SamplingParams], vocab_size: int, prompts: list[list[int]] | None = None
) -> SamplingBatch:
    prompts = prompts if prompts is not None else [[0] for _ in params]
    return SamplingBatch.build(params, prompts, [[] for _ in params], vocab_size, "cpu")


def test_no_bias_builds_nothing() -> None:
    batch = _batch([SamplingParams(temperature=0), SamplingParams(logit_bias={})], 8)
    assert batch.logit_bias_flat_ids is None and batch.logit_bias_values is None


def test_bias_tensors_are_row_major_flat_ids() -> None:
    batch = _batch([SamplingParams(), SamplingParams(logit_bias={3: 1.5, 0: -2.0})], 8)
    assert batch.logit_bias_flat_ids.tolist() == [1 * 8 + 3, 1 * 8 + 0]
    assert batch.logit_bias_values.tolist() == [1.5, -2.0]


def test_bias_tensors_of_rows_around_a_row_without_bias() -> None:
    """Row 0 and row 2 biased, row 1 not: flat ids row * vocab_size + token id in row order, each row's ids in
    its mapping's order, the values as given (exact in float32)."""
    params = [
        SamplingParams(logit_bias={4: 0.5}),
        SamplingParams(temperature=0),
        SamplingParams(logit_bias={0: -1.0, 3: 2.25}),
    ]
    batch = _batch(params, 5)
    assert batch.logit_bias_flat_ids.tolist() == [4, 2 * 5 + 0, 2 * 5 + 3]
    assert batch.logit_bias_values.tolist() == [0.5, -1.0, 2.25]


def test_bias_forces_and_forbids_tokens_per_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    greedy = logits.argmax(dim=-1)
    second = logits.topk(2, dim=-1).indices[:, 1]
    params = [
        SamplingParams(temperature=0),  # untouched
        SamplingParams(temperature=0, logit_bias={7: 100.0}),  # forced
        SamplingParams(temperature=0, logit_bias={int(greedy[2]): -100.0}),  # its argmax forbidden
    ]
    before = logits.clone()
    out = Sampler()(logits, _batch(params, 50))
    assert out.sampled_token_ids.tolist() == [int(greedy[0]), 7, int(second[2])]
    assert torch.equal(logits, before), "the caller's logits were modified"


def test_bias_is_applied_before_the_repetition_penalty() -> None:
    """Token 1 (logit 2.0) was seen and is penalized by 2, with a bias of +2: (2 + 2) / 2 = 2.0 < 2.5 (token 0)
    when the bias comes first (vLLM's order); 2 / 2 + 2 = 3.0 would win if it came after."""
    logits = torch.tensor([[2.5, 2.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={1: 2.0})
    out = Sampler()(logits, _batch([params], 4, prompts=[[1]]))
    assert out.sampled_token_ids.tolist() == [0]
    no_penalty = SamplingParams(temperature=0, logit_bias={1: 2.0})
    assert Sampler()(logits, _batch([no_penalty], 4, prompts=[[1]])).sampled_token_ids.tolist() == [1]


def test_returned_logprobs_are_the_raw_distributions() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    params = SamplingParams(temperature=0, logit_bias={0: 100.0}, logprobs=1)
    out = Sampler()(logits, _batch([params], 4))
    raw = logits.log_softmax(dim=-1)
    assert out.sampled_token_ids.tolist() == [0]
    assert out.logprobs.tolist() == pytest.approx(
        [raw[0, 0].item()], abs=1e-6
    )  # not ~0: the bias is not in it
    assert out.top_token_ids.tolist() == [[3]]
    assert out.top_logprobs.tolist()[0] == pytest.approx([raw[0, 3].item()], abs=1e-6)


def test_biased_random_row_samples_from_the_biased_distribution() -> None:
    """A -100 bias on all but one token of a sampled row leaves that token: the others' probability is
    exp(-100) ~ 4e-44 of its, far below what a ratio of two Exp(1) draws reaches (seeded: deterministic)."""
    logits = torch.zeros(1, 6)
    params = SamplingParams(temperature=1.0, seed=3, logit_bias={t: -100.0 for t in (0, 1, 2, 4, 5)})
    for _ in range(5):
        assert Sampler()(logits, _batch([params], 6)).sampled_token_ids.tolist() == [3]
