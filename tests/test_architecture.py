"""The floors' import direction (pyproject's [tool.importlinter] contracts), checked with import-linter.

serving > engine > executor > batching | kernels: a floor imports only the floors below it; serving, engine
and batching never import torch themselves; the client and the tools import nothing of the engine.

NOTE: grimp (import-linter's graph) does not enter a folder without ``__init__.py`` inside a regular
package, and ``kernels/`` has none on purpose (tests/test_layout.py), so the check runs on a copy of the
package in which every such folder gets an empty ``__init__.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def _lintable_copy(root: Path) -> Path:
    """The package as grimp can read it, under ``root``: symlinks followed, namespace folders regular."""
    target = root / "inflight"
    shutil.copytree(REPO / "inflight", target, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    for folder, _, files in os.walk(target):
        if "__init__.py" not in files:
            (Path(folder) / "__init__.py").touch()
    return root


def _lint(root: Path) -> subprocess.CompletedProcess:
    # NOTE: the copy must be the `inflight` that grimp finds: first on sys.path, and the editable install's
    # finder (a meta path hook that would map `inflight` back to the checkout) taken off.
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]\n"
        "from importlinter.cli import lint_imports_command\n"
        f"sys.argv = ['lint-imports', '--no-cache', {str(REPO / 'pyproject.toml')!r}]\n"
        "lint_imports_command()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["COLUMNS"] = "1000"  # one line per contract
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _contract_names() -> dict[str, str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c["name"] for c in config["contracts"]}


def test_the_floors_keep_their_contracts(tmp_path: Path) -> None:
    result = _lint(_lintable_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    names = _contract_names()
    assert set(names) == {
        "floors",
        "no-tensors-above-the-executor",
        "standalone-tools",
        "gateway-over-the-client",
    }
    for name in names.values():
        assert f"{name} KEPT" in result.stdout, result.stdout
    # (that kernels/ and each floor are in the graph at all is shown by the bad imports below breaking)


@pytest.mark.parametrize(
    ("module", "imports", "contract"),
    [
        ("backend/executor/upward.py", "from inflight.backend.engine import engine", "floors"),
        ("batching/upward.py", "import inflight.backend.executor.sampler", "floors"),
        ("kernels/upward.py", "from inflight.backend.executor import model_runner", "floors"),
        ("backend/engine/tensors.py", "import torch", "no-tensors-above-the-executor"),
        ("client/engine.py", "from inflight.batching import Request", "standalone-tools"),
        ("gateway/engine.py", "from inflight.backend.engine import llm", "gateway-over-the-client"),
    ],
)
def test_an_import_against_a_contract_fails_the_check(tmp_path: Path, module: str, imports: str,
                                                       contract: str) -> None:  # fmt: skip
    """A deliberate bad import, in a copy of the package (never in the code), breaks its contract."""
    root = _lintable_copy(tmp_path)
    (root / "inflight" / module).write_text(f"{imports}\n")
    result = _lint(root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"Contracts: {len(_contract_names()) - 1} kept, 1 broken." in result.stdout, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[1]
    assert f"inflight.{module[:-3].replace('/', '.')}" in broken, broken
    assert f"{_contract_names()[contract]} BROKEN" in result.stdout, result.stdout
