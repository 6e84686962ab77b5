"""Offline engine throughput on random-token prompts with ignore_eos (trtllm-bench / nano-vllm style).

    python -m benchmarks.throughput --model /tmp/inflight-llama31-8b-random --isl 1000 --osl 1000 \
        --num-requests 1000 --out benchmarks/results/throughput-1000x1000-h200.json
    python -m benchmarks.throughput --random-lengths 100 1024 --num-requests 256 ...   (nano-vllm's set)

Reports output tokens per second over the whole run (first request in to last token out), next to HF
transformers eager `generate` in static batches measured in the same run on a subset.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from pathlib import Path

import torch

from benchmarks.common import environment, write_result


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


def bench_inflight(path: Path, requests, max_num_seqs: int, max_batched: int, dtype: str) -> dict:
    from inflight import LLM, SamplingParams

    max_len = max(len(p) + n for p, n in requests) + 8
    llm = LLM(str(path), dtype=dtype, max_model_len=max_len, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_batched, enable_prefix_caching=False)  # fmt: skip
    llm.generate([requests[0][0]], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))  # warm-up
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0) for _, n in requests]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params, use_tqdm=True)
    seconds = time.perf_counter() - start
    out_tokens = sum(o.num_output_tokens for o in outputs)
    in_tokens = sum(o.num_input_tokens for o in outputs)
    assert out_tokens == sum(n for _, n in requests), "every request must produce exactly its max_tokens"
    stats = llm.engine.scheduler.get_stats()
    result = {"seconds": round(seconds, 2), "output_tok_s": round(out_tokens / seconds, 1),
              "total_tok_s": round((in_tokens + out_tokens) / seconds, 1), "output_tokens": out_tokens,
              "num_kv_blocks": llm.engine.scheduler.kv_cache_manager.num_usable_blocks,
              "preemptions": stats.num_preemptions_total}  # fmt: skip
    del llm, outputs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


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
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    lengths = tuple(args.random_lengths) if args.random_lengths else None
    requests = make_requests(args.num_requests, args.isl, args.osl, lengths, vocab, seed=0)
    ours = bench_inflight(args.model, requests, args.max_num_seqs, args.max_num_batched_tokens, args.dtype)
    hf = bench_hf(args.model, requests, args.hf_batch, args.dtype) if args.hf_batch else None
    workload = f"{args.num_requests} requests, " + (
        f"in/out uniform {lengths[0]}..{lengths[1]}" if lengths else f"{args.isl} in / {args.osl} out"
    )
    result = {"benchmark": "offline_throughput", **environment(), "model": str(args.model.name),
              "workload": workload, "inflight": ours, "hf_eager": hf,
              "engine": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                         "dtype": args.dtype}}  # fmt: skip
    write_result(args.out, result)
    print(
        f"{workload}: inflight {ours['output_tok_s']} out tok/s ({ours['seconds']} s, "
        f"{ours['preemptions']} preemptions)" + (f"; HF eager {hf['output_tok_s']} out tok/s" if hf else "")
    )


if __name__ == "__main__":
    main()
