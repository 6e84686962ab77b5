"""Token sampling for a batch of requests with different parameters, without per-token host syncs.

Per step, on `[num_seqs, vocab_size]` logits:

    raw logits ──► log-softmax stats (returned logprobs are under the RAW distribution)
        │
        ▼
    logit_bias (+ bias on the rows that have one; vLLM's order: before the penalties)
        ▼
    penalties (repetition: prompt+output, HF; presence/frequency: output only, OpenAI)
        ▼
    bans (-inf): EOS + stop_token_ids while len(output) < min_tokens; bad-word tokens
        ▼
    grammar masks (-inf outside each guided row's allowed tokens; guided_mask.py)
        ├──► greedy rows: argmax
        ▼
    temperature ─► top-k ─► top-p ─► min-p ─► softmax ─► argmax(probs / E), E ~ Exp(1)

E for a row with a seed comes from a generator seeded by (seed, number of output tokens so far), so a
seeded request draws the same tokens alone, inside any batch, and after a preemption and recompute.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from inflight.backend.executor.guided_mask import GuidedLogitsMask

_MASK64 = 2**64 - 1


class RowParams(Protocol):
    """What the sampler reads of a request's sampling parameters (the engine's ``SamplingParams``)."""

    @property
    def is_greedy(self) -> bool: ...

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    min_tokens: int
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    seed: int | None
    logprobs: int | None
    logit_bias: Mapping[int, float] | None


@dataclass
class SamplingBatch:
    """The per-step tensors of a batch of requests; row i is request i. Build with `build`."""

    vocab_size: int
    all_greedy: bool
    all_random: bool
    is_greedy: torch.Tensor | None  # [num_seqs] bool; None when every row is greedy (nothing to choose)
    temperature: torch.Tensor | None  # [num_seqs] float32, 1.0 on greedy rows; None when all are greedy
    top_k: torch.Tensor | None  # [num_seqs] int64, vocab_size where off; None when off everywhere
    max_top_k: int  # the largest top_k of the batch (vocab_size when a row has top-k off)
    top_p: torch.Tensor | None  # [num_seqs] float32; None when 1.0 everywhere
    min_p: torch.Tensor | None  # [num_seqs] float32; None when 0.0 everywhere
    repetition_penalty: torch.Tensor | None  # [num_seqs, 1] float32; None when 1.0 everywhere
    seen_mask: torch.Tensor | None  # [num_seqs, vocab_size] bool: token in prompt + output
    presence_penalty: torch.Tensor | None  # [num_seqs, 1] float32; None with frequency when all 0
    frequency_penalty: torch.Tensor | None  # [num_seqs, 1] float32
    output_counts: torch.Tensor | None  # [num_seqs, vocab_size] float32: count in output
    banned_flat_ids: torch.Tensor | None  # [num_bans] int64: row * vocab_size + banned token id
    seeds: list[int | None]  # per row: the seed of this step's generator, None = global RNG
    max_num_logprobs: int | None  # top alternatives to return (the largest asked); None = no one asked
    need_logprobs: bool  # some row asked for log-probabilities (else none are computed)
    logit_bias_flat_ids: torch.Tensor | None = None  # [num_biases] int64: row * vocab_size + token id
    logit_bias_values: torch.Tensor | None = None  # [num_biases] float32: the bias added there
    guided: GuidedLogitsMask | None = None  # grammar masks (the executor sets them after the forward)

    @classmethod
    def build(
        cls,
        params: Sequence[RowParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: Sequence[set[int]] | set[int] | frozenset[int] = frozenset(),
        bad_words_token_ids: Sequence[Sequence[Sequence[int]]] | None = None,
        num_output_tokens: Sequence[int] | None = None,
    ) -> SamplingBatch:
        """Gather the batch's parameters into tensors on `device`, once per step.

        `eos_token_ids` is one set for all requests or one set per request. `bad_words_token_ids` gives,
        per request, its bad words as token-id sequences: the last token of a sequence is banned when
        the output ends with the rest of it (a one-token word is always banned).
        `num_output_tokens` gives, per request, how many tokens precede the one sampled now, when that is
        more than the known `output_token_ids` (tokens of a step in flight): it decides min_tokens and
        the seeded generators (the penalties and bad words need the known ids: the engine waits for them).
        NOTE: call it before launching the step's forward: its host-to-device copies then wait on nothing.
        """
        num_seqs = len(params)
        assert len(prompt_token_ids) == num_seqs and len(output_token_ids) == num_seqs
        counts = [len(o) for o in output_token_ids] if num_output_tokens is None else list(num_output_tokens)
        assert len(counts) == num_seqs
        eos_sets = (
            [eos_token_ids] * num_seqs if isinstance(eos_token_ids, (set, frozenset)) else eos_token_ids
        )
        assert len(eos_sets) == num_seqs

        def floats(values: list[float], column: bool = False) -> torch.Tensor:
            tensor = torch.tensor(values, dtype=torch.float32, device=device)
            return tensor.unsqueeze(1) if column else tensor

        greedy = [p.is_greedy for p in params]
        top_ks = [p.top_k if 1 <= p.top_k < vocab_size else vocab_size for p in params]
        has_top_k = any(k < vocab_size for k in top_ks)

        rep = [p.repetition_penalty for p in params]
        seen_mask = None
        if any(r != 1.0 for r in rep):
            seen_mask = _token_mask(
                [list(a) + list(b) for a, b in zip(prompt_token_ids, output_token_ids, strict=True)],
                vocab_size,
                device,
            )
        presence = [p.presence_penalty for p in params]
        frequency = [p.frequency_penalty for p in params]
        output_counts = None
        if any(presence) or any(frequency):
            output_counts = _token_counts(output_token_ids, vocab_size, device)

        ban_flat_ids: list[int] = []
        for row, (p, output) in enumerate(zip(params, output_token_ids, strict=True)):
            below_min_tokens = counts[row] < p.min_tokens
            if not below_min_tokens and (bad_words_token_ids is None or not bad_words_token_ids[row]):
                continue  # the common row: nothing banned (no set built for it)
            banned: set[int] = set()
            if below_min_tokens:
                banned.update(p.stop_token_ids)
                if not p.ignore_eos:
                    banned.update(eos_sets[row])
            if bad_words_token_ids is not None:
                banned.update(_bad_word_bans(bad_words_token_ids[row], output))
            banned = {t for t in banned if 0 <= t < vocab_size}
            ban_flat_ids.extend(row * vocab_size + t for t in sorted(banned))

        seeds = [
            None if p.seed is None or p.is_greedy else _step_seed(p.seed, count)
            for p, count in zip(params, counts, strict=True)
        ]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        bias_ids, bias_values = _logit_biases(params, vocab_size, device)
        return cls(
            vocab_size=vocab_size,
            all_greedy=all(greedy),
            all_random=bool(greedy) and not any(greedy),  # NOTE: an empty batch is all greedy, not both
            # NOTE: an all-greedy batch (the common decode case) needs no per-row tensors at all.
            is_greedy=None if all(greedy) else torch.tensor(greedy, dtype=torch.bool, device=device),
            temperature=None
            if all(greedy)
            else floats([1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)]),
            top_k=torch.tensor(top_ks, dtype=torch.int64, device=device) if has_top_k else None,
            max_top_k=max(top_ks, default=vocab_size),
            top_p=floats([p.top_p for p in params]) if any(p.top_p < 1.0 for p in params) else None,
            min_p=floats([p.min_p for p in params]) if any(p.min_p > 0.0 for p in params) else None,
            repetition_penalty=floats(rep, column=True) if seen_mask is not None else None,
            seen_mask=seen_mask,
            presence_penalty=floats(presence, column=True) if output_counts is not None else None,
            frequency_penalty=floats(frequency, column=True) if output_counts is not None else None,
            output_counts=output_counts,
            banned_flat_ids=(
                torch.tensor(ban_flat_ids, dtype=torch.int64, device=device) if ban_flat_ids else None
            ),
            seeds=seeds,
            max_num_logprobs=max(asked) if asked else None,
            need_logprobs=bool(asked),
            logit_bias_flat_ids=bias_ids,
            logit_bias_values=bias_values,
        )


@dataclass
class SamplerOutput:
    """What the sampler returns for one step; row i is request i."""

    sampled_token_ids: torch.Tensor  # [num_seqs] int64
    logprobs: torch.Tensor | None = None  # [num_seqs] float32: log p(sampled token), raw logits; if asked
    top_logprobs: torch.Tensor | None = None  # [num_seqs, max_num_logprobs] float32, best first
    top_token_ids: torch.Tensor | None = None  # [num_seqs, max_num_logprobs] int64


class Sampler(torch.nn.Module):
    """Samples one token per row of logits under each row's parameters (`RowParams`) (see the module doc)."""

    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample from `logits` ([num_seqs, vocab_size], any float dtype); the input is not modified."""
        raw = logits
        changes = (
            batch.repetition_penalty is not None
            or batch.output_counts is not None
            or batch.logit_bias_flat_ids is not None
        )
        if batch.all_greedy and not changes and batch.banned_flat_ids is None and batch.guided is None:
            # NOTE: a plain greedy batch reads the logits as they are: widening to float32 keeps their order.
            logits = raw
        else:
            # NOTE: always a new contiguous float32 copy (`.to(float32)` returns the caller's tensor when it
            # is float32 already; the in-place steps below must not touch it).
            logits = torch.empty(raw.shape, dtype=torch.float32, device=raw.device).copy_(raw)
            if batch.logit_bias_flat_ids is not None:
                logits.view(-1).index_add_(0, batch.logit_bias_flat_ids, batch.logit_bias_values)
            logits = apply_penalties(logits, batch)
            if batch.banned_flat_ids is not None:
                # NOTE: index_fill_ on the flat view; `logits[rows, cols] = -inf` syncs with the host on CUDA.
                logits.view(-1).index_fill_(0, batch.banned_flat_ids, float("-inf"))
            if batch.guided is not None:
                batch.guided.apply_(logits)  # grammar masks: disallowed tokens -inf (guided_mask.py)

        greedy_ids = logits.argmax(dim=-1) if not batch.all_random else None
        if batch.all_greedy:
            assert greedy_ids is not None
            sampled = greedy_ids
        else:
            probs = filtered_probs(logits, batch)
            sampled = probs.div_(_exponential_noise(probs, batch.seeds)).argmax(dim=-1)
            if greedy_ids is not None:
                sampled = torch.where(batch.is_greedy, greedy_ids, sampled)

        output = SamplerOutput(sampled_token_ids=sampled)
        if not batch.need_logprobs:
            return output  # NOTE: a 128k-wide logsumexp per row is not free; skip it when nobody asks
        log_normalizer = torch.logsumexp(raw.float(), dim=-1, keepdim=True)  # [num_seqs, 1]
        output.logprobs = (raw.gather(1, sampled.unsqueeze(1)).float() - log_normalizer).squeeze(1)
        if batch.max_num_logprobs:
            top_values, top_ids = raw.topk(batch.max_num_logprobs, dim=-1)
            output.top_logprobs = top_values.float() - log_normalizer
            output.top_token_ids = top_ids
        return output


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty (HF: seen positive logits / p, negative * p), then presence and frequency
    penalties (OpenAI: logit -= presence * (count > 0) + frequency * count). In place on `logits`."""
    if batch.repetition_penalty is not None:
        assert batch.seen_mask is not None
        penalty = batch.repetition_penalty
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.seen_mask, penalized, logits)
    if batch.output_counts is not None:
        assert batch.presence_penalty is not None and batch.frequency_penalty is not None
        counts = batch.output_counts
        logits -= batch.presence_penalty * (counts > 0) + batch.frequency_penalty * counts
    return logits


