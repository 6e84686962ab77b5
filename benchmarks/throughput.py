"""Offline engine throughput on random-token prompts with ignore_eos (trtllm-bench / nano-vllm style).

    python -m benchmarks.throughput --model /tmp/inflight-llama31-8b-random --isl 1000 --osl 1000 \
        --num-requests 1000 --out benchmarks/results/throughput-1000x1000-h200.json
    python -m benchmarks.throughput --random-lengths 100 1024 --num-requests 256 ...   (nano-vllm's set)

Reports output tokens per second over the whole run (first request in to last token out), next to two
peers measured in the same run on the same model: HF transformers eager `generate` in one static batch
(`--hf-batch N`: the first N requests) and transformers' own continuous batching (`generate_batch` with
paged SDPA attention, `--cb-requests N`: the first N requests; fixed lengths only, since it takes one
`max_new_tokens` per call), and the ratios inflight / peer (output tok/s). The device's ceilings (copy
bandwidth and matmul rate) are measured first.

`--engine-option load_format="dummy"` runs on random weights drawn at load, so `--model` may be a folder
without weights (`python -m benchmarks.random_models --config-only`); the HF peers need real weights then.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from pathlib import Path

import torch

from benchmarks.common import (
    add_engine_option_argument,
    ceilings,
    describe_ceilings,
    engine_option_values,
    environment,
    write_result,
)
from benchmarks.gpu_timing import GpuStepTimer
from benchmarks.roofline import ideal_for_run


def make_requests(
    num: int, isl: int, osl: int, random_lengths: tuple[int, int] | None, vocab: int, seed: int
):
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n_in, n_out = (
            (rng.randint(*random_lengths), rng.randint(*random_lengths)) if random_lengths else (isl, osl)
        )
        out.append(([rng.randrange(10, vocab - 10) for _ in range(n_in)], n_out))
    return out


def bench_inflight(
    path: Path, requests, max_num_seqs: int, max_batched: int, dtype: str, options: dict | None = None
) -> dict:
    from inflight import LLM, SamplingParams

    max_len = max(len(p) + n for p, n in requests) + 8
    llm = LLM(str(path), dtype=dtype, max_model_len=max_len, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_batched, enable_prefix_caching=False, **(options or {}))  # fmt: skip
    llm.generate([requests[0][0]], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))  # warm-up
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0) for _, n in requests]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timer = GpuStepTimer.attach(llm.engine)
    before = _allocator_counts()
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params, use_tqdm=True)
    seconds = time.perf_counter() - start
    after = _allocator_counts()
    breakdown = timer.breakdown()
    idle = timer.idle_gaps()
    busy = None if breakdown is None else sum(k["gpu_seconds"] for k in breakdown.values())
    out_tokens = sum(o.num_output_tokens for o in outputs)
    in_tokens = sum(o.num_input_tokens for o in outputs)
    assert out_tokens == sum(n for _, n in requests), "every request must produce exactly its max_tokens"
    stats = llm.engine.stats()
    result = {"seconds": round(seconds, 2), "output_tok_s": round(out_tokens / seconds, 1),
              "total_tok_s": round((in_tokens + out_tokens) / seconds, 1), "output_tokens": out_tokens,
              "num_kv_blocks": llm.engine.num_kv_blocks,
              "preemptions": stats.num_preemptions_total,
              # the part of the run the GPU sat idle waiting for the host (None on CPU)
              "host_bound_fraction": None if busy is None else round(max(0.0, 1 - busy / seconds), 4),
              "gpu_steps": breakdown,
              # the device idle between steps (waiting for the host), its largest gaps (None on CPU)
              "gpu_idle": idle,
              # torch's CUDA caching allocator during the run: retries free the cache (a device sync)
              "allocator": None if after is None else {k: after[k] - before[k] for k in after},
              "engine_options": options or {}}  # fmt: skip
    del llm, outputs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _allocator_counts() -> dict[str, int] | None:
    if not torch.cuda.is_available():
        return None
    stats = torch.cuda.memory_stats()
    keys = ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc", "num_device_free")
    return {k: int(stats.get(k, 0)) for k in keys}


def bench_hf(path: Path, requests, batch_size: int, dtype: str) -> dict:
    """HF eager `generate` over static batches of equal-length prompts (the first `batch_size` requests)."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    batch = requests[:batch_size]
    isl = min(len(p) for p, _ in batch)
    osl = min(n for _, n in batch)
    ids = torch.tensor([p[:isl] for p, _ in batch], device=device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=osl, max_new_tokens=osl
    )
    with torch.no_grad():
        model.generate(ids[:, :8], **(kwargs | {"attention_mask": torch.ones_like(ids[:, :8]),
                                                "min_new_tokens": 2, "max_new_tokens": 2}))  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    n = (out.shape[1] - isl) * out.shape[0]
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"batch_size": len(batch), "isl": isl, "osl": osl, "seconds": round(seconds, 2),
            "output_tok_s": round(n / seconds, 1)}  # fmt: skip


