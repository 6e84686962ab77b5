"""Turns engine output into the Triton model's output tensors (numpy), as declared in config.pbtxt."""

from __future__ import annotations

import json

import numpy as np

from inflight.backend.engine.outputs import RequestOutput, TokenLogprob
from inflight.backend.serving.request import GenerateRequest


def _strings(*values: str) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


def logprobs_json(logprobs: list[TokenLogprob] | list[TokenLogprob | None]) -> str:
    """One JSON object per token: ``{"token_id": id, "logprob": lp, "top": {id: lp, ...}}`` (null for a
    prompt's first token, which has none)."""
    return json.dumps(
        [
            None
            if lp is None
            else {"token_id": lp.token_id, "logprob": lp.logprob, "top": {str(t): v for t, v in lp.top}}
            for lp in logprobs
        ]
    )


def build_outputs(
    request: GenerateRequest,
    text: str,
    token_ids: list[int],
    logprobs: list[TokenLogprob],
    out: RequestOutput,
    num_input_tokens: int,
    num_output_tokens: int,
    prompt_logprobs: list[TokenLogprob | None] | None = None,
) -> dict[str, np.ndarray]:
    """The output tensors of one response of sequence ``out.index``: always ``text_output``, ``output_ids``
    and ``sequence_index``, the rest when asked (``prompt_logprobs``: on the one response that carries them,
    see ``EngineService``; ``finish_reason``: on the sequence's last)."""
    tensors = {
        "text_output": _strings(text),
        "output_ids": np.asarray(token_ids, dtype=np.int32),
        "sequence_index": np.array([out.index], dtype=np.uint32),
    }
    if request.return_finish_reason and out.finish_reason is not None:
        tensors["finish_reason"] = _strings(out.finish_reason or "")
    if request.return_cumulative_logprob:
        tensors["cumulative_logprob"] = np.array([out.cumulative_logprob or 0.0], dtype=np.float32)
    if request.return_logprobs:
        tensors["logprobs"] = _strings(logprobs_json(logprobs))
    if request.return_num_input_tokens:
        tensors["num_input_tokens"] = np.array([num_input_tokens], dtype=np.uint32)
    if request.return_num_output_tokens:
        tensors["num_output_tokens"] = np.array([num_output_tokens], dtype=np.uint32)
    if prompt_logprobs is not None:
        tensors["prompt_logprobs"] = _strings(logprobs_json(prompt_logprobs))
    return tensors
