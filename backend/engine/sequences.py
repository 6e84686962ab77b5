"""Parallel sampling (``SamplingParams.n``): a request of n sequences, each an engine request of its own.

The engine queues sequence i of request ``r`` as ``sequence_id(r, i)`` with ``sequence_params(params, i)``;
the n share the prompt's full KV blocks (``batching.PromptGroup``) and sample independently. Their outputs
carry ``r`` and ``index`` i; the request finishes when its last sequence does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from inflight.backend.engine.sampling_params import MAX_SEED, SamplingParams


@dataclass
class RequestSequences:
    """The n sequences of one request (n > 1): their ids and how many are unfinished."""

    sequence_ids: list[str]
    num_unfinished: int


def sequence_id(request_id: str, index: int) -> str:
    """The engine's (and the scheduler's) id of sequence ``index`` of a request with n > 1."""
    return f"{request_id}#{index}"


def sequence_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sequence ``index``'s parameters: n = 1, the seed ``seed + index`` (vLLM's: each sequence reproducible,
    no two alike), the prompt's logprobs on sequence 0 only."""
    seed = None if params.seed is None else (params.seed + index) % (MAX_SEED + 1)
    return dataclasses.replace(
        params, n=1, seed=seed, prompt_logprobs=params.prompt_logprobs if index == 0 else None
    )
