"""`python -m tests.reliability [--fast] [pytest args]`: every scenario (full sizes unless --fast), then a table
(scenario, requests tried, failures, leaked KV blocks, crashes, seconds), each scenario's notes and wall-clock
figures (median, worst, the hang bound it fails at); exits non-zero on any failure."""

from __future__ import annotations

import sys
import time

import pytest

from tests.reliability.harness import RESULTS


def main(argv: list[str]) -> int:
    fast = "--fast" in argv
    args = [a for a in argv if a != "--fast"]
    start = time.monotonic()
    code = pytest.main(
        [
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/reliability",
            "--reliability-table",
            *([] if fast else ["--reliability-full"]),
            *args,
        ]
    )
    rows = [("scenario", "requests", "failures", "leaked blocks", "crashes", "seconds", "outcome")]
    for nodeid, s in RESULTS.items():
        rows.append((nodeid.split("::", 1)[1], str(s.requests), str(s.failures), str(s.leaked_blocks),
                     str(s.crashes), f"{s.seconds:.1f}", s.outcome))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for nodeid, s in RESULTS.items():
        for note in [*s.notes, *s.timing_lines()]:
            print(f"  {nodeid.split('::', 1)[1]}: {note}")
    bad = [s for s in RESULTS.values() if s.outcome != "passed" or s.failures or s.leaked_blocks or s.crashes]
    total = sum(s.requests for s in RESULTS.values())
    print(f"\n{len(RESULTS)} scenarios, {total} requests, {time.monotonic() - start:.0f} s: "
          f"{'FAILED' if bad or code else 'all passed'}")  # fmt: skip
    return 1 if bad or code or not RESULTS else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
