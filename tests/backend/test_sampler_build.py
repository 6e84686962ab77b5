"""SamplingBatch.build: its documented fields exactly (None where a feature is off in every row), the bans,
the per-step seeds against splitmix64's published outputs, and where and in which dtype its tensors live."""

from collections.abc import Iterator

import pytest
import torch

from inflight.backend.engine.sampling_params import SamplingParams
from inflight.backend.executor.sampler import Sampler, SamplingBatch, _flatten, _step_seed

VOCAB = 10
TENSOR_FIELDS = (
    "is_greedy",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "seen_mask",
    "presence_penalty",
    "frequency_penalty",
    "output_counts",
    "banned_flat_ids",
    "logit_bias_flat_ids",
    "logit_bias_values",
)


def _build(
    params: list[SamplingParams],
    outputs: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
    device: str = "cpu",
    vocab_size: int = VOCAB,
    **kwargs: object,
) -> SamplingBatch:
    outputs = outputs if outputs is not None else [[] for _ in params]
    prompts = prompts if prompts is not None else [[0] for _ in params]
    return SamplingBatch.build(params, prompts, outputs, vocab_size, device, **kwargs)


def test_all_greedy_batch_without_features_has_no_per_row_tensors() -> None:
    """The common decode step: every row greedy, every feature off (top_k 0, -1 or vocab_size all mean
    off): every per-row tensor is None and the plain greedy path of the sampler applies."""
    params = [SamplingParams(temperature=0, top_k=k) for k in (0, -1, VOCAB)]
    batch = _build(params, outputs=[[1, 2], [3], []], eos_token_ids={1})
    assert {name: getattr(batch, name) for name in TENSOR_FIELDS} == dict.fromkeys(TENSOR_FIELDS)
    assert batch.vocab_size == VOCAB and batch.max_top_k == VOCAB
    assert batch.all_greedy is True and batch.all_random is False
    assert batch.seeds == [None, None, None]
    assert batch.max_num_logprobs is None and batch.need_logprobs is False


def test_all_random_batch() -> None:
    """No greedy row: all_random is True and each row's own temperature is kept."""
    batch = _build([SamplingParams(temperature=0.5), SamplingParams(temperature=2.0)])
    assert batch.all_random is True and batch.all_greedy is False
    assert batch.is_greedy is not None and batch.is_greedy.tolist() == [False, False]
    assert batch.temperature is not None and batch.temperature.tolist() == [0.5, 2.0]
    assert batch.top_k is None and batch.banned_flat_ids is None


def test_empty_batch() -> None:
    """No request this step: nothing to gather, and max_top_k falls back to vocab_size."""
    batch = SamplingBatch.build([], [], [], VOCAB, "cpu")
    assert {name: getattr(batch, name) for name in TENSOR_FIELDS} == dict.fromkeys(TENSOR_FIELDS)
    assert batch.max_top_k == VOCAB and batch.seeds == [] and batch.need_logprobs is False
    assert batch.all_greedy and not batch.all_random  # all greedy, not both: nothing to draw
    sampled = Sampler()(torch.empty(0, VOCAB), batch).sampled_token_ids
    assert sampled.dtype == torch.int64 and sampled.shape == (0,)


@pytest.mark.parametrize("short", ["prompts", "outputs"])
def test_token_lists_of_another_length_than_params_are_rejected(short: str) -> None:
    """Row i is request i: one prompt (or output) list too few is an error, not a silently shifted batch."""
    params = [SamplingParams(), SamplingParams()]
    lists = {"prompts": [[0], [1]], "outputs": [[], []]}
    lists[short] = lists[short][:1]
    with pytest.raises(AssertionError):
        _build(params, **lists)


def test_bans_of_rows_after_a_row_without_bans() -> None:
    """Each row's bans, row-major as row * vocab_size + token id, wherever the rows without bans are."""
    params = [
        SamplingParams(temperature=0),
        SamplingParams(min_tokens=2, stop_token_ids=[7, 3]),  # below min_tokens: stop ids and EOS
        SamplingParams(),
        SamplingParams(),  # its bad word [5, 6] follows its output: token 6 is banned
    ]
    batch = _build(
        params,
        outputs=[[], [4], [2], [1, 5]],
        eos_token_ids={1},
        bad_words_token_ids=[[], [], [[9, 9]], [[5, 6]]],
    )
    assert batch.banned_flat_ids is not None and batch.banned_flat_ids.dtype == torch.int64
    assert batch.banned_flat_ids.tolist() == [VOCAB + 1, VOCAB + 3, VOCAB + 7, 3 * VOCAB + 6]


def test_ban_ids_outside_the_vocabulary_are_dropped() -> None:
    """A stop or EOS id >= vocab_size has no logit: it is not banned (nor turned into another row's id)."""
    params = [SamplingParams(min_tokens=1, stop_token_ids=[VOCAB, 2, VOCAB + 4])] * 2
    batch = _build(params, eos_token_ids={VOCAB + 1})
    assert batch.banned_flat_ids is not None and batch.banned_flat_ids.tolist() == [2, VOCAB + 2]
    only_outside = _build([SamplingParams(min_tokens=1, stop_token_ids=[VOCAB])], eos_token_ids={VOCAB})
    assert only_outside.banned_flat_ids is None


# Splitmix64 (Steele, Lea and Flood 2014) advances its state by the golden gamma and outputs mix(state).
# Its first outputs from state 0 (Vigna's reference splitmix64.c, prng.di.unimi.it; the words that seed
# xoshiro256** from 0): mix(k * GOLDEN_GAMMA) for k = 1, 2, 3, 4.
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX64_FROM_0 = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]


