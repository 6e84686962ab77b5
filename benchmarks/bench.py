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

The FP8 steps (`fp8-*`) run on dummy weights (`load_format="dummy"`: random weights drawn at load, nothing
read), so `--model` may be a folder without weights (`python -m benchmarks.random_models --config-only`; a
full checkpoint's weights are ignored). The `fp8-70b-*` steps run the Llama-3-70B shape from a config-only
folder that bench builds under `--config-only-dir` with `--model`'s tokenizer (padded to the vocabulary), on
a GPU of at least 120 GiB (an H200; skipped on smaller ones).
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
# Random weights drawn at load, nothing read from --model but its config.json and tokenizer (decode_e2e builds
# its own folder: --load-format; it keeps --model's when there is one).
DUMMY = '--engine-option load_format="dummy"'

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
    "fp8-decode": ("decode_e2e", "--skip-hf --quantization fp8 --kv-cache-dtype fp8 --load-format dummy"),
    "fp8-throughput-128x128": ("throughput", f"--isl 128 --osl 128 --num-requests 30000 {FP8} {DUMMY} "
                                             "--max-num-seqs 1024 --engine-option max_cuda_graph_batch_size=1024"),
    # Sized so the FP8 cache holds every running sequence at its full length (an H100's ~63k blocks of 16
    # hold ~1M tokens at 64 KiB each), with 16 GiB of host swap for the rest: the first H100 run at 768
    # sequences recomputed 1,084 preempted prompts (10,189 out tok/s). Past ~250 sequences the decode
    # GEMMs are compute-bound, so a larger batch buys little.
    "fp8-throughput-1000x1000": ("throughput", f"--isl 1000 --osl 1000 --num-requests 3000 {FP8} {SWAP} {DUMMY} "
                                               "--max-num-seqs 512 --engine-option max_cuda_graph_batch_size=512"),
    "fp8-throughput-2048x2048": ("throughput", f"--isl 2048 --osl 2048 --num-requests 1500 {FP8} {SWAP} {DUMMY} "
                                               "--max-num-seqs 256 --engine-option max_cuda_graph_batch_size=256"),
    "fp8-throughput-128x2048": ("throughput", f"--isl 128 --osl 2048 --num-requests 3000 {FP8} {SWAP} {DUMMY} "
                                              "--max-num-seqs 480 --engine-option max_cuda_graph_batch_size=480"),
    "fp8-serving": ("serving", "--isl 467 --osl 256 --rate 2 --rate-requests 64 --concurrency 1,16,64,256 "
                               "--requests-per-slot 2 --min-requests 16 --unlimited 500 --engine-option quantization=\"fp8\" "
                               f"--engine-option kv_cache_dtype=\"fp8\" {DUMMY}"),
    # Llama-3-70B FP8 on one H200 (issue 22): ~68.5 GB of FP8 linears + 4.2 GB of bf16 embedding and head,
    # drawn from a config-only folder (CONFIG_ONLY) with each linear quantized as soon as it is drawn: the
    # ~141 GB bf16 model never exists. trtllm-bench's counts (perf-overview's dataset table: 1000/1000 3,000
    # requests, 128/128 30,000; its Llama-3.3-70B FP8 figures are TP2 on H100/H200). FP8 KV is 160 KiB a token
    # (80 layers x 2 x 8 KV heads x 128 x 1 byte); the ~55 GB left after the weights and the step's peak hold
    # ~350k tokens: 1000/1000 at its full 2,000 tokens 160 sequences (16 GiB of host swap for the rest),
    # 128/128 (256 tokens) 512 (the largest graph batch; the decode GEMMs are compute-bound well below).
    # At the trtllm-bench counts each takes ~20 min on an H200 (estimate); `--extra="--num-requests N"` shortens it.
    "fp8-70b-throughput-1000x1000": ("throughput", f"--isl 1000 --osl 1000 --num-requests 3000 {FP8} {SWAP} {DUMMY} "
                                                   "--max-num-seqs 160 --engine-option max_cuda_graph_batch_size=160"),
    "fp8-70b-throughput-128x128": ("throughput", f"--isl 128 --osl 128 --num-requests 30000 {FP8} {SWAP} {DUMMY} "
                                                 "--max-num-seqs 512 --engine-option max_cuda_graph_batch_size=512"),
    # Tensor parallelism (issue 22), on a machine with several GPUs of one host (MIN_GPUS; skipped elsewhere):
    # bf16 batch-1 decode at TP 2 (goal >= 1.6x TP 1's `fp8-decode`-style bf16 decode); 70B FP8 1000/1000 at
    # TP 2 (H100 goal >= 4,500 out tok/s, TensorRT-LLM 4,205) and TP 4 (>= 8,000; 7,427), twice / four times
    # the sequences of one GPU's KV share.
    "tp2-decode": ("decode_e2e", "--skip-hf --load-format dummy --tensor-parallel-size 2"),
    "tp1-decode": ("decode_e2e", "--skip-hf --load-format dummy"),
    "fp8-70b-tp2-throughput-1000x1000": ("throughput", f"--isl 1000 --osl 1000 --num-requests 3000 {FP8} {SWAP} "
                                                       f"{DUMMY} --engine-option tensor_parallel_size=2 "
                                                       "--max-num-seqs 256 --engine-option max_cuda_graph_batch_size=256"),
    "fp8-70b-tp4-throughput-1000x1000": ("throughput", f"--isl 1000 --osl 1000 --num-requests 3000 {FP8} {SWAP} "
                                                       f"{DUMMY} --engine-option tensor_parallel_size=4 "
                                                       "--max-num-seqs 512 --engine-option max_cuda_graph_batch_size=512"),
}  # fmt: skip
MIN_GPUS = {"tp2-decode": 2, "fp8-70b-tp2-throughput-1000x1000": 2, "fp8-70b-tp4-throughput-1000x1000": 4}
# Steps on another shape than --model's: run from a config-only folder of that shape (built with --model's
# tokenizer under --config-only-dir), and only on a GPU of at least MIN_GPU_GIB (else skipped, not failed).
CONFIG_ONLY = {
    "fp8-70b-throughput-1000x1000": "llama3-70b",
    "fp8-70b-throughput-128x128": "llama3-70b",
    "fp8-70b-tp2-throughput-1000x1000": "llama3-70b",
    "fp8-70b-tp4-throughput-1000x1000": "llama3-70b",
}
MIN_GPU_GIB = {"fp8-70b-throughput-1000x1000": 120, "fp8-70b-throughput-128x128": 120}
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


