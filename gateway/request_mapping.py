"""OpenAI request fields -> the llm model's Triton inputs (model_repository/llm/config.pbtxt).

The client floor (`inflight.client.request.build_inputs`) writes the prompt, the scalar sampling inputs, the
`sampling_parameters` JSON and the `return_*` flags; this module adds what only the gateway sends: `n`,
`logit_bias`, `tools`, `guided_json`, `prompt_logprobs`, and `"max_tokens": null` (up to the context length)
when the client gave no limit. A field that needs an input the model does not declare is a 400 naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tritonclient.grpc import InferInput

from inflight.client.grpc_stream import to_infer_input
from inflight.client.request import RequestInput, build_inputs

from .errors import invalid
from .generation import TritonRequest
from .schemas import SamplingFields
from .triton import ModelInfo

# SamplingFields that travel as they are (the client floor's names are vLLM's, like OpenAI's).
_PASSED = (
    "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop", "top_k", "min_p",
    "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
    "include_stop_str_in_output",
)  # fmt: skip


def check_max_tokens(model: ModelInfo, max_tokens: int | None, param: str) -> None:
    """A limit past the whole context is refused before anything is sent (the prompt's share is checked
    when its token count comes back, `Generation`)."""
    if max_tokens is not None and model.max_model_len is not None and max_tokens > model.max_model_len:
        raise invalid(
            param,
            f"{param} is {max_tokens}, more than this model's maximum context length "
            f"({model.max_model_len} tokens)",
        )


def sampling_options(req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    """The `sampling` mapping of `build_inputs` (None values are left out by it)."""
    options: dict[str, Any] = {name: getattr(req, name) for name in _PASSED}
    options["logprobs"] = logprobs
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    else:
        # NOTE: absent, the llm model keeps its own default (16, vLLM's); null asks for the whole context.
        options["sampling_parameters"] = {"max_tokens": None}
    return options


def require_input(model: ModelInfo, name: str, param: str, what: str) -> None:
    if not model.accepts(name):
        raise invalid(param, f"{param}: {what} is not supported by model {model.name!r} (no {name} input)")


def extra_inputs(
    model: ModelInfo, req: SamplingFields, n: int, guided_json: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None, prompt_logprobs: int | None = None,
) -> list[RequestInput]:  # fmt: skip
    """The inputs beyond the client floor's: n, logit_bias, tools, guided_json, prompt_logprobs."""
    extra: list[RequestInput] = []
    if n > 1 and model.accepts("n"):
        extra.append(RequestInput("n", "INT32", [n]))
    if req.logit_bias:
        require_input(model, "logit_bias", "logit_bias", "logit_bias")
        biases = {str(int(k)): float(v) for k, v in req.logit_bias.items()}
        extra.append(RequestInput("logit_bias", "BYTES", [json.dumps(biases)]))
    if tools:
        require_input(model, "tools", "tools", "tools")
        extra.append(RequestInput("tools", "BYTES", [json.dumps(list(tools))]))
    if guided_json is not None:
        extra.append(RequestInput("guided_json", "BYTES", [guided_json]))
    if prompt_logprobs is not None:
        extra.append(RequestInput("prompt_logprobs", "INT32", [prompt_logprobs]))
    return extra


def plan_requests(
    model: ModelInfo,
    req: SamplingFields,
    prompts: Sequence[dict[str, Any]],
    sampling: dict[str, Any],
    extra: Sequence[RequestInput],
) -> list[TritonRequest]:
    """One Triton request per prompt (`prompts`: keyword arguments of `build_inputs`: prompt / messages /
    input_ids), each generating `req.n` choices: through the `n` input when the model has one, else as
    `n` requests (seeds `seed + i`, so that a seeded request still gets n different samples)."""
    n = req.n
    native_n = model.accepts("n")
    requests: list[TritonRequest] = []
    for prompt_index, prompt in enumerate(prompts):
        offsets = [0] if native_n or n == 1 else list(range(n))
        for offset in offsets:
            options = dict(sampling)
            if not native_n and n > 1 and options.get("seed") is not None:
                options["seed"] = (options["seed"] + offset) % 2**63
            specs = build_inputs(
                prompt.get("prompt"), prompt.get("messages"), prompt.get("input_ids"), True, options
            )
            specs += extra
            requests.append(
                TritonRequest(
                    inputs=_infer_inputs(specs),
                    choice_offset=prompt_index * n + offset,
                    prompt_index=prompt_index,
                    prompt_text=prompt.get("prompt"),
                )
            )
    return requests


def _infer_inputs(specs: Sequence[RequestInput]) -> list[InferInput]:
    return [to_infer_input(spec) for spec in specs]