def _seed_with_state(k: int, num_output_tokens: int) -> int:
    """The request seed whose step state seed * GOLDEN_GAMMA + num_output_tokens + 1 is k * GOLDEN_GAMMA
    (mod 2**64; the gamma is odd, so invertible)."""
    return (k * GOLDEN_GAMMA - num_output_tokens - 1) * pow(GOLDEN_GAMMA, -1, 2**64) % 2**64


@pytest.mark.parametrize(("k", "num_output_tokens"), [(1, 0), (2, 1), (3, 7), (4, 1000)])
def test_step_seed_is_splitmix64_mix_of_the_step_state(k: int, num_output_tokens: int) -> None:
    """The step's seed is splitmix64's output function of seed * gamma + num_output_tokens + 1, shifted
    right once (a 63-bit seed): for a state of k * gamma it is the published k-th output >> 1."""
    seed = _seed_with_state(k, num_output_tokens)
    assert 0 <= seed < 2**63  # a valid request seed
    assert _step_seed(seed, num_output_tokens) == SPLITMIX64_FROM_0[k - 1] >> 1


@pytest.mark.parametrize("known", [0, 1, 5])
def test_num_output_tokens_decides_min_tokens_and_the_seed(known: int) -> None:
    """With tokens in flight, `num_output_tokens` (not the known output ids) counts toward min_tokens and
    seeds the step's generator."""
    params = [SamplingParams(min_tokens=3, stop_token_ids=[4], seed=_seed_with_state(2, 3))]
    reached = _build(params, outputs=[[1] * known], num_output_tokens=[3])
    assert reached.banned_flat_ids is None
    assert reached.seeds == [SPLITMIX64_FROM_0[1] >> 1]
    below = _build(params, outputs=[[1] * known], num_output_tokens=[2])
    assert below.banned_flat_ids is not None and below.banned_flat_ids.tolist() == [4]
    assert below.seeds != reached.seeds


# Every feature on somewhere: a greedy row with penalties and bans, random rows with each filter, a bias.
ALL_FEATURES = [
    SamplingParams(
        temperature=0, repetition_penalty=1.2, presence_penalty=0.5, min_tokens=2, stop_token_ids=[1]
    ),
    SamplingParams(
        temperature=0.7, top_k=3, min_p=0.1, frequency_penalty=0.25, logprobs=2, logit_bias={2: 1.5}
    ),
    SamplingParams(temperature=1.3, top_k=4, top_p=0.9),
]
ALL_FEATURES_OUTPUTS = [[2], [3, 3], [5]]  # row 0 is below its min_tokens: its stop id and EOS are banned


@pytest.mark.parametrize("num_rows", [3, 2], ids=["top-k-and-top-p", "top-k-only"])
def test_build_and_sample_keep_every_tensor_on_the_requested_device(num_rows: int) -> None:
    """Every tensor that build gathers and the sampler returns is on the requested device. The meta device
    stands in for a GPU on a CPU-only run: a tensor left on the CPU shows up as such, or as the
    cross-device error that mixing it with the others raises. Without the last row no row has top-p, and
    the sampler takes its top-k-only path."""
    params, outputs = ALL_FEATURES[:num_rows], ALL_FEATURES_OUTPUTS[:num_rows]
    batch = _build(params, outputs=outputs, device="meta", eos_token_ids={0})
    tensors = {name: getattr(batch, name) for name in TENSOR_FIELDS}
    expected = {name: "meta" for name in TENSOR_FIELDS if name != "top_p" or num_rows == 3}
    assert {name: t.device.type for name, t in tensors.items() if t is not None} == expected
    out = Sampler()(torch.empty(len(params), VOCAB, device="meta"), batch)
    returned = (out.sampled_token_ids, out.logprobs, out.top_logprobs, out.top_token_ids)
    assert [t.device.type for t in returned] == ["meta"] * 4


@pytest.fixture
def float64_default() -> Iterator[None]:
    """torch's default dtype float64, as some host programs set it, restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.usefixtures("float64_default")
def test_build_tensors_keep_their_documented_dtypes_under_a_float64_default() -> None:
    """float32 values, bool masks and int64 ids as the fields document, not torch's default dtype."""
    batch = _build(ALL_FEATURES, outputs=ALL_FEATURES_OUTPUTS, eos_token_ids={0})
    expected = dict.fromkeys(TENSOR_FIELDS, torch.float32)
    expected.update(
        is_greedy=torch.bool,
        seen_mask=torch.bool,
        top_k=torch.int64,
        banned_flat_ids=torch.int64,
        logit_bias_flat_ids=torch.int64,
    )
    assert {name: getattr(batch, name).dtype for name in TENSOR_FIELDS} == expected


@pytest.mark.usefixtures("float64_default")
def test_sampler_computes_in_float32_under_a_float64_default() -> None:
    """The penalized logits are float32 whatever torch's default dtype: 1 / 3 in float32 rounds up to
    exactly token 1's logit, and argmax takes the first of tied maxima (token 0); in float64, 1 / 3 would
    stay below it and token 1 would win."""
    third = (torch.tensor(1.0, dtype=torch.float32) / 3).item()
    assert third > 1 / 3  # the float32 rounding goes up
    logits = torch.tensor([[1.0, third, -5.0]], dtype=torch.float32)
    batch = _build([SamplingParams(temperature=0, repetition_penalty=3.0)], prompts=[[0]], vocab_size=3)
    assert Sampler()(logits, batch).sampled_token_ids.tolist() == [0]


def test_flatten_of_no_token_lists() -> None:
    """No lists at all: two empty int64 tensors (row of each token, token id)."""
    rows, cols = _flatten([], "cpu")
    assert rows.dtype == cols.dtype == torch.int64
    assert rows.tolist() == cols.tolist() == []
