"""logit_bias against HF transformers' logits plus the bias (greedy, on the real SmolLM2), and the chat
template's tools against HF's ``apply_chat_template(..., tools=...)``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from inflight import LLM, SamplingParams
from inflight.backend.engine.prompts import PromptProcessor

PROMPT = "The capital of France is"
MAX_TOKENS = 8
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM(str(smollm2_path), max_model_len=128)


@pytest.fixture(scope="module")
def hf(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_biased_greedy(hf, prompt_ids: list[int], bias: dict[int, float], max_tokens: int) -> list[int]:
    """Greedy on HF's last-position logits plus the bias, one token at a time (EOS ends it)."""
    ids = list(prompt_ids)
    out = []
    for _ in range(max_tokens):
        logits = hf(torch.tensor([ids])).logits[0, -1].float()
        for token_id, b in bias.items():
            logits[token_id] += b
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token == hf.config.eos_token_id:
            break
    return out


@torch.no_grad()
def hf_first_choices(hf, prompt_ids: list[int]) -> list[int]:
    return hf(torch.tensor([prompt_ids])).logits[0, -1].topk(2).indices.tolist()


def _generate(llm: LLM, bias: dict[int, float] | None) -> list[int]:
    (out,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logit_bias=bias))
    return out.token_ids


def test_minus_100_on_the_greedy_token_takes_hfs_second_choice(llm: LLM, hf) -> None:
    prompt_ids = llm.tokenizer.encode(PROMPT)
    best, second = hf_first_choices(hf, prompt_ids)
    assert _generate(llm, None)[0] == best
    biased = _generate(llm, {best: -100.0})
    assert biased[0] == second
    assert biased == hf_biased_greedy(hf, prompt_ids, {best: -100.0}, MAX_TOKENS)


def test_plus_100_forces_a_token(llm: LLM, hf) -> None:
    forced = llm.tokenizer.encode(" banana", add_special_tokens=False)[0]
    prompt_ids = llm.tokenizer.encode(PROMPT)
    got = _generate(llm, {forced: 100.0})
    assert got == [forced] * MAX_TOKENS == hf_biased_greedy(hf, prompt_ids, {forced: 100.0}, MAX_TOKENS)


def test_moderate_biases_on_several_tokens_equal_hf(llm: LLM, hf) -> None:
    prompt_ids = llm.tokenizer.encode(PROMPT)
    plain = _generate(llm, None)
    # push down what it said, push up a few words: a different answer, token for token HF's
    bias = {
        plain[0]: -8.0,
        plain[1]: -5.0,
        **{t: 4.0 for t in llm.tokenizer.encode(" a big city", add_special_tokens=False)},
    }
    got = _generate(llm, bias)
    assert got != plain
    assert got == hf_biased_greedy(hf, prompt_ids, bias, MAX_TOKENS)


def test_bias_per_request_in_one_batch(llm: LLM) -> None:
    """Requests with and without a bias in the same steps: each gets what it gets alone."""
    alone = [_generate(llm, None), _generate(llm, {_generate(llm, None)[0]: -100.0})]
    params = [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logit_bias=b)
        for b in (None, {alone[0][0]: -100.0})
    ]
    assert [o.token_ids for o in llm.generate([PROMPT, PROMPT], params)] == alone


# ------------------------------------------------------------------------------------------------- tools
def _hf_ids(tokenizer, messages, tools) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def test_tools_reach_the_default_models_template(llm: LLM) -> None:
    tokenizer = llm.tokenizer
    # SmolLM2's template does not render tools: the ids are HF's with or without them
    assert llm.engine.prompts.token_ids(CHAT, TOOLS) == _hf_ids(tokenizer, CHAT, TOOLS)


TOOL_TEMPLATE = (
    "{% if tools %}Tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tool_tokenizer(smollm2_path, tmp_path_factory):
    """SmolLM2's tokenizer with a chat template that writes the tools' names."""
    from transformers import AutoTokenizer

    folder: Path = tmp_path_factory.mktemp("tool-template")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_path / name, folder / name)
    (folder / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return AutoTokenizer.from_pretrained(folder)


def test_tools_rendered_by_a_template_that_uses_them(tool_tokenizer) -> None:
    prompts = PromptProcessor(tool_tokenizer, 49152, 512)
    ids = prompts.token_ids(CHAT, TOOLS)
    assert ids == _hf_ids(tool_tokenizer, CHAT, TOOLS)
    text = tool_tokenizer.decode(ids)
    assert text.startswith("Tools: get_weather get_time") and "user: What is the weather in Paris?" in text
    assert prompts.token_ids(CHAT) == _hf_ids(tool_tokenizer, CHAT, None) != ids


def test_tools_errors_are_named(llm: LLM, tool_tokenizer) -> None:
    with pytest.raises(
        ValueError, match="^tools are given to the chat template: send the prompt as chat messages$"
    ):
        llm.engine.prompts.token_ids("Hi", TOOLS)
    failing = PromptProcessor(tool_tokenizer, 49152, 512)
    bad_tools = [{"type": "function"}]  # no "function": the template cannot read its name
    with pytest.raises(ValueError, match="^the chat template failed on these messages and tools: "):
        failing.token_ids(CHAT, bad_tools)
