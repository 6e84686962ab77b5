"""Shared fixtures: the real SmolLM2 checkpoint, tiny random checkpoints, and HF references."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# NOTE: transformers >= 5.25 imports Hugging Face's `kernels` package when it loads a model; this checkout's
# top-level kernels/ folder shadows it wherever the checkout comes first on sys.path (`python -m pytest` puts
# the current directory there). The checkout goes last here, and child Pythons (`-c`, `-m`) skip the cwd.
# A tree whose package is laid out as `inflight/...` (the mutation-testing copy, tests/mutation) has no
# top-level kernels/ and stays first: its own copy of the package must win over the installed one.
if (REPO / "kernels").is_dir():
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != str(REPO)] + [str(REPO)]
os.environ.setdefault("PYTHONSAFEPATH", "1")
SMOLLM2_DIR = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The default model as an HF folder (written by `make model`, which `make test` runs first)."""
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.fail(f"{SMOLLM2_DIR} is missing: run `make model` (make test does it)", pytrace=False)
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The order's seed, last (`make test` runs with -q, which hides pytest-randomly's header line)."""
    seed = getattr(config.option, "randomly_seed", None)  # None with -p no:randomly
    if seed is not None:
        terminalreporter.write_line(
            f"test order: pytest-randomly seed {seed} (replay: --randomly-seed={seed})"
        )
