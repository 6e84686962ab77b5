"""NVIDIA's benchmark clients against our server: perf_analyzer --streaming and genai-perf (both modes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.perf.tools import (
    output_length_matches,
    read_perf_csv,
    response_token_counts,
    run_genai_perf,
    run_perf_analyzer,
    tokens_sent,
    write_input_data,
)

OUTPUT_TOKENS = 6


def test_perf_analyzer_streaming_smoke(triton_server, tmp_path: Path) -> None:
    data = write_input_data(tmp_path / "input.json", ["The capital of France is", "Hello"], max_tokens=4)
    export = tmp_path / "pa_export.json"
    done = run_perf_analyzer(
        triton_server.url_grpc, data, tmp_path / "pa.csv", "1:2", requests_per_window=2, profile_export=export
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Detected decoupled model" in done.stdout
    rows = read_perf_csv(tmp_path / "pa.csv")
    assert [row["Concurrency"] for row in rows] == ["1", "2"]
    for row in rows:
        assert float(row["Inferences/Second"]) > 0 and float(row["Response Throughput"]) > 0
    # Streamed: every request's responses carry its four tokens, none empty. (How many responses depends on
    # how fast the server's sender is: a busy one coalesces tokens.)
    # NOTE: run_perf_analyzer runs perf_analyzer again after an empty export (its own flake); twice is a failure.
    assert export.stat().st_size > 0, (
        f"empty profile export; perf_analyzer printed:\n{done.stdout}\n{done.stderr}"
    )
    requests = response_token_counts(export)
    assert requests and all(sum(r) == 4 and 1 <= len(r) <= 4 and all(r) for r in requests), requests


@pytest.mark.parametrize("backend", ["vllm", "tensorrtllm"])
def test_genai_perf_reports_the_output_length_it_asked_for(
    triton_server, smollm2_path: Path, tmp_path: Path, backend: str
) -> None:
    done, stats = run_genai_perf(
        backend, triton_server.url_grpc, smollm2_path, tmp_path / "artifacts", output_tokens=OUTPUT_TOKENS,
        input_tokens=24, request_count=3, concurrency=2,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert stats["request_count"]["avg"] == 3
    assert tokens_sent(tmp_path / "artifacts") == [OUTPUT_TOKENS] * 3
    assert output_length_matches(stats, OUTPUT_TOKENS), stats["output_sequence_length"]
    assert stats["time_to_first_token"]["avg"] > 0


def test_load_generator_through_triton_streams_exact_token_counts(triton_server) -> None:
    """benchmarks.serving's gRPC transport: token ids in, every token stamped, figures consistent, streams reused."""
    from benchmarks.loadgen import drive, schedule, summarize
    from benchmarks.targets import TritonTarget
    from tests.benchmarks.test_loadgen import check_consistent

    target = TritonTarget(triton_server.url_grpc)
    try:
        specs = schedule(4, 12, 5, vocab_size=49152, rate=20.0, seed=0)
        summary = summarize(drive(specs, target, concurrency=2, timeout_s=120))
        # Streams are kept and reused: one per request in flight, not one per request.
        assert target.num_streams <= 2, target.num_streams
    finally:
        target.close()
    check_consistent(summary, 4, 5)
