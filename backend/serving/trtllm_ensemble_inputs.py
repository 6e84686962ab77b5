"""TensorRT-LLM's ``ensemble`` model contract: a batched request's tensors into one ``llm`` request per row,
and ``llm``'s responses back into the ensemble's output tensors.

The ensemble (``model_repository/ensemble``, ``max_batch_size`` > 0) declares the tensors of
tensorrtllm_backend's ``all_models/inflight_batcher_llm/ensemble/config.pbtxt``: every input is
``[batch, ...]``. Row ``i`` of each tensor becomes one ``llm`` request whose sampling options travel as its
``sampling_parameters`` JSON (vLLM's names). What the engine cannot do is refused, naming the tensor: a
``ValueError`` here, answered INVALID_ARG. docs/trtllm_clients.md lists every tensor and its mapping.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inflight.backend.engine.sampling_params import SamplingParams
from inflight.backend.serving.triton_inputs import decode_string

# Flags that ask for something this engine does not produce: refused when true.
REFUSED_FLAGS = {
    "return_context_logits": "context logits are not computed by this engine",
    "return_generation_logits": "generation logits are not returned by this engine",
    "return_perf_metrics": "per-request perf metrics are not returned (see the Triton metrics endpoint)",
    "return_kv_cache_reuse_stats": "KV-cache reuse statistics are not returned (see the Triton metrics endpoint)",
}
# Tensors that need a feature this engine lacks: refused whenever a request carries data in them.
REFUSED_TENSORS = {
    "decoder_text_input": "encoder-decoder models are not supported",
    "prompt_embedding_table": "prompt tuning (p-tuning embedding tables) is not supported",
    "prompt_table_extra_id": "prompt tuning (p-tuning embedding tables) is not supported",
    "embedding_bias_words": "embedding bias is not supported (logit_bias on the llm model takes token ids)",
    "embedding_bias_weights": "embedding bias is not supported (logit_bias on the llm model takes token ids)",
    "lora_task_id": "LoRA adapters are not supported",
    "lora_weights": "LoRA adapters are not supported",
    "lora_config": "LoRA adapters are not supported",
}
# TensorRT-LLM's guide types that the llm model's guided_* inputs express.
GUIDE_TYPES = ("json", "json_schema", "regex")
# NOTE: TensorRT-LLM's "json" guide is any JSON value, without a schema; the empty schema says exactly that.
ANY_JSON_SCHEMA = "{}"
# A SamplingParams field named in an error message -> the ensemble tensor the client sent it as.
_FIELD_TENSORS = {
    "min_tokens": ("min_length", "min_tokens"),
    "seed": ("random_seed", "seed"),
    "stop": ("stop_words",),
    "stop_token_ids": ("end_id",),
    "n": ("num_return_sequences",),
    "top_k": ("top_k",),
    "top_p": ("top_p",),
    "guided_json": ("guided_decoding_guide",),
    "guided_regex": ("guided_decoding_guide",),
}


@dataclass
class RowRequest:
    """One batch row of an ensemble request: the ``llm`` request to make and how to answer it."""

    batch_index: int
    # The llm model's input tensors, by name (numpy arrays of one value each, BYTES as object arrays).
    llm_inputs: dict[str, np.ndarray] = field(repr=False)
    stream: bool = False
    return_log_probs: bool = False


def parse_ensemble_request(inputs: dict[str, np.ndarray]) -> list[RowRequest]:
    """All rows of one ensemble request (``inputs``: its tensors by name), or ``ValueError`` naming the
    tensor at fault. Every row is checked before any is sent, so a bad row refuses the whole request."""
    batch_size = _batch_size(inputs)
    for name, why in REFUSED_TENSORS.items():
        if _carries_data(inputs.get(name)):
            raise ValueError(f"{name} is not supported: {why}")
    rows = []
    for i in range(batch_size):
        try:
            rows.append(_row(inputs, i))
        except ValueError as exc:
            raise ValueError(f"batch_index {i}: {exc}" if batch_size > 1 else str(exc)) from None
    return rows


def _batch_size(inputs: dict[str, np.ndarray]) -> int:
    prompts = inputs.get("text_input")
    if prompts is None:
        raise ValueError("text_input is required: the prompt, shape [batch, 1]")
    shape = np.shape(prompts)
    if len(shape) == 0 or shape[0] < 1:
        raise ValueError(f"text_input must have shape [batch, 1], got {list(shape)}")
    batch_size = int(shape[0])
    for name, value in inputs.items():
        if np.ndim(value) == 0 or np.shape(value)[0] != batch_size:
            raise ValueError(
                f"{name} must have batch size {batch_size} (text_input's) as its first dimension, "
                f"got shape {list(np.shape(value))}"
            )
    return batch_size


def _carries_data(value: np.ndarray | None) -> bool:
    if value is None:
        return False
    array = np.asarray(value)
    if array.dtype == np.object_:
        return any(decode_string("", item) for item in array.reshape(-1))
    return array.size > 0 and (array.dtype.kind not in "iu" or bool(np.any(array != 0)))


def _row(inputs: dict[str, np.ndarray], i: int) -> RowRequest:
    def scalar(name: str) -> Any:
        return _row_scalar(inputs, name, i)

    for name, why in REFUSED_FLAGS.items():
        if _flag(name, scalar(name)):
            raise ValueError(f"{name} must be false: {why}")
    beam_width = scalar("beam_width")
    if beam_width is not None and int(beam_width) != 1:
        raise ValueError(f"beam_width must be 1 (beam search is not supported), got {int(beam_width)}")
    length_penalty = scalar("length_penalty")
    if length_penalty is not None and float(length_penalty) != 1.0:
        raise ValueError(
            f"length_penalty must be 1.0 (it applies to beam search only, which is not supported), "
            f"got {float(length_penalty)}"
        )
    prompt_vocab_size = scalar("prompt_vocab_size")
    if prompt_vocab_size is not None and int(prompt_vocab_size) != 0:
        raise ValueError("prompt_vocab_size is not supported: prompt tuning (p-tuning) is not supported")
    pad_id = scalar("pad_id")  # NOTE: accepted and unused: responses carry one row's tokens, never padded
    if pad_id is not None and int(pad_id) < 0:
        raise ValueError(f"pad_id must be a token id >= 0, got {int(pad_id)}")

    options, named = _sampling_options(inputs, i, scalar)
    guided = _guided_inputs(scalar("guided_decoding_guide_type"), scalar("guided_decoding_guide"))
    try:
        SamplingParams.from_dict({**options, **{k: v[0].decode() for k, v in guided.items()}})
    except ValueError as exc:
        raise ValueError(_rename_field(str(exc), named)) from None

    stream = _flag("stream", scalar("stream"))
    return_log_probs = _flag("return_log_probs", scalar("return_log_probs"))
    llm_inputs: dict[str, np.ndarray] = {
        "text_input": _strings(decode_string("text_input", scalar("text_input"))),
        "stream": np.array([stream], dtype=np.bool_),
        "exclude_input_in_output": np.array(
            [_flag("exclude_input_in_output", scalar("exclude_input_in_output"))], dtype=np.bool_
        ),
        "sampling_parameters": _strings(json.dumps(options)),
    }
    if return_log_probs:
        llm_inputs["return_cumulative_logprob"] = np.array([True], dtype=np.bool_)
        llm_inputs["return_logprobs"] = np.array([True], dtype=np.bool_)
    llm_inputs.update(guided)
    if not llm_inputs["text_input"][0]:
        raise ValueError("text_input is empty: the prompt must hold at least one token")
    return RowRequest(i, llm_inputs, stream=stream, return_log_probs=return_log_probs)


def _sampling_options(inputs: dict[str, np.ndarray], i: int, scalar: Any) -> tuple[dict[str, Any], set[str]]:
    """The row's ``sampling_parameters`` (vLLM names) and the ensemble tensors it was given."""
    named = {name for name in inputs}
    max_tokens = scalar("max_tokens")
    if max_tokens is None:
        raise ValueError("max_tokens is required: the number of tokens to generate, shape [batch, 1]")
    options: dict[str, Any] = {"max_tokens": _int("max_tokens", max_tokens)}
    for names, key in ((("min_length", "min_tokens"), "min_tokens"), (("random_seed", "seed"), "seed")):
        given = [n for n in names if scalar(n) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are the same option: give one of them")
        if given:
            options[key] = _int(given[0], scalar(given[0]))
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        if scalar(name) is not None:
            options[name] = float(scalar(name))
    options.update(_decoding_mode(scalar("top_k"), scalar("top_p"), scalar("temperature")))
    end_id = scalar("end_id")
    if end_id is not None:
        options["stop_token_ids"] = [_int("end_id", end_id)]
        if options["stop_token_ids"][0] < 0:
            raise ValueError(f"end_id must be a token id >= 0, got {options['stop_token_ids'][0]}")
    bad_words = _row_words(inputs, "bad_words", i)
    if bad_words:
        options["bad_words"] = bad_words
    stop_words = _row_words(inputs, "stop_words", i)
    if stop_words:
        # NOTE: TensorRT-LLM keeps a stop word's tokens in its output; vLLM's default drops the stop string.
        options["stop"] = stop_words
        options["include_stop_str_in_output"] = True
    num_return_sequences = scalar("num_return_sequences")
    if num_return_sequences is not None:
        n = _int("num_return_sequences", num_return_sequences)
        if n < 1:
            raise ValueError(f"num_return_sequences must be at least 1, got {n}")
        if n > 1:
            options["n"] = n
    return options, named


def _decoding_mode(top_k: Any, top_p: Any, temperature: Any) -> dict[str, Any]:
    """TensorRT-LLM's rule: with neither top_k (> 1) nor top_p (> 0) the request is greedy, whatever its
    temperature (its defaults are top_k 1, top_p 0). Otherwise it samples; a top_k of 0 or a top_p of 0
    turns that filter off."""
    k = None if top_k is None else _int("top_k", top_k)
    p = None if top_p is None else float(top_p)
    if k is not None and k < 0:
        raise ValueError(f"top_k must be 0 (off) or at least 1, got {k}")
    if p is not None and not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"top_p must be in [0, 1] (0: off), got {p}")
    t = None if temperature is None else float(temperature)
    if t is not None and not (math.isfinite(t) and t >= 0.0):
        raise ValueError(f"temperature must be a finite number >= 0, got {t}")
    if (k is None or k <= 1) and (p is None or p == 0.0):
        return {"temperature": 0.0}
    options: dict[str, Any] = {"temperature": 1.0 if t is None else t}
    if k is not None and k > 1:
        options["top_k"] = k
    if p is not None and p > 0.0:
        options["top_p"] = p
    return options


