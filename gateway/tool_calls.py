"""Tool calls: the JSON schema that `tool_choice` required / named constrains the output to, and the parser
that finds calls in free (`auto`) output, in the Llama-3.x JSON and Hermes `<tool_call>` styles.

- named (`{"type": "function", "function": {"name": F}}`): the output is F's arguments object (F's
  `parameters` schema), as vLLM does; one call of F.
- `required`: the output is a JSON list of `{"name": ..., "parameters": {...}}`, at least one, each an
  `anyOf` over the tools.
- `auto`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes; text before the first is
  the message's content), or the whole output being one JSON object / a list / `;`-separated objects with
  `name` and `parameters` or `arguments` (Llama 3.x, an optional `<|python_tag|>` first). Only names of the
  request's tools count; anything else stays text.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON text, as OpenAI returns it


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def named_schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    return parameters or ANY_OBJECT


def required_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A JSON list of one or more calls of the given tools."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool["function"]["name"]]},
                "parameters": tool["function"].get("parameters") or ANY_OBJECT,
            },
            "required": ["name", "parameters"],
        }
        for tool in tools
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}


def _call(value: Any, names: set[str]) -> ParsedCall | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_required(text: str, names: set[str]) -> list[ParsedCall] | None:
    """The calls of a `required` output (a JSON list), or None when it is not one (cut by max_tokens)."""
    try:
        values = json.loads(text)
    except ValueError:
        return None
    calls = [_call(v, names) for v in values] if isinstance(values, list) else []
    return calls if calls and all(calls) else None  # type: ignore[return-value]


def parse_named(text: str, name: str) -> list[ParsedCall] | None:
    """The one call of a named `tool_choice` (the output is the arguments object), or None."""
    try:
        arguments = json.loads(text)
    except ValueError:
        return None
    return (
        [ParsedCall(name, json.dumps(arguments, ensure_ascii=False))] if isinstance(arguments, dict) else None
    )


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_auto(text: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of free output; no calls found: (text, [])."""
    if "<tool_call>" in text:
        calls = []
        for body in _HERMES.findall(text):
            try:
                call = _call(json.loads(body), names)
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        if calls:
            content = text[: text.index("<tool_call>")].strip()
            return content or None, calls
        return text, []
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith(("{", "[")):
        return text, []
    try:
        parsed = json.loads(body)
        values = parsed if isinstance(parsed, list) else [parsed]
    except ValueError:
        try:
            values = [json.loads(part) for part in body.split(";") if part.strip()]
        except ValueError:
            return text, []
    calls = [_call(v, names) for v in values]
    if not calls or not all(calls):
        return text, []
    return None, calls  # type: ignore[return-value]


def may_become_call(text: str) -> bool:
    """Whether free output that starts like this could still turn out to be a tool call (stream: hold it)."""
    head = text.lstrip()
    if not head:
        return True
    for marker in ("<tool_call>", "<|python_tag|>"):
        if head.startswith(marker) or marker.startswith(head):
            return True
    return head.startswith(("{", "["))


def text_before_call(text: str) -> int:
    """The length of `text` that comes before a Hermes `<tool_call>` that has begun or may be beginning."""
    marker = "<tool_call>"
    found = text.find(marker)
    if found >= 0:
        return found
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return len(text) - size
    return len(text)


def openai_calls(calls: list[ParsedCall], with_index: bool = False) -> list[dict[str, Any]]:
    """`tool_calls` of a message (or, `with_index`, of a stream delta)."""
    out = []
    for i, call in enumerate(calls):
        item: dict[str, Any] = {
            "id": call_id(),
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        if with_index:
            item = {"index": i, **item}
        out.append(item)
    return out
