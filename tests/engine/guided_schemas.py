"""100 small JSON schemas for the structured-output tests, generated from a fixed seed.

Each is an object with 1-3 properties drawn from: strings (``maxLength``), bounded integers, bounded numbers
(``multipleOf``), booleans, enums (strings and integers), arrays (``maxItems``) of strings, integers or small
objects, and nested objects (two levels at most), with ``required`` a random subset (at least one) and no
additional properties, so every document the grammar allows is short: what a CPU test of 100 can afford.
"""

from __future__ import annotations

import random
from typing import Any

NAMES = ["id", "name", "city", "count", "score", "ok", "kind", "tags", "items", "meta", "size", "color", "age",
         "title", "level", "flag", "owner", "point", "unit", "note"]  # fmt: skip
ENUM_WORDS = ["red", "green", "blue", "small", "large", "yes", "no", "north", "south", "a b", "x-1"]


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "int_enum"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(2, 8)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.choice([9, 99, 999])}
    if kind == "number":
        # NOTE: multipleOf bounds the fraction: a plain number's digits are unbounded, and SmolLM2 sampled at
        # temperature 1 runs to max_tokens inside one (docs/structured-output.md, "Limits").
        return {
            "type": "number",
            "minimum": -100,
            "maximum": 100,
            "multipleOf": rng.choice([0.5, 0.25, 0.01]),
        }
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(ENUM_WORDS, rng.randint(2, 4))}
    return {"enum": rng.sample(range(-5, 50), rng.randint(2, 4))}


def _object(rng: random.Random, depth: int, max_properties: int) -> dict[str, Any]:
    names = rng.sample(NAMES, rng.randint(1, max_properties))
    properties = {name: _value(rng, depth) for name in names}
    required = sorted(rng.sample(names, rng.randint(1, len(names))), key=names.index)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    roll = rng.random()
    if depth < 2 and roll < 0.15:
        return _object(rng, depth + 1, 3)
    if roll < 0.3:
        items = _object(rng, 2, 2) if depth < 2 and rng.random() < 0.3 else _leaf(rng)
        if items.get("type") == "number":
            items = {"type": "integer", "minimum": 0, "maximum": 99}
        return {"type": "array", "items": items, "maxItems": rng.randint(1, 2)}
    return _leaf(rng)


def schemas(count: int = 100, seed: int = 20261121) -> list[dict[str, Any]]:
    """``count`` schemas; the same ones on every run."""
    rng = random.Random(seed)
    return [_object(rng, 0, 3) for _ in range(count)]
