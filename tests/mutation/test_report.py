"""The committed mutation-testing results (docs/mutation.json) are whole, and the README and docs/mutation.md
are generated from them, never typed in."""

from __future__ import annotations

import json

from tests.mutation.explained import EXPLAINED
from tests.mutation.report import (
    JSON_PATH,
    MARKDOWN_PATH,
    MIN_SCORE,
    README_BEGIN,
    README_END,
    ROOT,
    Survivor,
    explain,
    function_name,
    markdown,
    readme_block,
    score,
)


def _result() -> dict:
    return json.loads(JSON_PATH.read_text())


def test_readme_and_markdown_match_the_results() -> None:
    result = _result()
    text = (ROOT / "README.md").read_text()
    block = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert block == readme_block(result), "run `make mutate` (or tests.mutation.report) after changing it"
    assert MARKDOWN_PATH.read_text() == markdown(result)


def test_every_survivor_is_explained_and_the_score_is_met() -> None:
    result = _result()
    caught, total = score(result)
    assert total > 1000 and caught >= MIN_SCORE * total
    assert [s["name"] for s in result["survivors"] if not s["why"]] == []


def test_the_explanations_still_match_the_survivors() -> None:
    """An explanation that no survivor matches any more (the code or a test changed) is stale: drop it."""
    result = _result()
    survivors = {(s["file"], s["function"], s["before"], s["after"]) for s in result["survivors"]}
    functions = {(file, function) for file, function, _, _ in survivors}
    stale = [
        e
        for e in EXPLAINED
        if (e.file, e.function, e.before, e.after) not in survivors
        and (e.before is not None or (e.file, e.function) not in functions)
    ]
    assert stale == []


def test_mutant_names_and_diffs_are_read_as_mutmut_writes_them() -> None:
    assert (
        function_name("inflight.batching.scheduler.xǁSchedulerǁschedule__mutmut_14") == "Scheduler.schedule"
    )
    assert function_name("inflight.backend.executor.sampler.x__top_k_only__mutmut_3") == "_top_k_only"
    assert function_name("inflight.backend.engine.finish.x_check_stop__mutmut_1") == "check_stop"
    diff = "\n".join([
        "--- inflight/backend/finish.py", "+++ inflight/backend/finish.py", "@@ -1,3 +1,3 @@",
        " def f(a):", "-    return a <= 1", "+    return a < 1",
    ])  # fmt: skip
    survivor = Survivor.from_diff(
        "inflight.backend.engine.finish.x_f__mutmut_1", "backend/engine/finish.py", "survived", diff
    )
    assert (survivor.function, survivor.before, survivor.after) == ("f", "return a <= 1", "return a < 1")
    from tests.mutation.report import Explained

    explain(
        [survivor],
        [Explained("backend/engine/finish.py", "f", "return a <= 1", "return a < 1", "equal here")],
    )
    assert survivor.why == "equal here"
    explain([survivor], [Explained("backend/engine/finish.py", "f", None, None, "any change of f")])
    assert survivor.why == "any change of f"