def bench_hf_continuous(path: Path, requests, num: int, dtype: str) -> dict:
    """transformers' continuous batching (`generate_batch`, paged SDPA) on the first `num` requests.

    NOTE: under `torch.no_grad()` (generate_batch's own), not `inference_mode`, which breaks it (seen with
    transformers 5.17). `eos_token_id=-1` turns EOS off (ignore_eos). The rate counts from the first
    request's creation to the last token when the outputs carry timestamps (the manager's start-up and
    warm-up left out, in the peer's favour), else over the whole call; both are kept.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    batch = requests[:num]
    lengths = {n for _, n in batch}
    if len(lengths) != 1:
        return {"skipped": "generate_batch takes one max_new_tokens per call; the output lengths differ"}
    (osl,) = lengths
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="paged|sdpa"
    ).to(device)
    model.eval()
    config = GenerationConfig(max_new_tokens=osl, do_sample=False, eos_token_id=-1, pad_token_id=0)
    kwargs = {"generation_config": config, "progress_bar": True}
    try:
        start = time.perf_counter()
        try:
            outputs = model.generate_batch(inputs=[p for p, _ in batch], record_timestamps=True, **kwargs)
        except TypeError:  # an older transformers without record_timestamps
            outputs = model.generate_batch(inputs=[p for p, _ in batch], **kwargs)
        wall = time.perf_counter() - start
    finally:
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    results = list(outputs.values())
    tokens = sum(len(r.generated_tokens) for r in results)
    result = {"num_requests": len(batch), "completed": len(results), "output_tokens": tokens,
              "wall_seconds": round(wall, 2), "wall_output_tok_s": round(tokens / wall, 1)}  # fmt: skip
    stamps = [r.timestamps for r in results if getattr(r, "timestamps", None)]
    if len(stamps) == len(results) and results:
        seconds = max(s[-1] for s in stamps) - min(r.created_time for r in results)
        result |= {"seconds": round(seconds, 2), "output_tok_s": round(tokens / seconds, 1)}
    else:
        result |= {"seconds": result["wall_seconds"], "output_tok_s": result["wall_output_tok_s"]}
    if tokens != len(batch) * osl:
        result["warning"] = f"{tokens} output tokens, expected {len(batch) * osl}"
    return result


def _run_peer(name: str, fn, *args) -> dict | None:
    """A peer's figures, or why it did not run (a peer failing must not lose the inflight figures)."""
    print(f"--- peer: {name} ...", flush=True)
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - recorded in the result
        print(f"peer {name} failed: {type(exc).__name__}: {exc}", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--random-lengths", type=int, nargs=2, metavar=("MIN", "MAX"))
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--hf-batch", type=int, default=0, help="also time HF eager on a static batch this big"
    )
    parser.add_argument(
        "--cb-requests",
        type=int,
        default=0,
        help="also time transformers generate_batch on this many requests",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-plots", action="store_true")
    add_engine_option_argument(parser)
    args = parser.parse_args()
    options = engine_option_values(args.engine_option)
    if options.get("load_format") == "dummy" and (args.hf_batch or args.cb_requests):
        # NOTE: a config-only folder (benchmarks/random_models.py --config-only) has no weights for HF to load
        parser.error(
            '--hf-batch / --cb-requests load the checkpoint with transformers: not with load_format="dummy"'
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model)
    vocab = config.vocab_size
    lengths = tuple(args.random_lengths) if args.random_lengths else None
    requests = make_requests(args.num_requests, args.isl, args.osl, lengths, vocab, seed=0)
    workload = f"{args.num_requests} requests, " + (
        f"in/out uniform {lengths[0]}..{lengths[1]}" if lengths else f"{args.isl} in / {args.osl} out"
    )
    print(
        f"=== offline throughput: {args.model.name}, {workload} ===\nmeasuring the device's ceilings ...",
        flush=True,
    )
    fp8 = options.get("quantization") == "fp8"
    kv_fp8 = options.get("kv_cache_dtype") == "fp8"
    ceiling = ceilings(fp8=fp8)
    print(f"ceilings: {describe_ceilings(ceiling)}\n--- inflight ...", flush=True)
    ours = bench_inflight(
        args.model, requests, args.max_num_seqs, args.max_num_batched_tokens, args.dtype, options
    )
    print(
        f"inflight: {ours['output_tok_s']} out tok/s, host-bound fraction {ours['host_bound_fraction']}, "
        f"GPU steps {ours['gpu_steps']}",
        flush=True,
    )
    hf = (
        _run_peer("HF eager generate", bench_hf, args.model, requests, args.hf_batch, args.dtype)
        if args.hf_batch
        else None
    )
    cb = (_run_peer("HF generate_batch", bench_hf_continuous, args.model, requests, args.cb_requests, args.dtype)
          if args.cb_requests else None)  # fmt: skip
    ideal = ideal_for_run(config, [(len(p), n) for p, n in requests], ceiling, fp8=fp8, kv_fp8=kv_fp8)
    tp = int(options.get("tensor_parallel_size", 1))
    if tp > 1:
        # NOTE: the ceilings are one GPU's; N ranks at them with no communication cost: N times the rate.
        ideal = {k: round(v * tp, 1) if "tok_s" in k else round(v / tp, 2) for k, v in ideal.items()}
        ideal["tensor_parallel_size"] = tp
    ours["fraction_of_ideal"] = round(ours["output_tok_s"] / ideal["ideal_out_tok_s"], 4)
    if "ideal_out_tok_s_sustained" in ideal:
        ours["fraction_of_sustained_ideal"] = round(
            ours["output_tok_s"] / ideal["ideal_out_tok_s_sustained"], 4
        )
    print(f"ideal at the measured ceilings (benchmarks/roofline.py): {ideal}", flush=True)
    ratios = {name: round(ours["output_tok_s"] / peer["output_tok_s"], 2)
              for name, peer in (("over_hf_eager", hf), ("over_hf_continuous_batching", cb))
              if peer and peer.get("output_tok_s")}  # fmt: skip
    result = {"benchmark": "offline_throughput", **environment(), "model": str(args.model.name),
              "workload": workload, "ceilings": ceiling, "ideal": ideal, "inflight": ours, "hf_eager": hf,
              "hf_continuous_batching": cb, "ratios": ratios,
              "engine": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                         "dtype": args.dtype, **options}}  # fmt: skip
    write_result(args.out, result)
    peers = "".join(
        f"; {name} {p['output_tok_s']} out tok/s" if p and p.get("output_tok_s") else f"; {name}: {p}"
        for name, p in (("HF eager", hf), ("HF generate_batch", cb)) if p is not None
    )  # fmt: skip
    print(f"{workload}: inflight {ours['output_tok_s']} out tok/s ({ours['seconds']} s, "
          f"{ours['preemptions']} preemptions){peers}; ratios {ratios}; ceilings {describe_ceilings(ceiling)}")  # fmt: skip
    if not args.no_plots:
        from benchmarks.plots import plot_throughput

        plot_throughput(result, args.out)


if __name__ == "__main__":
    main()
