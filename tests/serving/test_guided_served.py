"""Structured output through a real tritonserver: the ``guided_json`` / ``guided_choice`` inputs (and the
``sampling_parameters`` key), outputs that validate, and a schema that does not compile refused INVALID_ARG
naming ``guided_json``, over gRPC streaming and HTTP."""

from __future__ import annotations

import json

import jsonschema
import numpy as np

from .triton_helpers import http_post, is_model_ready, run_streams

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}
MESSAGES = json.dumps([{"role": "user", "content": "Describe Paris as a JSON object."}])


def test_guided_json_output_validates(triton_server) -> None:
    common = {
        "messages": MESSAGES,
        "max_tokens": 200,
        "return_finish_reason": True,
        "exclude_input_in_output": True,
    }
    results = run_streams(triton_server.url_grpc, {
        "greedy": {**common, "temperature": 0.0, "guided_json": json.dumps(SCHEMA)},
        "sampled": {**common, "stream": True, "temperature": 1.0, "seed": np.array([7], dtype=np.uint64),
                    "sampling_parameters": json.dumps({"guided_json": SCHEMA})},
        "choice": {**common, "temperature": 1.0, "seed": np.array([3], dtype=np.uint64), "guided_choice": ["Paris", "Lyon", "Nice"]},
    })  # fmt: skip
    for name, r in results.items():
        assert not r.errors and r.num_final == 1, (name, r.errors)
        assert b"".join(r.outputs[-1]["finish_reason"].reshape(-1)).decode() == "stop", name
    for name in ("greedy", "sampled"):
        jsonschema.validate(json.loads(results[name].text), SCHEMA)
    assert results["choice"].text in ("Paris", "Lyon", "Nice")


def test_schema_that_does_not_compile_is_invalid_arg(triton_server) -> None:
    bad = json.dumps({"type": "object", "properties": {"a": {"type": "integr"}}})
    cases = [
        ({"guided_json": bad}, "guided_json does not compile"),
        ({"guided_json": "{"}, "guided_json is not valid JSON"),
        (
            {"guided_regex": "[a-z]+", "guided_choice": ["a"]},
            "exactly one of guided_json, guided_regex or guided_choice",
        ),
    ]
    for values, named in cases:
        # NOTE: one request per stream: an error response names no request id.
        r = run_streams(
            triton_server.url_grpc, {"bad": {"text_input": "hi", "max_tokens": 4, **values}}, timeout_s=30
        )["bad"]
        assert r.num_final == 1 and len(r.errors) == 1 and not r.outputs, (values, r.errors, r.outputs)
        assert named in r.errors[0], r.errors[0]
    status, text = http_post(triton_server.url_http, "/v2/models/llm/generate",
                             {"text_input": "hi", "max_tokens": 4, "guided_json": bad})  # fmt: skip
    assert status == 400 and "guided_json does not compile" in json.loads(text)["error"]
    assert is_model_ready(triton_server.url_http)
