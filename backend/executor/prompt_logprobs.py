"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``): which rows of a step give them, and the
computation.

The row of a prompt token at position p predicts the token at p + 1, so a chunk of a request's prompt gives
the log-probabilities of the prompt tokens after each of its positions, up to position ``len(prompt) - 2``
(the chunk's last row predicts the next chunk's first token; the prompt's last position is the sampled
row, whose next token is no prompt token). Only requests that ask get these rows, and only steps with
such rows compute them: the logits of the extra rows, in slices, under the raw distribution (fp32
log-softmax over the whole vocabulary, before temperature or penalties, as the sampled tokens' logprobs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from inflight.batching import SchedulerOutput

# NOTE: the logits of this many rows at most are alive at once ([rows, vocab] in fp32: 128k vocab, 64 MiB).
SLICE_ROWS = 128


@dataclass
class PromptLogprobRequest:
    """What the executor needs of a request that wants its prompt's log-probabilities."""

    num_top: int  # top alternatives per position (0: the prompt token's own logprob only)
    prompt_token_ids: list[int]
    first_position: int = 0  # positions before this one are known already (a recomputed prompt)


@dataclass
class PromptRows:
    """A step's prompt-logprob rows: flat-batch rows, the prompt token each predicts, and which request's
    positions they are (``segments``: (request id, first position, number of rows), in row order)."""

    rows: list[int]
    targets: list[int]
    segments: list[tuple[str, int, int]]
    num_top: int  # the largest num_top of the step's requests


@dataclass
class PromptLogprobs:
    """One request's prompt log-probabilities from one step, on the host: entry j is about the prompt token
    at position ``start + j + 1``, as predicted at position ``start + j``."""

    request_id: str
    start: int
    logprobs: list[float]  # of the prompt token itself
    top_token_ids: list[list[int]]  # the step's largest num_top best, best first (a request takes its own)
    top_logprobs: list[list[float]]


def prompt_rows(
    out: SchedulerOutput, query_start_loc: list[int], wanted: Mapping[str, PromptLogprobRequest]
) -> PromptRows | None:
    """The rows of ``out``'s flat batch (``query_start_loc``: where each request's tokens start) that give
    prompt log-probabilities of the ``wanted`` requests; None when there are none."""
    rows: list[int] = []
    targets: list[int] = []
    segments: list[tuple[str, int, int]] = []
    num_top = 0
    for i, entry in enumerate(out.scheduled):
        want = wanted.get(entry.request_id)
        if want is None:
            continue
        start = max(entry.start_position, want.first_position)
        stop = min(entry.start_position + len(entry.token_ids), len(want.prompt_token_ids) - 1)
        if start >= stop:
            continue
        offset = query_start_loc[i] - entry.start_position
        rows += range(start + offset, stop + offset)
        targets += want.prompt_token_ids[start + 1 : stop + 1]
        segments.append((entry.request_id, start, stop - start))
        num_top = max(num_top, want.num_top)
    return PromptRows(rows, targets, segments, num_top) if rows else None


@dataclass
class PromptLogprobTensors:
    """``compute`` 's result on the device (or copied to the host), split by ``PromptRows.segments``."""

    logprobs: torch.Tensor  # [num_rows] fp32
    top_logprobs: torch.Tensor  # [num_rows, num_top] fp32
    top_token_ids: torch.Tensor  # [num_rows, num_top] int64

    def to_host(self, segments: list[tuple[str, int, int]]) -> list[PromptLogprobs]:
        logprobs, top_lp, top_ids = (
            t.tolist() for t in (self.logprobs, self.top_logprobs, self.top_token_ids)
        )
        results, row = [], 0
        for request_id, start, count in segments:
            end = row + count
            results.append(
                PromptLogprobs(request_id, start, logprobs[row:end], top_ids[row:end], top_lp[row:end])
            )
            row = end
        return results


def compute(
    hidden: torch.Tensor, plan: PromptRows, compute_logits: Callable[[torch.Tensor], torch.Tensor]
) -> PromptLogprobTensors:
    """The log-probabilities of ``plan.targets`` and the ``plan.num_top`` best tokens, from ``hidden`` (the
    final hidden states of ``plan.rows``, in that order), ``SLICE_ROWS`` rows at a time."""
    targets = torch.tensor(plan.targets, dtype=torch.int64).to(hidden.device, non_blocking=True)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for first in range(0, len(plan.rows), SLICE_ROWS):
        last = min(first + SLICE_ROWS, len(plan.rows))
        logprobs = compute_logits(hidden[first:last]).float().log_softmax(dim=-1)
        own = logprobs.gather(1, targets[first:last, None]).squeeze(1)
        top_values, top_ids = logprobs.topk(plan.num_top, dim=-1)
        parts.append((own, top_values, top_ids))
    own, top_values, top_ids = (torch.cat(p) for p in zip(*parts, strict=True))
    return PromptLogprobTensors(own, top_values, top_ids)
