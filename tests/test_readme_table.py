"""The README's performance table is generated from benchmarks/results/*.json, never typed in."""

from __future__ import annotations

from benchmarks.report import BEGIN, END, ROOT, TARGETS_BEGIN, TARGETS_END, table, targets


def test_readme_table_matches_the_results() -> None:
    text = (ROOT / "README.md").read_text()
    assert BEGIN in text and END in text
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == table().strip(), "run `python -m benchmarks.report` after adding results"
    assert block.count("\n") >= 3, "the table lists the H200 results"


def test_readme_targets_match_the_results() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split(TARGETS_BEGIN, 1)[1].split(TARGETS_END, 1)[0].strip()
    assert block == targets().strip(), "run `python -m benchmarks.report` after adding results"
    assert "missed by" in block or "met" in block
