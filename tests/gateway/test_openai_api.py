"""The gateway through the official `openai` package (sync and async), against a real Triton server.

Greedy texts are compared with the in-process engine (`inflight.LLM`, the same checkpoint and chat template),
streamed texts with non-streamed ones, usage with the token counts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from .conftest import API_KEY, MODEL, Gateway

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(smollm2_path: Path):
    """The same checkpoint engine-direct, greedy: `reference(prompt or messages, max_tokens)`."""
    from inflight import LLM, SamplingParams

    llm = LLM(str(smollm2_path), max_model_len=512, kv_cache_memory_bytes=32 << 20)

    def generate(prompt, max_tokens: int):
        (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))
        return out.outputs[0] if hasattr(out, "outputs") else out

    return generate


def test_models_lists_the_llm_model_with_its_context(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == 512


def test_greedy_completion_equals_the_engine_and_counts_its_tokens(client: openai.OpenAI, reference) -> None:
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    expected = reference(PROMPT, 12)
    (choice,) = result.choices
    assert choice.text == expected.text
    assert result.usage.completion_tokens == len(expected.token_ids)
    assert choice.finish_reason == ("length" if len(expected.token_ids) == 12 else "stop")
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_greedy_chat_equals_the_engine_with_the_chat_template(client: openai.OpenAI, reference) -> None:
    result = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    expected = reference(CHAT, 16)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected.text
    assert result.usage.completion_tokens == len(expected.token_ids)


def test_streamed_chat_equals_non_streamed_with_role_first_and_one_finish(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    with_choices = [c for c in chunks if c.choices]
    assert sum(c.choices[0].finish_reason is not None for c in with_choices) == 1
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == whole.choices[0].message.content
    # include_usage: one last chunk without choices carries usage; the others carry none
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_streamed_completion_without_usage_option_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stream=True)
    )
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        result = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Write a word."}], max_tokens=12, temperature=1.0,
            seed=seed,
        )  # fmt: skip
        return result.choices[0].message.content

    assert sample(1234) == sample(1234)


def test_n_choices_each_finish_once_and_usage_adds_up(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=7, n=3
    )
    assert sorted(c.index for c in result.choices) == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in result.choices)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=7, n=3, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role]
    assert sorted(roles) == [0, 1, 2]
    assert chunks[-1].usage.prompt_tokens == result.usage.prompt_tokens


def test_async_client_streams_and_answers(gateway: Gateway) -> None:
    async def run() -> tuple[str, str, str]:
        client = openai.AsyncOpenAI(base_url=gateway.v1, api_key=API_KEY, max_retries=0, timeout=120)
        whole = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
        stream = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        chat = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
        await client.close()
        return whole.choices[0].text, streamed, chat.choices[0].message.content

    text, streamed, chat = asyncio.run(run())
    assert text and streamed == chat


def test_wrong_key_is_refused_with_openai_authentication_error(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


def test_bad_values_raise_bad_request_naming_the_parameter(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=2.1)
    assert err.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert missing.value.code == "model_not_found"


def test_logit_bias_forces_a_token(client: openai.OpenAI, smollm2_tokenizer) -> None:
    (token_id,) = smollm2_tokenizer.encode(" blue", add_special_tokens=False)
    result = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={str(token_id): 100}
    )
    assert result.choices[0].text == smollm2_tokenizer.decode([token_id] * 4)
    assert result.choices[0].finish_reason == "length"
