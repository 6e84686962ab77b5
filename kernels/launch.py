"""Launch a ``@triton.jit`` kernel on a tensor's device: compiled on CUDA, interpreted on CPU.

Triton decides at *decoration* time whether ``@triton.jit`` gives a compiled ``JITFunction`` or, with
``TRITON_INTERPRET=1`` in the environment, an ``InterpretedFunction`` that runs on CPU tensors with
numpy. That includes Triton's own library functions (``tl.sum``, ``tl.max``, ...), decorated when
``triton`` is first imported. A process therefore gets one or the other depending on who imported
triton first, and cannot check a kernel on "cpu" and "cuda" in one session. Every wrapper here instead
launches through ``launcher(kernel, device)``:

    CUDA tensors                      -> the compiled kernel
    CPU tensors                       -> the interpreter (there is no CPU compiler)
    CUDA tensors, TRITON_INTERPRET=1  -> the interpreter (read at launch time; to debug on a GPU machine)

For the length of one interpreted launch (and only then) this module:
  * gives every ``@triton.jit`` function of ``triton.language``, of the kernel's module and of the modules
    of the jit helpers it calls an interpreted twin, then puts every module attribute back exactly as it
    was, so compiled launches in the same process never see the interpreter's patches (nested interpreted
    calls patch ``triton.language.core`` without undoing it);
  * lets the interpreter's ``tl.dot`` take bf16 operands (it multiplies their raw uint16 bits);
  * lets runtime loop bounds be turned into ints under numpy >= 2.4 (triton 3.6 does ``int(array)``
    on a 1-element array, which numpy 2.4 refuses; triton 3.9 fixed it).

NOTE: this leans on interpreter internals (``InterpretedFunction(fn)``, ``JITFunction.fn``,
``InterpreterBuilder.create_dot``, ``_patch_lang_tensor``) checked on triton 3.6 and 3.9. It only serves
the CPU (test) path: the engine's CPU path is the torch references. Interpreted launches are not
thread-safe (they swap module attributes); compiled launches are untouched.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import triton.language as tl
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

try:
    # NOTE: the interpreter's argument handling imports gluon lazily, and gluon asserts at import that
    # triton's library functions are compiled ones: import it now, before any interpreted launch.
    import triton.experimental.gluon  # noqa: F401
except ImportError:  # a triton without gluon
    pass

_TWINS: dict[int, object] = {}  # id(JITFunction) -> its InterpretedFunction twin
_CREATE_DOT = interpreter.InterpreterBuilder.create_dot
_PATCH_LANG_TENSOR = interpreter._patch_lang_tensor


def interpreting(device: torch.device) -> bool:
    """Whether a kernel launched on ``device`` runs in Triton's interpreter."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _twin(obj: object) -> object:
    if isinstance(obj, JITFunction):
        if id(obj) not in _TWINS:
            _TWINS[id(obj)] = InterpretedFunction(obj.fn)
        return _TWINS[id(obj)]
    return obj


def _create_dot_bf16(self, a, b, *args, **kwargs):
    """The interpreter's ``tl.dot`` with bf16 operands widened to fp32 first (exact; fp32 products
    accumulated in fp32 are what the tensor cores compute for bf16)."""
    if a.dtype == tl.bfloat16:
        a = self.cast_impl(a, tl.float32)
    if b.dtype == tl.bfloat16:
        b = self.cast_impl(b, tl.float32)
    return _CREATE_DOT(self, a, b, *args, **kwargs)


def _patch_lang_tensor_numpy2(tensor, scope, *args, **kwargs):
    _PATCH_LANG_TENSOR(tensor, scope, *args, **kwargs)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))


def _language_namespaces(kernel_globals: dict) -> list[dict]:
    """The namespaces whose ``@triton.jit`` functions get their twins: triton.language's, the kernel's module,
    and the modules of the jit helpers it calls (a helper from another module calls that module's own)."""
    names = [n for n in list(sys.modules) if n == "triton.language" or n.startswith("triton.language.")]
    spaces = [vars(sys.modules[n]) for n in names if sys.modules[n] is not None]
    spaces += [kernel_globals, vars(interpreter)]
    seen, todo = {id(space) for space in spaces}, [kernel_globals]
    while todo:
        for value in list(todo.pop().values()):
            helper_globals = value.fn.__globals__ if isinstance(value, JITFunction) else None
            if helper_globals is not None and id(helper_globals) not in seen:
                seen.add(id(helper_globals))
                spaces.append(helper_globals)
                todo.append(helper_globals)
    return spaces


class _Interpreted:
    """``kernel[grid](*args)`` run by Triton's interpreter whatever ``triton.jit`` chose at import."""

    def __init__(self, kernel) -> None:
        self.fn = kernel.fn
        self.interpreted = kernel if isinstance(kernel, InterpretedFunction) else _twin(kernel)

    def __getitem__(self, grid) -> Callable[..., None]:
        def run(*args, **kwargs) -> None:
            spaces = _language_namespaces(self.fn.__globals__)
            saved = [dict(space) for space in spaces]
            try:
                for space in spaces:
                    for name, value in list(space.items()):
                        if isinstance(value, JITFunction):
                            space[name] = _twin(value)
                interpreter.InterpreterBuilder.create_dot = _create_dot_bf16
                interpreter._patch_lang_tensor = _patch_lang_tensor_numpy2
                self.interpreted[grid](*args, **kwargs)
            finally:
                interpreter.InterpreterBuilder.create_dot = _CREATE_DOT
                # Names the interpreter adds (the `interpreter_semantic` that its rewritten functions
                # read) stay; every value that was there before is put back.
                for space, before in zip(spaces, saved, strict=True):
                    space.update(before)

        return run


_INTERPRETED: dict[int, _Interpreted] = {}


def launcher(kernel, device: torch.device):
    """``kernel`` (a ``@triton.jit`` object) in the form that runs on ``device``; index it with a grid."""
    if not interpreting(device):
        if isinstance(kernel, InterpretedFunction):
            raise RuntimeError(
                f"{kernel.fn.__name__} was decorated under TRITON_INTERPRET=1 but is launched on {device} "
                "without it; set TRITON_INTERPRET the same way for the whole process"
            )
        return kernel
    form = _INTERPRETED.get(id(kernel))
    if form is None:
        form = _INTERPRETED[id(kernel)] = _Interpreted(kernel)
    return form
