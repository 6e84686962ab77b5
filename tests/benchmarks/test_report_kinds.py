"""The README tables' renderers: offline throughput (with both peers), serving, and the goal tables."""

from __future__ import annotations

from benchmarks.report import _serving, _throughput, profile_table
from benchmarks.report_targets import _check

CPU = {"kind": "cpu", "threads": 2, "copy_bandwidth_gbs": 12.5, "fp32_matmul_gflops": 50.0}


def _stats(tok_s: float) -> dict:
    p = {"mean": 5.0, "p50": 5.0, "p90": 6.0, "p99": 7.0}
    return {"output_tok_s": tok_s, "req_s": 2.0, "ttft_ms": p, "itl_ms": p, "e2e_ms": p}


def test_throughput_row_names_both_peers_and_the_ratios() -> None:
    result = {
        "model": "m", "workload": "8 requests, 128 in / 128 out", "engine": {"max_num_seqs": 8}, "ceilings": CPU,
        "inflight": {"output_tok_s": 100.0, "total_tok_s": 200.0},
        "hf_eager": {"output_tok_s": 10.0, "batch_size": 8},
        "hf_continuous_batching": {"skipped": "lengths differ"},
        "ratios": {"over_hf_eager": 10.0},
    }  # fmt: skip
    ((what, ours, peer, ceiling),) = _throughput(result)
    assert ours == "100 out tok/s (200 total)"
    assert (
        peer
        == "HF eager 10 out tok/s (static batch 8) (inflight 10.0x); HF generate_batch not run (lengths differ)"
    )
    assert ceiling == "CPU (2 threads): copy 12.5 GB/s, fp32 matmul 50 GFLOP/s"


def test_serving_rows_are_the_rates_and_the_highest_concurrency() -> None:
    levels = [
        {"mode": "rate", "value": 2.0, "triton": _stats(50), "engine_direct": _stats(51), "triton_over_direct": 0.98},
        {"mode": "concurrency", "value": 1, "triton": _stats(20), "engine_direct": _stats(20)},
        {"mode": "concurrency", "value": 256, "triton": _stats(900), "engine_direct": _stats(1000),
         "triton_over_direct": 0.9},
    ]  # fmt: skip
    rows = _serving({"model": "m", "workload": "467 in / 256 out", "ceilings": CPU, "levels": levels})
    assert [r[0].split(", ")[-2] for r in rows] == ["2 req/s", "concurrency 256"]
    assert rows[1][1].startswith("900 out tok/s, 2.00 req/s; TTFT p50 5.0 / p99 7.0 ms")
    assert rows[1][2].endswith("(Triton = 90.0%)")


def test_profile_table_shows_each_group_against_its_ideal() -> None:
    groups = {g: {"ms": 2.0, "ideal_ms": 1.0, "fraction_of_ideal": 0.5}
              for g in ("matmul", "attention", "rope+kv write", "rmsnorm", "silu_and_mul")}  # fmt: skip
    groups["other"] = {"ms": 0.1, "ideal_ms": None, "fraction_of_ideal": None}
    row = {"step": "s", "eager_step_ms": 20.0, "kernel_ms": 10.1, "ideal_ms": 5.0, "groups": groups}
    result = {"device": "NVIDIA H200", "date": "2026-11-21T00:00:00", "steps": [row, row | {"graph_step_ms": 11.0}],
              "ceilings": {"copy_bandwidth_gbs": 4000.0, "bf16_matmul_tflops": 800.0}}  # fmt: skip
    lines = profile_table(result).splitlines()
    assert (
        lines[2]
        == "| s | 20.00 | 10.10 | 5.00 | 2.00 (50%) | 2.00 (50%) | 2.00 (50%) | 2.00 (50%) | 2.00 (50%) | 0.10 | not run |"
    )
    assert lines[3].endswith("| 0.10 | 11.00 |")
    assert "profile-steps-h200.json" in lines[-1]


def test_a_missed_goal_above_the_held_rate_ideal_says_so() -> None:
    row = _check("128/128 offline, out tok/s", 18_000, 20_000, "", True, "r.json", bound=19_442)
    assert "| missed by 10.0%; above the ideal at the held matmul rate (19,442) |" in row
    assert "| missed by 10.0% |" in _check("x", 18_000, 20_000, "", True, "r.json", bound=21_000)
    assert "| met |" in _check("x", 20_500, 20_000, "", True, "r.json", bound=19_442)