def _gpu_gib() -> float:
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def config_only_model(shape: str, root: Path, tokenizer_from: Path) -> Path:
    """``root/shape``: ``shape``'s folder without weights (load_format="dummy"), with ``tokenizer_from``'s
    tokenizer padded to the shape's vocabulary; built once, kept."""
    from benchmarks.random_models import build_config_only_model

    return build_config_only_model(shape, root / shape, tokenizer_dir=tokenizer_from, pad_tokenizer=True)


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
    parser.add_argument("--config-only-dir", type=Path, default=Path("/tmp/inflight-config-only"),
                        help="where the fp8-70b-* steps' config-only folders are built (one per shape)")  # fmt: skip
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
    failed, skipped, begin = [], [], time.monotonic()
    for i, name in enumerate(names, 1):
        module, step_args = steps[name]
        out = args.results_dir / f"{name}-{tag}.json"
        print(f"\n##### [{i}/{len(names)}] {name} ({time.monotonic() - begin:.0f} s so far)", flush=True)
        if gpu and torch.cuda.device_count() < MIN_GPUS.get(name, 1):
            print(f"##### {name}: skipped (needs {MIN_GPUS[name]} GPUs, this machine has "
                  f"{torch.cuda.device_count()})", flush=True)  # fmt: skip
            skipped.append(name)
            continue
        too_small = gpu and name in MIN_GPU_GIB and _gpu_gib() < MIN_GPU_GIB[name]
        if too_small:
            print(f"##### {name}: skipped (needs {MIN_GPU_GIB[name]} GiB of GPU memory, this GPU has "
                  f"{_gpu_gib():.0f})", flush=True)  # fmt: skip
            skipped.append(name)
            continue
        step_model = model
        if name in CONFIG_ONLY:
            try:
                step_model = config_only_model(CONFIG_ONLY[name], args.config_only_dir, model)
            except Exception as exc:  # noqa: BLE001 - reported as the step's failure
                print(
                    f"##### {name}: FAILED building its config-only folder: {type(exc).__name__}: {exc}",
                    flush=True,
                )
                failed.append(name)
                continue
        command = [sys.executable, "-m", f"benchmarks.{module}", "--model", str(step_model), *step_args.split(),
                   *args.extra.split(), "--out", str(out)]  # fmt: skip
        print(f"$ {' '.join(command)}", flush=True)
        start = time.monotonic()
        code = subprocess.call(command, cwd=ROOT)
        print(f"##### {name}: {'OK' if code == 0 else f'FAILED (exit {code})'} in {time.monotonic() - start:.0f} s",
              flush=True)  # fmt: skip
        if code != 0:
            failed.append(name)
    if args.results_dir.resolve() == RESULTS.resolve():
        print("\nregenerating the README performance table ...", flush=True)
        subprocess.call([sys.executable, "-m", "benchmarks.report"], cwd=ROOT, stdout=subprocess.DEVNULL)
    ran = len(names) - len(skipped)
    print(f"\nbench: {ran - len(failed)}/{ran} steps OK in {time.monotonic() - begin:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else "")
          + (f"; skipped: {', '.join(skipped)}" if skipped else ""), flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
