"""Options and fixtures of the reliability suite: sizes, per-scenario numbers, the shared server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inflight.tools.server import TritonServer
from tests.reliability.harness import BYTES_PER_BLOCK, RESULTS, ScenarioStats, start_server

# Token ids that trigger the test-only fault injection (backend/serving/faults.py): on the small server a step that
# computes STEP_FAULT_TOKEN fails (its requests end with INTERNAL), FATAL_TOKEN kills the engine thread; on
# the shared server a step that computes STALL_TOKEN sleeps faults.STALL_SECONDS first (the stub kill).
# No other request contains them, so the other scenarios on those servers are unaffected.
STEP_FAULT_TOKEN, FATAL_TOKEN, STALL_TOKEN = 49000, 49001, 49002
# The server most scenarios share: small settings (CI is a 2-core CPU), ample KV for them.
SHARED_PARAMETERS = {
    "max_model_len": "256",
    "kv_cache_memory_bytes": str(128 << 20),
    "max_queue_size": "1024",
    "drain_timeout_s": "5",
    "fault_injection": f"stall:token={STALL_TOKEN}",
}
SMALL_MAX_LEN = 128
# The small server: KV for about 1.5 requests of max_model_len 128 (12 usable blocks of 16 tokens), the
# fault-injection markers, a short drain. Shared by KV pressure, same-seed and the faults.
SMALL_PARAMETERS = {
    "max_model_len": str(SMALL_MAX_LEN),
    "kv_cache_memory_bytes": str(13 * BYTES_PER_BLOCK),
    "fault_injection": f"step:token={STEP_FAULT_TOKEN};fatal:token={FATAL_TOKEN}",
    "drain_timeout_s": "3",
}
# Tests that end a shared server's model the hard way (the stub kill, on the shared server) run last.
RUN_LAST = ("test_stub_killed",)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-full", action="store_true", help="run the reliability scenarios at full size"
    )
    parser.addoption(
        "--reliability-table",
        action="store_true",
        help="leave the wall-clock figures to the runner's table (python -m tests.reliability)",
    )


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Each scenario's wall-clock figures (median, worst, hang bound): what is normal, in every run."""
    if config.getoption("--reliability-table", default=False):
        return
    lines = [
        f"{nodeid.split('::', 1)[1]}: {line}" for nodeid, s in RESULTS.items() for line in s.timing_lines()
    ]
    if lines:
        terminalreporter.section("reliability wall-clock figures")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((i + 1 for i, prefix in enumerate(RUN_LAST) if item.name.startswith(prefix)), 0)

    items.sort(key=rank)  # NOTE: stable: the other tests keep their order


@pytest.fixture(scope="session")
def full(request) -> bool:
    """True for `make reliability` (full sizes), False for `make test` (fast sizes)."""
    return bool(request.config.getoption("--reliability-full"))


@pytest.fixture
def scenario(request) -> Iterator[ScenarioStats]:
    """This scenario's numbers; the outcome is filled in from the test's report."""
    stats = ScenarioStats(request.node.name)
    RESULTS[request.node.nodeid] = stats
    start = time.monotonic()
    yield stats
    stats.seconds = time.monotonic() - start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    stats = RESULTS.get(item.nodeid)
    if stats is None:
        return
    if report.failed:
        stats.outcome = "FAILED" if call.when == "call" else f"ERROR ({call.when})"
        if stats.failures == 0:
            stats.failures = 1
        if call.excinfo is not None and len(stats.notes) < 5:
            stats.notes.append(call.excinfo.exconly()[:300])
    elif call.when == "call":
        stats.outcome = "passed"


@pytest.fixture(scope="session")
def rel_server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The shared server (explicit model control, stub watchdog on)."""
    server = start_server(tmp_path_factory.mktemp("rel-shared"), smollm2_path, SHARED_PARAMETERS)
    try:
        yield server
    finally:
        # NOTE: after a stub kill Triton waits its whole exit timeout for the dead stub's requests.
        server.stop(timeout_s=2 if any(w.deaths for w in server.watchdogs) else 30)


@pytest.fixture(scope="session")
def small_server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The small server (SMALL_PARAMETERS; explicit model control, stub watchdog on)."""
    server = start_server(tmp_path_factory.mktemp("rel-small"), smollm2_path, SMALL_PARAMETERS)
    try:
        yield server
    finally:
        # NOTE: after a stub kill Triton waits its whole exit timeout for the dead stub's requests.
        server.stop(timeout_s=2 if any(w.deaths for w in server.watchdogs) else 30)


@pytest.fixture(scope="session")
def reference(smollm2_path: Path):
    """Engine-direct greedy outputs (ample KV) in this process."""
    from tests.serving.conftest import GreedyReference

    return GreedyReference(smollm2_path)