def test_fp8_targets_read_each_result_and_show_the_trtllm_figure(tmp_path, monkeypatch) -> None:
    import json

    import benchmarks.report_targets as report

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    throughput = {"inflight": {"output_tok_s": 31_234.5}, "ideal": {"ideal_out_tok_s_sustained": 60_000.0},
                  "workload": "30000 requests, 128 in / 128 out"}  # fmt: skip
    (tmp_path / "fp8-throughput-128x128-h100.json").write_text(json.dumps(throughput))
    short = {
        **throughput,
        "inflight": {"output_tok_s": 9_000.0},
        "workload": "300 requests, 2048 in / 2048 out",
    }
    (tmp_path / "fp8-throughput-2048x2048-h100.json").write_text(json.dumps(short))
    gemm = {"linears": [{"m": 1, "speedup_vs_bf16": 1.7}, {"m": 1024, "speedup_vs_bf16": 1.3},
                        {"m": 4096, "speedup_vs_bf16": 1.65}]}  # fmt: skip
    (tmp_path / "fp8-gemm-h100.json").write_text(json.dumps(gemm))
    serving = {"levels": [{"mode": "rate", "value": 2, "triton": _stats(100.0)},
                          {"mode": "unlimited", "value": "all at once", "triton": _stats(12_000.0)}]}  # fmt: skip
    (tmp_path / "fp8-serving-h100.json").write_text(json.dumps(serving))
    rows = report.fp8_targets("h100").splitlines()
    assert rows[2] == ("| 128/128 offline FP8, out tok/s | 31,234.5 | ≥ 30000 | met | 28,837 "
                       "| fp8-throughput-128x128-h100.json |")  # fmt: skip
    assert "| 1000/1000 offline FP8, out tok/s | not measured | ≥ 16000 | - | 15,270 |" in rows[3]
    assert "| 9,000.0 | ≥ 10000 | on 300 requests, not 1,500: missed by 10.0% | 9,488 |" in rows[4]
    gemm_rows = [r for r in rows if "FP8 GEMM" in r]
    assert [r.split(" | ")[1:4] for r in gemm_rows] == [
        ["1.3x", "≥ 1x", "met"],
        ["1.3x", "≥ 1.4x", "missed by 7.1%"],
        ["1.6x", "≥ 1.6x", "met"],
    ]  # the worst ratio from each M on (1.65 shows as 1.6 at one decimal)
    assert "| 2 req/s 467/256 via Triton FP8: TTFT p50 | 5.0 ms | ≤ 14 ms | met |" in "\n".join(rows)
    unlimited = [r for r in rows if "unlimited rate, FP8" in r][0]
    assert "| 12,000.0 | ≥ 9420 | met | 9,420 (bf16, Triton) | fp8-serving-h100.json |" in unlimited


def test_scaling_targets_read_the_70b_and_tensor_parallel_results(tmp_path, monkeypatch) -> None:
    import json

    import benchmarks.report_targets as report

    monkeypatch.setattr(report, "RESULTS", tmp_path)

    def write(name: str, tok_s: float, workload: str = "3000 requests, 1000 in / 1000 out") -> None:
        (tmp_path / name).write_text(json.dumps({"inflight": {"output_tok_s": tok_s, "tok_s": tok_s},
                                                 "workload": workload}))  # fmt: skip

    write("fp8-70b-throughput-1000x1000-h200.json", 3_000.0, "1000 requests, 1000 in / 1000 out")
    write("fp8-70b-tp2-throughput-1000x1000-h200.json", 6_000.0)
    write("tp1-decode-h200.json", 100.0)
    write("tp2-decode-h200.json", 170.0)
    rows = report.scaling_targets("h200").splitlines()
    assert rows[2] == ("| 70B FP8 1000/1000 on one GPU, out tok/s | 3,000.0 | ≥ 3200 | on 1,000 requests, not 3,000: "
                       "missed by 6.2% | 2,909 | fp8-70b-throughput-1000x1000-h200.json |")  # fmt: skip
    assert "| 70B FP8 128/128 on one GPU, out tok/s | not measured | ≥ 4000 | - | 3,658 |" in rows[3]
    assert "| 8B bf16 batch-1 decode, TP 2 / TP 1 | 1.7x | ≥ 1.6x | met |" in rows[4]
    assert "| 70B FP8 1000/1000, TP 2 / TP 1 | 2.0x | ≥ 1.87x | met | 1.87x |" in rows[5]
    assert "| 70B FP8 1000/1000, TP 4 / TP 1 | not measured |" in rows[6]
    h100 = report.scaling_targets("h100")
    assert "on one GPU" not in h100  # the 70B weights fit one H200, not one H100
    assert "| 70B FP8 1000/1000 at TP 2, out tok/s | not measured | ≥ 4500 | - | 4,205 |" in h100
