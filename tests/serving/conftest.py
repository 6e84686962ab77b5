"""One real tritonserver for the serving tests (session-wide), and the engine-direct reference.

The server runs a fresh copy of model_repository/ with small engine settings, on free ports, its output in
a log file whose new lines are attached to the report of any failing test that used it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from inflight.tools.model_repository import DEFAULT_MODEL_REPOSITORY, write_model_repository
from inflight.tools.server import TritonServer

from .triton_helpers import serve_repository

# Small engine settings: CI is a 2-core CPU machine.
SERVER_PARAMETERS = {
    "max_model_len": "1024",
    "kv_cache_memory_bytes": str(256 << 20),
    "max_queue_size": "64",
}
_LOG_PATH = pytest.StashKey[Path]()
_LOG_OFFSET = pytest.StashKey[int]()
_LOG_TAIL_CHARS = 20_000


@pytest.fixture(scope="session")
def triton_server(
    smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory, request
) -> Iterator[TritonServer]:
    """A started, ready `TritonServer` serving model `llm` (SmolLM2-135M-Instruct); always stopped."""
    work = tmp_path_factory.mktemp("tritonserver")
    parameters = {"model_path": str(smollm2_path), **SERVER_PARAMETERS}
    repo = write_model_repository(DEFAULT_MODEL_REPOSITORY, work / "model_repository", parameters=parameters)
    log_path = work / "tritonserver.log"
    request.config.stash[_LOG_PATH] = log_path
    yield from serve_repository(repo, log_path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach what the server logged during a failing test (a `tritonserver log` report section)."""
    outcome = yield
    report = outcome.get_result()
    log_path = item.config.stash.get(_LOG_PATH, None)
    if log_path is None or "triton_server" not in getattr(item, "fixturenames", ()) or not log_path.is_file():
        return
    if call.when == "setup":
        item.stash[_LOG_OFFSET] = log_path.stat().st_size
    elif report.failed:
        with log_path.open("rb") as f:
            f.seek(item.stash.get(_LOG_OFFSET, 0))
            text = f.read().decode(errors="replace")
        report.sections.append(("tritonserver log", text[-_LOG_TAIL_CHARS:] or "(nothing new)"))


class GreedyReference:
    """The same checkpoint engine-direct in this process (`inflight.LLM`), greedy, memoised."""

    def __init__(self, model_path: Path) -> None:
        from inflight import LLM

        self.llm = LLM(str(model_path), max_model_len=1024, kv_cache_memory_bytes=128 << 20)
        self._cache: dict[Any, Any] = {}

    def __call__(self, prompt: str | Sequence[Mapping[str, str]] | Sequence[int], max_tokens: int) -> Any:
        """The `CompletionOutput` of `SamplingParams(temperature=0, max_tokens=max_tokens)`."""
        from inflight import SamplingParams

        key = (repr(prompt), max_tokens)
        if key not in self._cache:
            (out,) = self.llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))
            self._cache[key] = out
        return self._cache[key]


@pytest.fixture(scope="session")
def greedy_reference(smollm2_path: Path) -> GreedyReference:
    return GreedyReference(smollm2_path)
