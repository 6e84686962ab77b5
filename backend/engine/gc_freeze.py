"""Keep Python's cyclic garbage collector off the engine's long-lived objects while it runs steps.

A full (generation 2) collection walks every tracked object: the model's modules, the tokenizer, the
block pool and the live requests, ~375,000 objects after loading SmolLM2 (180 ms a collection on the
2-core CPU machine). The steps' short-lived objects (a step's plan and outputs) keep promoting survivors
to generation 2, so at large batches such a collection comes every few dozen steps and stops the host
while the GPU waits. Frozen objects (``gc.freeze``) are never walked; objects created later are collected
as usual. Freezing and unfreezing are O(1) list splices.

Nested users (the serving loop for its lifetime, ``LLM.generate`` for one call) share one count: the heap
is unfrozen when the last of them leaves.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0


def freeze() -> None:
    """Freeze every object tracked now; pair with ``unfreeze``."""
    global _depth
    with _lock:
        gc.freeze()
        _depth += 1


def unfreeze() -> None:
    """Undo one ``freeze``; the last one hands the frozen objects back to the collector."""
    global _depth
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()


def refreeze() -> None:
    """Inside a frozen span: freeze the objects created since (they are unfrozen with the rest)."""
    with _lock:
        if _depth:
            gc.freeze()


@contextlib.contextmanager
def frozen() -> Iterator[None]:
    """``freeze`` for the length of a ``with`` block."""
    freeze()
    try:
        yield
    finally:
        unfreeze()
