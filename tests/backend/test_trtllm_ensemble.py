"""The ensemble model's logic without a server: TensorRT-LLM tensors into llm requests (the mapping rules,
first principles), llm replies into TensorRT-LLM's output shapes, and the fan-in's one final response
(rows driven one after another in this thread, so every order is exact)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from inflight.backend.serving.request import ErrorKind, ServiceError
from inflight.backend.serving.trtllm_ensemble import EnsembleRequest, LlmReply
from inflight.backend.serving.trtllm_ensemble_inputs import (
    RowRequest,
    ensemble_outputs,
    parse_ensemble_request,
)


def _request(batch: int = 1, **tensors: np.ndarray) -> dict[str, np.ndarray]:
    prompts = np.array([[f"prompt {i}"] for i in range(batch)], dtype=object)
    return {"text_input": prompts, "max_tokens": np.full((batch, 1), 8, np.int32), **tensors}


def _options(row: RowRequest) -> dict:
    return json.loads(row.llm_inputs["sampling_parameters"][0])


def test_each_row_becomes_one_llm_request_with_its_own_words_and_values() -> None:
    rows = parse_ensemble_request(_request(
        2,
        stop_words=np.array([["END", ""], ["STOP", "HALT"]], dtype=object),  # "" pads the shorter row
        bad_words=np.array([[" Paris"], [""]], dtype=object),
        min_length=np.array([[2], [3]], np.int32),
        random_seed=np.array([[5], [6]], np.uint64),
        end_id=np.array([[2], [7]], np.int32),
        stream=np.array([[True], [False]]),
        exclude_input_in_output=np.array([[True], [True]]),
    ))  # fmt: skip
    assert [row.batch_index for row in rows] == [0, 1]
    assert [row.stream for row in rows] == [True, False]
    assert [row.llm_inputs["text_input"].tolist() for row in rows] == [[b"prompt 0"], [b"prompt 1"]]
    first, second = (_options(row) for row in rows)
    assert first == {"max_tokens": 8, "min_tokens": 2, "seed": 5, "temperature": 0.0, "stop_token_ids": [2],
                     "bad_words": [" Paris"], "stop": ["END"], "include_stop_str_in_output": True}  # fmt: skip
    assert second == {"max_tokens": 8, "min_tokens": 3, "seed": 6, "temperature": 0.0, "stop_token_ids": [7],
                      "stop": ["STOP", "HALT"], "include_stop_str_in_output": True}  # fmt: skip
    assert "return_logprobs" not in rows[0].llm_inputs


@pytest.mark.parametrize(
    ("top_k", "top_p", "temperature", "expected"),
    [
        (None, None, 0.7, {"temperature": 0.0}),  # TensorRT-LLM's defaults (top_k 1, top_p 0): greedy
        (0, 0.0, 0.7, {"temperature": 0.0}),
        (1, None, 0.7, {"temperature": 0.0}),
        (40, None, 0.7, {"temperature": 0.7, "top_k": 40}),
        (0, 0.9, None, {"temperature": 1.0, "top_p": 0.9}),
        (40, 0.0, 0.5, {"temperature": 0.5, "top_k": 40}),  # a top_p of 0 is off
        (None, 1.0, 1.0, {"temperature": 1.0, "top_p": 1.0}),
    ],
)
def test_sampling_follows_tensorrt_llms_greedy_rule(top_k, top_p, temperature, expected) -> None:
    tensors = {
        name: np.array([[value]], dtype)
        for name, value, dtype in (
            ("top_k", top_k, np.int32),
            ("top_p", top_p, np.float32),
            ("temperature", temperature, np.float32),
        )  # fmt: skip
        if value is not None
    }
    (row,) = parse_ensemble_request(_request(**tensors))
    options = _options(row)
    assert {k: v for k, v in options.items() if k != "max_tokens"} == pytest.approx(expected)


@pytest.mark.parametrize(
    ("tensors", "message_start"),
    [
        ({"min_length": np.array([[9]], np.int32)}, "min_length must be at most max_tokens"),
        ({"min_tokens": np.array([[9]], np.int32)}, "min_tokens must be at most max_tokens"),
        ({"end_id": np.array([[-1]], np.int32)}, "end_id must be a token id"),
        (
            {"min_length": np.array([[1]], np.int32), "min_tokens": np.array([[1]], np.int32)},
            "min_length and",
        ),
        ({"beam_width": np.array([[2]], np.int32)}, "beam_width must be 1"),
        ({"pad_id": np.array([[-3]], np.int32)}, "pad_id must be"),
        ({"guided_decoding_guide": np.array([["{}"]], object)}, "guided_decoding_guide needs"),
    ],
)
def test_bad_values_are_named_by_the_tensor_the_client_sent(tensors, message_start: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_ensemble_request(_request(**tensors))
    assert str(info.value).startswith(message_start), str(info.value)


def test_a_bad_row_of_a_batch_is_named_by_its_batch_index() -> None:
    with pytest.raises(ValueError, match=r"^batch_index 1: text_input is empty"):
        parse_ensemble_request(_request(2) | {"text_input": np.array([["a"], [""]], dtype=object)})


def test_tensors_of_another_batch_size_are_refused() -> None:
    with pytest.raises(ValueError, match="temperature must have batch size 2"):
        parse_ensemble_request(_request(2, temperature=np.ones((3, 1), np.float32)))


def test_guide_types_map_to_llms_guided_inputs() -> None:
    def guided(kind: str, guide: str | None) -> dict:
        tensors = {"guided_decoding_guide_type": np.array([[kind]], object)}
        if guide is not None:
            tensors["guided_decoding_guide"] = np.array([[guide]], object)
        (row,) = parse_ensemble_request(_request(**tensors))
        return {k: v.tolist() for k, v in row.llm_inputs.items() if k.startswith("guided")}

    assert guided("json_schema", '{"type": "object"}') == {"guided_json": [b'{"type": "object"}']}
    assert guided("regex", "[a-z]+") == {"guided_regex": [b"[a-z]+"]}
    assert guided("json", None) == {"guided_json": [b"{}"]}  # any JSON value


def test_outputs_take_tensorrt_llms_shapes() -> None:
    row = RowRequest(3, {}, return_log_probs=True)
    logprobs = json.dumps(
        [{"token_id": 5, "logprob": -0.5, "top": {}}, {"token_id": 9, "logprob": -1.25, "top": {}}]
    )
    out = ensemble_outputs({
        "text_output": np.array([b" Paris."], object), "sequence_index": np.array([2], np.uint32),
        "cumulative_logprob": np.array([-1.75], np.float32), "logprobs": np.array([logprobs.encode()], object),
    }, row)  # fmt: skip
    assert out["text_output"].tolist() == [b" Paris."]
    assert out["batch_index"].tolist() == [[3]] and out["batch_index"].dtype == np.int32
    assert out["sequence_index"].tolist() == [[2]] and out["sequence_index"].dtype == np.int32
    assert out["cum_log_probs"].tolist() == [[-1.75]]
    assert out["output_log_probs"].tolist() == [[[-0.5, -1.25]]]
    plain = ensemble_outputs({"text_output": np.array([b"x"], object)}, RowRequest(0, {}))
    assert sorted(plain) == ["batch_index", "sequence_index", "text_output"]


# --- the fan-in: every request gets exactly one final response ---------------------------------------------


class Sink:
    """Records what the request sends; `cancel_after` sends, it reports the client gone."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.sent: list[dict[str, np.ndarray]] = []
        self.finals: list[ServiceError | None] = []
        self.cancel_after = cancel_after
        self.polls = 0

    def send(self, outputs: dict[str, np.ndarray]) -> None:
        assert not self.finals, "nothing may be sent after the final response"
        self.sent.append(outputs)

    def finish(self, error: ServiceError | None) -> None:
        self.finals.append(error)

    def is_cancelled(self) -> bool:
        assert not self.finals, "no cancellation check after the final response"
        self.polls += 1
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after


