"""`python -m tests.mutation [--keep] [--max-children N]` (`make mutate`): mutation testing with mutmut.

mutmut puts one small bug at a time (a mutant: `<` for `<=`, `+ 1` for `- 1`, a dropped call ...) into the
files of pyproject's `[tool.mutmut] only_mutate` and runs the unit tests that cover the mutated function; a
mutant is caught when a test fails. Then this writes the per-file table to docs/mutation.md (data in
docs/mutation.json) and the score line in the README, and exits non-zero if a survivor is not explained in
tests/mutation/explained.py or fewer than 90% of the mutants are caught.

NOTE: mutmut imports the mutated code by the module name its path gives (`inflight/batching/scheduler.py` is
`inflight.batching.scheduler`) and writes its mutants into a copy of the source folder. It runs in a copy of
the checkout's `inflight/` with the symlinks (`inflight/batching -> ../batching` ...) resolved, real folders
.cache/mutation/inflight/batching/... (no link leads from the copy back into the checkout), with the tests
beside it.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import tomllib

from tests.mutation.explained import EXPLAINED
from tests.mutation.report import (
    JSON_PATH,
    MIN_SCORE,
    Survivor,
    explain,
    rewrite_readme,
    score,
    write_markdown,
)

REPO = Path(__file__).resolve().parents[2]
STAGE = REPO / ".cache" / "mutation"
SKIPPED = ("__pycache__", ".pytest_cache", ".hypothesis")


def build_stage(keep: bool) -> None:
    """The checkout as mutmut needs it: `inflight/` with its symlinked subpackages copied as real folders
    (`inflight/batching/...`), the tests, pyproject.

    With `keep`, files that did not change keep their copies (and mtimes), so mutmut reuses its results.
    """
    if not keep and STAGE.exists():
        shutil.rmtree(STAGE)
    _sync(REPO / "inflight", STAGE / "inflight")
    _sync(REPO / "tests", STAGE / "tests")
    shutil.copy2(REPO / "pyproject.toml", STAGE / "pyproject.toml")
    # The tests read the default model (tokenizer) from <root>/.cache/models; mutmut runs them in mutants/.
    models = STAGE / "mutants" / ".cache" / "models"
    models.parent.mkdir(parents=True, exist_ok=True)
    if not models.is_symlink():
        models.symlink_to(REPO / ".cache" / "models")


def _sync(source: Path, target: Path) -> None:
    """Make `target` a copy of the folder `source`, following symlinks (a linked folder or file becomes a real
    one), copying only the files that differ."""
    target.mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in source.iterdir() if p.name not in SKIPPED}
    for stale in (p for p in target.iterdir() if p.name not in wanted and p.name not in SKIPPED):
        shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
    for name in wanted:
        path, copy = source / name, target / name
        if copy.is_symlink():  # a stage from an older layout: never write through a link
            copy.unlink()
        if path.is_dir():  # is_dir() and copy2() follow symlinks
            _sync(path, copy)
        elif not copy.exists() or not filecmp.cmp(path, copy, shallow=False):
            shutil.copy2(path, copy)


def run_mutmut(max_children: int) -> None:
    """`mutmut run` in the stage; its progress line shows on the terminal."""
    mutmut = Path(sys.executable).with_name("mutmut")
    # NOTE: one torch thread: mutmut forks each mutant's test run from a process that has run torch, and a
    # forked child's OpenMP threads spun until mutmut's CPU-time limit killed it (survivors read as timeouts).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(mutmut), "run", "--max-children", str(max_children)], cwd=STAGE, env=env, check=True)


def collect() -> tuple[dict[str, dict[str, int]], list[Survivor]]:
    """Per mutated file, the count of each mutmut status; the survivors with their diffs."""
    os.chdir(STAGE)  # mutmut's helpers read `mutants/` relative to the working directory
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    counts: dict[str, dict[str, int]] = {}
    survivors: list[Survivor] = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        source = meta.relative_to("mutants").with_suffix("")  # inflight/batching/scheduler.py
        file = _checkout_path(source)
        exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not exit_codes:
            continue
        per_status = counts.setdefault(file, {})
        for name, exit_code in sorted(exit_codes.items()):
            status = status_by_exit_code[exit_code]
            per_status[status] = per_status.get(status, 0) + 1
            if status in ("survived", "no tests"):
                survivors.append(
                    Survivor.from_diff(name, file, status, get_diff_for_mutant(name, path=source))
                )
    os.chdir(REPO)
    return counts, survivors


def _checkout_path(source: Path) -> str:
    """`inflight/batching/scheduler.py` -> `batching/scheduler.py` (where the file is in the checkout: the
    `inflight/batching` symlink resolved)."""
    return (REPO / source).resolve().relative_to(REPO).as_posix()


def _commit() -> str:
    """HEAD's short hash, "-dirty" if the run had uncommitted changes (besides this command's own outputs)."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    outputs = [":!README.md", ":!docs/mutation.md", ":!docs/mutation.json"]
    changes = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs],
        capture_output=True,
        text=True,
    ).stdout
    return head.strip() + ("-dirty" if changes.strip() else "")


def count_tests() -> int:
    """How many tests `make test` runs (collected, as it does)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:randomly",
            "tests",
            "--ignore=tests/gpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return sum(1 for line in done.stdout.splitlines() if "::" in line)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="reuse the last run's mutants and results")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2, help="parallel test runs")
    args = parser.parse_args(argv)

    build_stage(args.keep)
    run_mutmut(args.max_children)
    counts, survivors = collect()
    explain(survivors, EXPLAINED)
    only_mutate = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
    result = {
        "date": datetime.date.today().isoformat(),
        "mutmut": version("mutmut"),
        "commit": _commit(),
        "scope": [_checkout_path(Path(p)) for p in only_mutate],
        "num_tests": count_tests(),
        "files": counts,
        "survivors": [s.to_dict() for s in survivors],
    }
    JSON_PATH.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result)
    rewrite_readme(result)

    unexplained = [s for s in survivors if s.why is None]
    caught, total = score(result)
    print(f"\n{caught} of {total} mutants caught ({100 * caught / total:.1f}%); {len(survivors)} survived, "
          f"{len(unexplained)} of them unexplained. Table: docs/mutation.md")  # fmt: skip
    for s in unexplained:
        print(f"\nUNEXPLAINED {s.name} ({s.status})\n{s.diff}")
    return 1 if unexplained or caught < MIN_SCORE * total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
