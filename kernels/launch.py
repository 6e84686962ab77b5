"""Pick the form of a ``@triton.jit`` kernel that can run on a tensor's device.

``triton.jit`` decides at decoration time (i.e. when a kernel module is imported) whether it returns a
compiled ``JITFunction`` or, with ``TRITON_INTERPRET=1`` in the environment, an ``InterpretedFunction``
that runs the kernel on CPU tensors with numpy. Which one a process gets would then depend on which
module happened to import a kernel file first. Instead every wrapper asks ``launcher(kernel, device)``:

    CPU tensors                      -> the interpreter (always: there is no CPU compiler)
    CUDA tensors                     -> the compiled kernel
    CUDA tensors, TRITON_INTERPRET=1 -> the interpreter (debugging on a GPU machine; read at launch time)

so one pytest session can check the same kernel on "cpu" and on "cuda".

NOTE: ``JITFunction(fn)`` and ``InterpretedFunction(fn)`` take the plain Python function and exist with
these names from triton 3.0 to 3.9 at least; the interpreter restores ``triton.language`` after each
launch, so compiled and interpreted launches can alternate in one process.
"""

from __future__ import annotations

import os

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_FORMS: dict[tuple[int, bool], object] = {}


def interpreting(device: torch.device) -> bool:
    """Whether a kernel launched on ``device`` runs in Triton's interpreter."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def launcher(kernel, device: torch.device):
    """``kernel`` (a ``@triton.jit`` object) in the form that runs on ``device``; index it with a grid."""
    want_interpreter = interpreting(device)
    if isinstance(kernel, InterpretedFunction) == want_interpreter:
        return kernel
    key = (id(kernel.fn), want_interpreter)
    form = _FORMS.get(key)
    if form is None:
        form = InterpretedFunction(kernel.fn) if want_interpreter else JITFunction(kernel.fn)
        _FORMS[key] = form
    return form