def _guided_inputs(guide_type: Any, guide: Any) -> dict[str, np.ndarray]:
    """``guided_decoding_guide_type`` / ``_guide`` -> the llm model's ``guided_json`` or ``guided_regex``."""
    kind = decode_string("guided_decoding_guide_type", guide_type) if guide_type is not None else ""
    text = decode_string("guided_decoding_guide", guide) if guide is not None else ""
    if not kind:
        if text:
            raise ValueError(
                "guided_decoding_guide needs guided_decoding_guide_type (json, json_schema or regex)"
            )
        return {}
    if kind not in GUIDE_TYPES:
        raise ValueError(
            f"guided_decoding_guide_type must be one of {', '.join(GUIDE_TYPES)}, got {kind!r}"
            + (" (EBNF grammars are not supported)" if kind == "ebnf_grammar" else "")
        )
    if kind == "json":
        return {"guided_json": _strings(text or ANY_JSON_SCHEMA)}
    if not text:
        raise ValueError(f"guided_decoding_guide is required with guided_decoding_guide_type {kind!r}")
    return {"guided_json" if kind == "json_schema" else "guided_regex": _strings(text)}


def _rename_field(message: str, named: set[str]) -> str:
    """Name the ensemble tensor the client sent in a SamplingParams error (``min_tokens`` -> ``min_length``)."""
    match = re.match(r"(\w+)", message)
    if match is None or match.group(1) not in _FIELD_TENSORS:
        return message
    sent = [t for t in _FIELD_TENSORS[match.group(1)] if t in named]
    return (sent[0] if sent else match.group(1)) + message[match.end() :]