def _text(reply_text: str) -> LlmReply:
    return LlmReply(outputs={"text_output": np.array([reply_text.encode()], object)})


class Stream:
    """A row's llm replies, with a `cancel` that records being called."""

    def __init__(self, replies: list[LlmReply]) -> None:
        self.replies = replies
        self.num_read = 0
        self.cancelled = False

    def __iter__(self) -> Iterator[LlmReply]:
        for reply in self.replies:
            self.num_read += 1
            yield reply

    def cancel(self) -> None:
        self.cancelled = True


def _rows(n: int) -> list[RowRequest]:
    return [RowRequest(i, {}) for i in range(n)]


def test_the_final_goes_out_once_after_the_last_row() -> None:
    sink, rows = Sink(), _rows(3)
    streams = {0: Stream([_text("a"), _text("b")]), 1: Stream([]), 2: Stream([_text("c")])}
    request = EnsembleRequest(rows, sink, lambda row: streams[row.batch_index], cancel_poll_s=0.0)
    for row in rows:
        assert sink.finals == []
        request.run_row(row)
    assert sink.finals == [None]
    assert [(o["batch_index"].item(), o["text_output"][0]) for o in sink.sent] == [
        (0, b"a"),
        (0, b"b"),
        (2, b"c"),
    ]


def test_row_errors_end_the_request_with_one_error_naming_each_row() -> None:
    sink, rows = Sink(), _rows(3)
    bad = ServiceError(ErrorKind.INVALID_ARG, "prompt too long")
    streams = {0: Stream([_text("a")]), 1: Stream([LlmReply(error=bad)]), 2: Stream([LlmReply(error=bad)])}

    def stream_row(row: RowRequest) -> Stream:
        return streams[row.batch_index]

    request = EnsembleRequest(rows, sink, stream_row, cancel_poll_s=0.0)
    for row in reversed(rows):
        request.run_row(row)
    (final,) = sink.finals
    assert final == ServiceError(
        ErrorKind.INVALID_ARG, "batch_index 1: prompt too long; batch_index 2: prompt too long"
    )
    assert len(sink.sent) == 1


def test_a_row_that_raises_still_ends_the_request() -> None:
    sink, rows = Sink(), _rows(1)

    def broken(row: RowRequest) -> Iterator[LlmReply]:
        yield _text("a")
        raise RuntimeError("stub gone")

    EnsembleRequest(rows, sink, broken, cancel_poll_s=0.0).run_row(rows[0])
    assert sink.finals == [ServiceError(ErrorKind.INTERNAL, "RuntimeError: stub gone")]


def test_a_cancelled_request_is_answered_at_once_and_its_rows_drain_silently() -> None:
    sink, rows = Sink(cancel_after=1), _rows(2)
    streams = {0: Stream([_text("a"), _text("b"), _text("c")]), 1: Stream([_text("d")])}
    request = EnsembleRequest(rows, sink, lambda row: streams[row.batch_index], cancel_poll_s=0.0)
    request.run_row(rows[0])
    # The client went away after the first response: the final (CANCELLED) is out before row 1 even ran.
    assert [o["text_output"][0] for o in sink.sent] == [b"a"]
    assert sink.finals == [ServiceError(ErrorKind.CANCELLED, "the request was cancelled")]
    assert streams[0].num_read == 3 and streams[0].cancelled  # read to its end; cancel() where Triton has it
    request.run_row(rows[1])
    assert len(sink.sent) == 1 and len(sink.finals) == 1 and sink.polls == 1
