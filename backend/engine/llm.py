"""``inflight.LLM``: offline batched generation over the engine."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from inflight.backend.engine import gc_freeze
from inflight.backend.engine.args import EngineArgs
from inflight.backend.engine.engine import LLMEngine
from inflight.backend.engine.outputs import CompletionOutput
from inflight.backend.engine.prompts import Prompt
from inflight.backend.engine.sampling_params import SamplingParams
from inflight.batching import QueueFullError

logger = logging.getLogger("inflight")


class LLM:
    """Load a Hugging Face checkpoint folder and generate for many prompts at once.

    >>> llm = LLM(".cache/models/SmolLM2-135M-Instruct")
    >>> out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
    >>> out[0].text
    """

    def __init__(self, model: str, **engine_options: Any) -> None:
        self.engine = LLMEngine(EngineArgs.from_options(model, engine_options))
        self._next_id = 0

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes now (they are also stopped at interpreter exit)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[CompletionOutput]:
        """Generate for each prompt (text, chat messages, or token ids); outputs come back in prompt order.

        With ``SamplingParams.n`` > 1 a prompt's output is its sequence 0, and ``.outputs`` lists all n
        (``index`` 0 .. n-1, vLLM's shape); with n == 1 ``.outputs`` is ``[output]``.
        All prompts are validated before any is queued, so a bad one raises ``ValueError`` and runs nothing.
        """
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries for {len(prompt_list)} prompts"
                )
        # NOTE: the model, the tokenizer and then the requests are frozen for the call: a full collection
        # would walk them all (see gc_freeze); at large batches one came every few dozen steps, the GPU idle
        # meanwhile, and several came while 1,000 requests were being added.
        with gc_freeze.frozen():
            token_lists = [self.engine.prompts.token_ids(p) for p in prompt_list]  # all checked first
            for params in params_list:
                self.engine.check_params(params)
            order = [f"llm-{self._next_id + i}" for i in range(len(token_lists))]
            self._next_id += len(order)
            completions = {
                rid: [CompletionOutput(rid, ids, index=i) for i in range(params.n)]
                for rid, ids, params in zip(order, token_lists, params_list, strict=True)
            }
            admission = _Admission(self.engine, zip(order, token_lists, params_list, strict=True))
            admission.admit(first_step_only=True)
            progress = _progress(len(order)) if use_tqdm else None
            while self.engine.has_unfinished_requests() or admission.left:
                for delta in self.engine.step(admission.admit if admission.left else None):
                    completions[delta.request_id][delta.index].add(delta)
                    if delta.finished and progress is not None:
                        progress.update(1)
        if progress is not None:
            progress.close()
        return [_first_with_all(completions[rid]) for rid in order]


def _first_with_all(sequences: list[CompletionOutput]) -> CompletionOutput:
    first = sequences[0]
    if len(sequences) > 1:
        first.sequences = sequences
    return first


class _Admission:
    """Queues ``generate``'s requests in order, a step's worth ahead: before the first step only what that
    step can take, then from each step's ``while_gpu_runs`` until the waiting queue holds ``max_num_seqs``
    (the most a step can take in), never past ``max_queue_size``.

    NOTE: adding a request costs host time (1,000 prompts of 1,000 tokens: ~0.4 s on an H100's host, their
    block hashes and detokenizers); added all before the first step, or all while it runs, the GPU waited
    for them (a 419 ms gap after the first 1000/1000 step, 2026-11-22)."""

    def __init__(self, engine: LLMEngine, requests: Iterable[tuple[str, list[int], SamplingParams]]) -> None:
        self.engine = engine
        self.queue = deque(requests)

    @property
    def left(self) -> bool:
        return bool(self.queue)

    def admit(self, first_step_only: bool = False) -> None:
        engine, queue = self.engine, self.queue
        max_num_seqs, max_tokens = engine.args.max_num_seqs, engine.max_batched_tokens
        tokens, added = 0, False
        while queue and engine.num_waiting < max_num_seqs:
            if first_step_only and tokens >= max_tokens:
                break
            request_id, ids, params = queue[0]
            try:
                engine.add_checked_request(request_id, ids, params)
            except QueueFullError:
                if not engine.has_unfinished_requests():
                    raise  # an empty queue that refuses: no step would make room (not a hang)
                break
            queue.popleft()
            tokens, added = tokens + len(ids), True
        if added:
            gc_freeze.refreeze()  # the requests just added too


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    """One prompt (a string, a chat, a token-id list) or a list of them."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts:
        first = prompts[0]
        if isinstance(first, int | Mapping):
            return [prompts]  # one token-id prompt or one chat
        return list(prompts)
    raise ValueError("prompts must be a non-empty string, list of token ids, chat, or a list of those")


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")
