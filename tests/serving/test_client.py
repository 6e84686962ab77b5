"""inflight.client against the real server: same greedy answer as the engine in-process, over each path."""

from __future__ import annotations

import pytest

from inflight.client import InflightClient, Result

from .prompts import CHAT, CHAT_MAX_TOKENS, MAX_TOKENS, PROMPT


def _client(server, protocol: str) -> InflightClient:
    url = server.url_grpc if protocol == "grpc" else server.url_http
    return InflightClient(url, protocol=protocol, timeout_s=120)


def _streamed(client: InflightClient, **request) -> tuple[Result, list]:
    result, deltas = Result(), []
    for delta in client.stream(**request):
        deltas.append(delta)
        result.add(delta)
    return result, deltas


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("streamed", [False, True], ids=["generate", "stream"])
def test_greedy_text_matches_engine_direct(
    triton_server, greedy_reference, protocol: str, streamed: bool
) -> None:
    expected = greedy_reference(PROMPT, MAX_TOKENS)
    client = _client(triton_server, protocol)
    request = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    if streamed:
        result, deltas = _streamed(client, **request)
        assert len(deltas) > 2, "tokens must arrive one response at a time"
        assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    else:
        result = client.generate(**request)
    assert result.text == expected.text
    assert result.token_ids == expected.token_ids
    assert result.finish_reason == expected.finish_reason
    assert result.num_input_tokens == expected.num_input_tokens
    assert result.num_output_tokens == len(expected.token_ids)


def test_chat_and_token_id_prompts_match_engine_direct(triton_server, greedy_reference) -> None:
    client = _client(triton_server, "grpc")
    expected = greedy_reference(CHAT, CHAT_MAX_TOKENS)
    result, _ = _streamed(client, messages=CHAT, max_tokens=CHAT_MAX_TOKENS, temperature=0)
    assert (result.text, result.token_ids) == (expected.text, expected.token_ids)
    assert "Paris" in result.text and result.finish_reason == "stop"
    ids = greedy_reference.llm.tokenizer.encode(PROMPT)
    by_ids = client.generate(input_ids=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert by_ids.token_ids == greedy_reference(PROMPT, MAX_TOKENS).token_ids


def test_logprobs_and_cumulative_logprob(triton_server, smollm2_path, smollm2_tokenizer) -> None:
    """Each token's logprob and its top-2 match HF transformers' log_softmax on the same ids (fp32 CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    num_top, max_tokens = 2, 6
    result, _ = _streamed(
        _client(triton_server, "grpc"), prompt=PROMPT, max_tokens=max_tokens, temperature=0, logprobs=num_top
    )
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids) == max_tokens
    prompt_ids = smollm2_tokenizer.encode(PROMPT)
    assert result.num_input_tokens == len(prompt_ids)

    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt_ids + result.token_ids])).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)  # row i predicts output token i
    for step, (entry, token_id) in enumerate(zip(result.logprobs, result.token_ids, strict=True)):
        assert entry["token_id"] == token_id
        assert entry["logprob"] == pytest.approx(expected[step, token_id].item(), abs=1e-4)
        top_values, top_ids = expected[step].topk(num_top)
        # JSON object keys are strings; the server lists the most likely first.
        assert [int(t) for t in entry["top"]] == top_ids.tolist(), f"step {step}"
        assert list(entry["top"].values()) == pytest.approx(top_values.tolist(), abs=1e-4)
        assert top_ids[0].item() == token_id  # greedy takes the most likely token
    total = sum(entry["logprob"] for entry in result.logprobs)
    # NOTE: the cumulative_logprob output is an FP32 tensor: the sum, rounded to float32.
    assert result.cumulative_logprob == pytest.approx(total, abs=1e-5)
    reference_total = sum(expected[i, t].item() for i, t in enumerate(result.token_ids))
    assert result.cumulative_logprob == pytest.approx(reference_total, abs=1e-4 * max_tokens)


def test_stop_string_and_seeded_sampling(triton_server) -> None:
    client = _client(triton_server, "http")
    stopped = client.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=["."])
    assert stopped.finish_reason == "stop" and "." not in stopped.text
    first = client.generate(PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    again = _client(triton_server, "grpc").generate(
        PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=1234
    )
    assert first.token_ids == again.token_ids and len(first.token_ids) == 8


def test_is_ready(triton_server) -> None:
    assert _client(triton_server, "grpc").is_ready()
    assert _client(triton_server, "http").is_ready()
    assert not InflightClient(triton_server.url_grpc, model="nope").is_ready()