def filtered_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p; dropped tokens get 0. In place."""
    logits.div_(batch.temperature.unsqueeze(1))
    if batch.top_p is not None:
        logits = _top_k_top_p_by_sort(logits, batch.top_k, batch.top_p)
    elif batch.top_k is not None:
        logits = _top_k_only(logits, batch.top_k, batch.max_top_k)
    probs = logits.softmax(dim=-1)
    if batch.min_p is not None:
        threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p.unsqueeze(1)
        probs.masked_fill_(probs < threshold, 0.0)
    return probs


def _top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep exactly top_k[i] tokens per row (ties broken by `topk`'s order); no full sort."""
    values, indices = logits.topk(max_top_k, dim=-1)  # [num_seqs, max_top_k], best first
    rank = torch.arange(max_top_k, device=logits.device)
    values.masked_fill_(rank >= top_k.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, indices, values)


def _top_k_top_p_by_sort(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k then top-p (the smallest set of best tokens whose probability reaches top_p; the best
    token is always kept), through one ascending sort per row."""
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # ascending: the best token is last
    vocab_size = logits.shape[-1]
    if top_k is not None:
        position = torch.arange(vocab_size, device=logits.device)
        sorted_logits.masked_fill_(position < (vocab_size - top_k).unsqueeze(1), float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # NOTE: ascending cumsum at a token = 1 - (mass of the better tokens); drop it when the better
    # tokens alone reach top_p.
    drop = cumulative <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def _exponential_noise(probs: torch.Tensor, seeds: list[int | None]) -> torch.Tensor:
    """E ~ Exp(1) of probs' shape: the global RNG for unseeded rows, a per-row generator otherwise."""
    noise = torch.empty_like(probs).exponential_()
    for row, seed in enumerate(seeds):
        if seed is not None:
            generator = torch.Generator(device=probs.device).manual_seed(seed)
            noise[row].exponential_(generator=generator)
    return noise


def _step_seed(seed: int, num_output_tokens: int) -> int:
    """Mix (seed, step) into one 63-bit seed (splitmix64's finalizer), the same on every device."""
    x = (seed * 0x9E3779B97F4A7C15 + num_output_tokens + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def _token_mask(token_ids: list[list[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """[num_seqs, vocab_size] bool: True where the row's token list holds the token."""
    mask = torch.zeros(len(token_ids), vocab_size, dtype=torch.bool, device=device)
    rows, cols = _flatten(token_ids, device)
    mask.view(-1).index_fill_(0, rows * vocab_size + cols, True)
    return mask


def _token_counts(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """[num_seqs, vocab_size] float32: how often each token occurs in the row's list."""
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.float32, device=device)
    rows, cols = _flatten(token_ids, device)
    counts.index_put_((rows, cols), torch.ones_like(cols, dtype=torch.float32), accumulate=True)
    return counts


def _flatten(
    token_ids: Sequence[Sequence[int]], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of each token, token id) of a ragged list of token lists, as two int64 tensors."""
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)
    cols = torch.tensor(list(itertools.chain.from_iterable(token_ids)), dtype=torch.int64)
    return rows.to(device), cols.to(device)


def _logit_biases(
    params: Sequence[RowParams], vocab_size: int, device: torch.device | str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(row * vocab_size + token id, bias) of every row's ``logit_bias``, as two tensors; (None, None) when
    no row has one (the common batch: no tensor, no copy)."""
    flat_ids: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        if p.logit_bias:
            for token_id, bias in p.logit_bias.items():
                flat_ids.append(row * vocab_size + token_id)
                values.append(bias)
    if not flat_ids:
        return None, None
    return (
        torch.tensor(flat_ids, dtype=torch.int64, device=device),
        torch.tensor(values, dtype=torch.float32, device=device),
    )


def _bad_word_bans(bad_words: Sequence[Sequence[int]], output: Sequence[int]) -> list[int]:
    """The last token of each bad word whose other tokens end the output (vLLM's semantics)."""
    bans = []
    for word in bad_words:
        prefix = list(word[:-1])
        if word and (not prefix or list(output[len(output) - len(prefix) :]) == prefix):
            bans.append(word[-1])
    return bans
