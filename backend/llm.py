"""``inflight.LLM``: offline batched generation over the engine."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from . import gc_freeze
from .engine import LLMEngine
from .engine_args import EngineArgs
from .inputs import Prompt
from .outputs import CompletionOutput
from .sampling_params import SamplingParams

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
            token_lists = [self.engine.prompts.token_ids(p) for p in prompt_list]
            completions: dict[str, CompletionOutput] = {}
            order: list[str] = []
            for ids, params in zip(token_lists, params_list, strict=True):
                request_id = f"llm-{self._next_id}"
                self._next_id += 1
                self.engine.add_request(request_id, ids, params)
                completions[request_id] = CompletionOutput(request_id, ids)
                order.append(request_id)
            gc_freeze.refreeze()  # the requests just added too
            progress = _progress(len(order)) if use_tqdm else None
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    completions[delta.request_id].add(delta)
                    if delta.finished and progress is not None:
                        progress.update(1)
        if progress is not None:
            progress.close()
        return [completions[rid] for rid in order]


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
