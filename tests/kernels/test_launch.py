"""The launcher: interpreted launches leave triton.language exactly as they found it."""

from __future__ import annotations

import sys

import torch

from inflight.kernels.launch import interpreting
from inflight.kernels.paged_prefill_attention import paged_prefill_attention
from inflight.kernels.rms_norm import rms_norm

from .paged_cases import make_paged_case


def _language_snapshot() -> dict[tuple[str, str], int]:
    return {
        (module_name, attr): id(value)
        for module_name, module in list(sys.modules.items())
        if module is not None
        and (module_name == "triton.language" or module_name.startswith("triton.language."))
        for attr, value in vars(module).items()
    }


def test_interpreted_launches_restore_triton_language() -> None:
    """Compiled launches later in the same process must see the real `tl.sum`, `tl.load`, ..."""
    import triton.language as tl

    before = _language_snapshot()
    sum_before, load_before = tl.sum, tl.core.load
    rms_norm(torch.randn(3, 40), torch.randn(40), 1e-6, torch.randn(3, 40))  # tl.sum inside
    case = make_paged_case(4, 2, 64, 16, [20], [4], torch.bfloat16, torch.device("cpu"))
    paged_prefill_attention(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens_t(),
        case.query_start_loc_t(),
        0.125,
    )  # tl.max, tl.dot on bf16, nested library calls
    after = _language_snapshot()
    changed = {key for key in before if key in after and before[key] != after[key]}
    assert not changed
    assert tl.sum is sum_before and tl.core.load is load_before


def test_interpreting_follows_device_and_environment(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert interpreting(torch.device("cpu"))
    assert not interpreting(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting(torch.device("cuda"))
