"""The sampler on CUDA tensors: penalties and filters equal to the CPU's, seeded rows reproducible in any batch.

The CPU suite cannot tell a tensor or generator made on the wrong device (the CPU is the default device);
here every input is on the GPU, so such a mistake raises or differs."""

from __future__ import annotations

import torch

from inflight.backend.engine.sampling_params import SamplingParams
from inflight.backend.executor.sampler import Sampler, SamplingBatch, apply_penalties, filtered_probs

VOCAB = 257
CUDA = torch.device("cuda")


PARAMS = [
    SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, seed=11, min_tokens=4),
    SamplingParams(temperature=1.2, top_k=5, seed=12, frequency_penalty=-0.5),
    SamplingParams(temperature=0.9, min_p=0.2, seed=13, repetition_penalty=0.8),
]
OUTPUTS = [[4, 4, 7], [9], [3, 3, 3, 250], [7, 8]]
BAD_WORDS = [[[5], [7, 9]], [], [[3, 6]], []]
ALL = list(range(len(PARAMS)))


def _batch(rows: list[int], device: torch.device) -> SamplingBatch:
    """The batch of rows `rows` of PARAMS (with their outputs and bad words) on `device`."""
    return SamplingBatch.build(
        [PARAMS[r] for r in rows],
        [[1, 2, 3]] * len(rows),
        [OUTPUTS[r] for r in rows],
        VOCAB,
        device,
        eos_token_ids={0},
        bad_words_token_ids=[BAD_WORDS[r] for r in rows],
    )


def test_penalties_and_filters_on_cuda_equal_the_cpus() -> None:
    torch.manual_seed(0)
    logits = torch.randn(len(PARAMS), VOCAB) * 3
    cpu, gpu = _batch(ALL, torch.device("cpu")), _batch(ALL, CUDA)
    assert all(t.device.type == "cuda" for t in vars(gpu).values() if isinstance(t, torch.Tensor))
    penalized = apply_penalties(logits.clone(), cpu)
    assert torch.allclose(apply_penalties(logits.to(CUDA), gpu).cpu(), penalized, atol=1e-6)
    assert torch.allclose(
        filtered_probs(penalized.clone(), cpu), filtered_probs(penalized.to(CUDA), gpu).cpu(), atol=1e-6
    )
    out = Sampler()(logits.to(CUDA), gpu)
    assert out.sampled_token_ids.device.type == "cuda"
    masked = penalized[0].clone()
    masked[[5]] = float("-inf")  # the one-token bad word of row 0
    assert int(out.sampled_token_ids[0]) == int(masked.argmax())  # row 0 is greedy


def test_seeded_rows_on_cuda_draw_the_same_tokens_alone_and_in_a_batch() -> None:
    """Per-row generators on the logits' device: a seeded row's tokens do not depend on its neighbours."""
    torch.manual_seed(1)
    logits = (torch.randn(len(PARAMS), VOCAB) * 3).to(CUDA)
    together = Sampler()(logits, _batch(ALL, CUDA)).sampled_token_ids.tolist()
    for row in (1, 2, 3):
        alone = Sampler()(logits[row : row + 1], _batch([row], CUDA))
        assert alone.sampled_token_ids.tolist() == [together[row]], row
