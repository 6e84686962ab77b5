"""Shared fixtures: the real SmolLM2 checkpoint, tiny random checkpoints, and HF references."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
