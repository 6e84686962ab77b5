"""`make bench`: the whole benchmark set, sized for the device, each step in a fresh process.

    python -m benchmarks.bench                                  # CPU: the default SmolLM2, small counts
    python -m benchmarks.bench --model /tmp/llama3-8b-random    # GPU: the published sets, full counts
    python -m benchmarks.bench --only serving --results-dir $OUT --tag h200

Steps (names for `--only`, comma-separated; prefixes match, so `throughput` runs all four):
`throughput-128x128`, `throughput-1000x1000`, `throughput-2048x2048`, `throughput-random256` (the offline
sets with HF eager and transformers' generate_batch as peers), `serving` (Triton vs engine-direct at the
Poisson rate and concurrencies of issue 5), then `python -m benchmarks.report` when the results went
to benchmarks/results/. A failing step is reported and the others still run; the exit status says if
any failed. Results: `<results-dir>/<step>-<tag>.json` (+ PNG plots when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import RESULTS, ROOT

DEFAULT_MODEL = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"

FP8 = (
    '--no-plots --max-num-batched-tokens 16384 --engine-option quantization="fp8" '
    '--engine-option kv_cache_dtype="fp8"'
)
SWAP = "--engine-option swap_space_bytes=17179869184"

# Per step: the module and its arguments on a GPU (the published sets) and on a CPU (the same shapes
# where they fit a few minutes of a small shared CPU, else shortened; the JSON names what ran).
GPU_STEPS = {
    # max_num_seqs as measured best on an H200 (128/128: 256 -> 13.7k, 512 -> 17.1k, 1024 -> 15.9k out tok/s;
    # on an H100, with decode graphs up to 1024: 512 -> 16.5k, 1024 -> 17.0k, the committed H100 result)
    "throughput-128x128": ("throughput", "--isl 128 --osl 128 --num-requests 1000 --hf-batch 128 --cb-requests 256 "
                                         "--max-num-seqs 512 --max-num-batched-tokens 16384 "
                                         "--engine-option max_cuda_graph_batch_size=512"),
    # 16 GiB of pinned host memory to swap preempted requests to: on an H100 (256 seqs) all 72 preemptions
    # were swapped instead of recomputed, 8,079 -> 8,186 out tok/s
    "throughput-1000x1000": ("throughput", "--isl 1000 --osl 1000 --num-requests 1000 --hf-batch 32 --cb-requests 16 "
                                           "--max-num-seqs 384 --max-num-batched-tokens 16384 "
                                           "--engine-option max_cuda_graph_batch_size=384 "
                                           "--engine-option swap_space_bytes=17179869184"),
    "throughput-2048x2048": ("throughput", "--isl 2048 --osl 2048 --num-requests 256 --hf-batch 32 --cb-requests 16"),
    "throughput-random256": ("throughput", "--random-lengths 100 1024 --num-requests 256 --hf-batch 64"),
    "serving": ("serving", "--isl 467 --osl 256 --rate 2 --rate-requests 64 --concurrency 1,16,64,256 "
                           "--requests-per-slot 2 --min-requests 16 --unlimited 500"),
    # FP8 (issue 20): W8A8 linears quantized at load + FP8 KV, trtllm-bench's request counts
    "fp8-gemm": ("kernels.bench_fp8_gemm", ""),
    "fp8-decode": ("decode_e2e", "--skip-hf --quantization fp8 --kv-cache-dtype fp8"),
    "fp8-throughput-128x128": ("throughput", f"--isl 128 --osl 128 --num-requests 30000 {FP8} "
                                             "--max-num-seqs 1024 --engine-option max_cuda_graph_batch_size=1024"),
    # Sized so the FP8 cache holds every running sequence at its full length (an H100's ~63k blocks of 16
    # hold ~1M tokens at 64 KiB each), with 16 GiB of host swap for the rest: the first H100 run at 768
    # sequences recomputed 1,084 preempted prompts (10,189 out tok/s). Past ~250 sequences the decode
    # GEMMs are compute-bound, so a larger batch buys little.
    "fp8-throughput-1000x1000": ("throughput", f"--isl 1000 --osl 1000 --num-requests 3000 {FP8} {SWAP} "
                                               "--max-num-seqs 512 --engine-option max_cuda_graph_batch_size=512"),
    "fp8-throughput-2048x2048": ("throughput", f"--isl 2048 --osl 2048 --num-requests 1500 {FP8} {SWAP} "
                                               "--max-num-seqs 256 --engine-option max_cuda_graph_batch_size=256"),
    "fp8-throughput-128x2048": ("throughput", f"--isl 128 --osl 2048 --num-requests 3000 {FP8} {SWAP} "
                                              "--max-num-seqs 480 --engine-option max_cuda_graph_batch_size=480"),
    "fp8-serving": ("serving", "--isl 467 --osl 256 --rate 2 --rate-requests 64 --concurrency 1,16,64,256 "
                               "--requests-per-slot 2 --min-requests 16 --unlimited 500 --engine-option quantization=\"fp8\" "
                               "--engine-option kv_cache_dtype=\"fp8\""),
}  # fmt: skip
CPU_STEPS = {
    "throughput-128x128": ("throughput", "--isl 128 --osl 128 --num-requests 8 --hf-batch 8 --cb-requests 2 "
                                         "--dtype float32 --max-num-seqs 8"),
    "throughput-1000x1000": ("throughput", "--isl 1000 --osl 64 --num-requests 2 --hf-batch 2 "
                                           "--dtype float32 --max-num-seqs 8"),
    "throughput-2048x2048": ("throughput", "--isl 2048 --osl 32 --num-requests 1 --hf-batch 1 "
                                           "--dtype float32 --max-num-seqs 8"),
    "throughput-random256": ("throughput", "--random-lengths 16 128 --num-requests 8 --hf-batch 4 "
                                           "--dtype float32 --max-num-seqs 8"),
    "serving": ("serving", "--isl 128 --osl 32 --rate 0.5 --rate-requests 6 --concurrency 1,4 "
                           "--requests-per-slot 2 --min-requests 4 --kv-cache-memory-bytes 268435456"),
}  # fmt: skip


def default_tag() -> str:
    """`h200`, `h100`, ... from the GPU's name; `cpu` without one."""
    if not torch.cuda.is_available():
        return "cpu"
    words = torch.cuda.get_device_name().lower().replace("nvidia", "").split()
    return words[0] if words else "gpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", type=Path, help="HF checkpoint (default: SmolLM2 on CPU; required on a GPU)"
    )
    parser.add_argument("--only", default="", help="comma-separated step names or prefixes")
    parser.add_argument("--profile", choices=("auto", "gpu", "cpu"), default="auto")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--tag", help="suffix of the result files (default: the GPU's name, or cpu)")
    parser.add_argument("--extra", default="", help="arguments added to every step (e.g. '--no-plots')")
    args = parser.parse_args(argv)
    gpu = args.profile == "gpu" or (args.profile == "auto" and torch.cuda.is_available())
    steps = GPU_STEPS if gpu else CPU_STEPS
    if gpu and args.model is None:
        parser.error(
            "on a GPU give --model (BENCH_MODEL=...): e.g. python -m benchmarks.random_models --out DIR"
        )
    model = args.model or DEFAULT_MODEL
    if not (model / "config.json").is_file():
        parser.error(f"{model} is not a Hugging Face checkpoint folder (run `make model`?)")
    wanted = [w for w in args.only.split(",") if w]
    names = [n for n in steps if not wanted or any(n.startswith(w) for w in wanted)]
    if not names:
        parser.error(f"--only {args.only!r} matches none of {', '.join(steps)}")
    tag = args.tag or default_tag()
    print(f"bench: {'GPU' if gpu else 'CPU'} profile, model {model}, steps {', '.join(names)}, "
          f"results {args.results_dir}/<step>-{tag}.json", flush=True)  # fmt: skip
    failed, begin = [], time.monotonic()
    for i, name in enumerate(names, 1):
        module, step_args = steps[name]
        out = args.results_dir / f"{name}-{tag}.json"
        command = [sys.executable, "-m", f"benchmarks.{module}", "--model", str(model), *step_args.split(),
                   *args.extra.split(), "--out", str(out)]  # fmt: skip
        print(f"\n##### [{i}/{len(names)}] {name} ({time.monotonic() - begin:.0f} s so far)\n$ {' '.join(command)}",
              flush=True)  # fmt: skip
        start = time.monotonic()
        code = subprocess.call(command, cwd=ROOT)
        print(f"##### {name}: {'OK' if code == 0 else f'FAILED (exit {code})'} in {time.monotonic() - start:.0f} s",
              flush=True)  # fmt: skip
        if code != 0:
            failed.append(name)
    if args.results_dir.resolve() == RESULTS.resolve():
        print("\nregenerating the README performance table ...", flush=True)
        subprocess.call([sys.executable, "-m", "benchmarks.report"], cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"\nbench: {len(names) - len(failed)}/{len(names)} steps OK in {time.monotonic() - begin:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
