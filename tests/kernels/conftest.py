"""Kernel tests: every Triton kernel against its torch reference, on "cpu" and (when present) "cuda".

On "cpu" the kernels run in Triton's interpreter: `inflight.kernels.launch.launcher` picks it for CPU
tensors whatever `TRITON_INTERPRET` was when triton was imported, so nothing has to be set before the
first `import triton` of the session and the same session also runs the compiled kernels on "cuda".
(Setting TRITON_INTERPRET=1 in the environment makes the "cuda" cases interpreted too, for debugging.)
"""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Per-dtype tolerances, tight enough to fail on a wrong index or a missed mask. bf16/fp16 allow about
# one rounding step of the output (the interpreter truncates fp32 -> bf16 where the GPU rounds).
ELEMENTWISE_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
ATTENTION_TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=DTYPES, ids=["fp32", "fp16", "bf16"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), **tol)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a GPU, the `cuda`-marked tests (model-sized shapes, compiled kernels only) are not collected:
    `make test-gpu` runs them. Reported as deselected, never as skipped."""
    if torch.cuda.is_available():
        return
    gpu_only = [item for item in items if item.get_closest_marker("cuda") is not None]
    if gpu_only:
        config.hook.pytest_deselected(items=gpu_only)
        items[:] = [item for item in items if item.get_closest_marker("cuda") is None]


def e4m3_steps(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How many E4M3 codes apart each of two float8_e4m3fn tensors' values are (0: equal), a zero's sign
    aside: numpy 2's Triton interpreter turns some -0.0 into +0.0 (seen with triton 3.6 + numpy 2.5)."""
    assert actual.dtype == expected.dtype == torch.float8_e4m3fn and actual.shape == expected.shape

    def ordinal(q: torch.Tensor) -> torch.Tensor:  # codes in value order: sign and magnitude, +-0 both 0
        b = q.cpu().view(torch.uint8).to(torch.int16)
        return torch.where(b >= 128, -(b & 0x7F), b & 0x7F)

    return (ordinal(actual) - ordinal(expected)).abs()