def _row_scalar(inputs: dict[str, np.ndarray], name: str, i: int) -> Any:
    value = inputs.get(name)
    if value is None:
        return None
    row = np.asarray(value).reshape(np.shape(value)[0], -1)[i]
    if row.size != 1:
        raise ValueError(
            f"{name} must hold one value per batch row (shape [batch, 1]), got {list(np.shape(value))}"
        )
    item = row[0]
    return item.item() if isinstance(item, np.generic) and not isinstance(item, np.bytes_) else item


def _row_words(inputs: dict[str, np.ndarray], name: str, i: int) -> list[str]:
    """Row ``i`` of a ``[batch, N]`` string tensor, empty strings (a shorter row's padding) dropped."""
    value = inputs.get(name)
    if value is None:
        return []
    row = np.asarray(value).reshape(np.shape(value)[0], -1)[i]
    return [word for word in (decode_string(name, item) for item in row) if word]


def _flag(name: str, value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bytes | np.bytes_ | str):
        text = decode_string(name, value).lower()
        if text not in ("true", "false", "1", "0"):
            raise ValueError(f"{name} must be true or false, got {text!r}")
        return text in ("true", "1")
    return bool(value)


def _int(name: str, value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be an integer, got {value}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _strings(*values: str) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


def ensemble_outputs(llm_outputs: dict[str, np.ndarray], row: RowRequest) -> dict[str, np.ndarray]:
    """One ``llm`` response's tensors as the ensemble's (TensorRT-LLM's shapes: ``text_output`` ``[1]``,
    ``batch_index`` / ``sequence_index`` ``[1, 1]``, ``cum_log_probs`` ``[1, 1]``, ``output_log_probs``
    ``[1, 1, tokens]``; the log-probabilities only with ``return_log_probs``)."""
    text = b"".join(bytes(t) for t in np.asarray(llm_outputs.get("text_output", [])).reshape(-1))
    sequence = llm_outputs.get("sequence_index")
    sequence_index = int(np.asarray(sequence).reshape(-1)[0]) if sequence is not None else 0
    outputs = {
        "text_output": np.array([text], dtype=np.object_),
        "batch_index": np.array([[row.batch_index]], dtype=np.int32),
        "sequence_index": np.array([[sequence_index]], dtype=np.int32),
    }
    if row.return_log_probs:
        cumulative = llm_outputs.get("cumulative_logprob")
        value = float(np.asarray(cumulative).reshape(-1)[0]) if cumulative is not None else 0.0
        outputs["cum_log_probs"] = np.array([[value]], dtype=np.float32)
        logprobs = llm_outputs.get("logprobs")
        entries = json.loads(bytes(np.asarray(logprobs).reshape(-1)[0])) if logprobs is not None else []
        values = [entry["logprob"] for entry in entries]
        outputs["output_log_probs"] = np.array([[values]], dtype=np.float32).reshape(1, 1, len(values))
    return outputs
