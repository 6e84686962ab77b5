"""End-to-end batch-1 decode speed against the weight-read roofline, next to HF transformers eager.

    python -m benchmarks.decode_e2e --model /tmp/inflight-llama31-8b-random --out benchmarks/results/x.json
    python -m benchmarks.decode_e2e --shape llama3-70b --load-format dummy --skip-hf --quantization fp8 ...

Roofline: every decode step reads every weight once (the input embedding only one row), so
``tok/s <= copy bandwidth / bytes of weights``, with the copy bandwidth measured in the same run. With
``--quantization fp8`` the weights are the FP8 model's (decoder linears at one byte, their scales, the
embeddings and head in bf16): the FP8 weight-read roofline.

The model is a random ``--shape`` checkpoint that this script writes to ``--model`` (kept if there); with
``--load-format dummy`` a folder without weights instead (``random_models.build_config_only_model``), the
engine drawing random weights at load (no HF peer then: ``--skip-hf``).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from benchmarks.common import copy_bandwidth_gbs, environment, write_result
from benchmarks.random_models import SHAPES, build_config_only_model, build_random_model


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    embed = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    row = embed.shape[1] * embed.element_size()
    tied = model.lm_head is None
    # The embedding table is read once per token only as the (untied) head; the lookup reads one row.
    return total - (0 if tied else embed.numel() * embed.element_size()) + row


def bench_inflight(path: Path, prompt_len: int, new_tokens: int, repeats: int, **options) -> dict:
    from inflight import LLM, SamplingParams

    llm = LLM(str(path), dtype="bfloat16", max_model_len=prompt_len + new_tokens + 16, max_num_seqs=8,
              kv_cache_memory_bytes=2 << 30, **options)  # fmt: skip
    engine = llm.engine
    bytes_per_token = weight_bytes_per_token(engine.executor.runner.model)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    prompt = list(range(1000, 1000 + prompt_len))
    llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    rates, step_ms = [], []
    for r in range(repeats):
        engine.add_request(f"bench-{r}", prompt, params)
        times = []
        while engine.has_unfinished_requests():
            engine.step()
            times.append(time.perf_counter())
        decode_s = times[-1] - times[0]  # from the first token (after prefill) to the last
        rates.append((len(times) - 1) / decode_s)
        step_ms.append(1e3 * decode_s / (len(times) - 1))
    gpu_ms = _gpu_step_ms(engine)
    del llm, engine
    gc.collect()
    torch.cuda.empty_cache()
    best = max(rates)
    step = min(step_ms)
    return {"tok_s": round(best, 1), "step_ms": round(step, 3), "gpu_step_ms": round(gpu_ms, 3),
            "cpu_fraction_of_step": round(max(0.0, 1 - gpu_ms / step), 3),
            "all_tok_s": [round(x, 1) for x in rates], "weight_bytes_per_token": bytes_per_token}  # fmt: skip


def _gpu_step_ms(engine, iters: int = 50) -> float:
    """GPU time of one batch-1 decode step alone: the graph replay, the logits and an argmax."""
    graphs = engine.executor.runner.graphs
    if graphs is None:
        return float("nan")
    model = engine.executor.runner.model
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        for i in range(iters + 5):
            if i == 5:
                start.record()
            graphs.graphs[(1, 1)].replay()
            model.compute_logits(graphs.outputs[(1, 1)]).argmax(-1)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bench_hf(path: Path, prompt_len: int, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    ids = torch.arange(1000, 1000 + prompt_len, device="cuda")[None]
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=new_tokens)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, **kwargs | {"min_new_tokens": 8})
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    n = out.shape[1] - prompt_len
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"tok_s": round(n / seconds, 1), "new_tokens": n}


def _default_model(shape: str, dummy: bool) -> str:
    if shape == "llama3-8b" and not dummy:
        return "/tmp/inflight-llama31-8b-random"  # the GPU tests' folder (tests/gpu/conftest.py)
    return f"/tmp/inflight-{shape}-{'config' if dummy else 'random'}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="the model folder, built if missing (default: by shape)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help='"dummy": a folder without weights, random weights drawn at load')  # fmt: skip
    parser.add_argument("--tokenizer-dir", type=Path, default=Path(".gpu/tok"))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--quantization", choices=["fp8"], default=None)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks (GPUs) the model is split over; the roofline is then one rank's share of "
                             "the weights at the copy bandwidth")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dummy = args.load_format == "dummy"
    if dummy and not args.skip_hf:
        parser.error("--load-format dummy has no weights for HF transformers: add --skip-hf")
    if args.model is None:
        args.model = Path(_default_model(args.shape, dummy))
    if dummy:
        build_config_only_model(args.shape, args.model, tokenizer_dir=args.tokenizer_dir)
    else:
        build_random_model(args.shape, args.model, tokenizer_dir=args.tokenizer_dir)
    copy_gbs = copy_bandwidth_gbs()
    ours = bench_inflight(args.model, args.prompt_len, args.new_tokens, args.repeats,
                          quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                          load_format=args.load_format,
                          tensor_parallel_size=args.tensor_parallel_size)  # fmt: skip
    roofline = copy_gbs * 1e9 / ours["weight_bytes_per_token"]
    hf = None if args.skip_hf else bench_hf(args.model, args.prompt_len, args.new_tokens)
    result = {
        "benchmark": "decode_e2e_batch1",
        **environment(),
        "model": f"{args.shape} shape, random weights{' (dummy, drawn at load)' if dummy else ''}, bf16"
        + (", FP8 linears (quantized at load)" if args.quantization else "")
        + (", FP8 KV" if args.kv_cache_dtype == "fp8" else ""),
        "engine": {
            "quantization": args.quantization,
            "kv_cache_dtype": args.kv_cache_dtype,
            "load_format": args.load_format,
            "tensor_parallel_size": args.tensor_parallel_size,
        },
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "ceilings": {"copy_bandwidth_gbs": round(copy_gbs, 1), "roofline_tok_s": round(roofline, 1)},
        "inflight": ours | {"fraction_of_roofline": round(ours["tok_s"] / roofline, 3)},
        "hf_eager": hf,
    }
    write_result(args.out, result)
    print(
        f"\n{'system':<14}{'tok/s':>9}{'% roofline':>12}\n{'inflight':<14}{ours['tok_s']:>9.1f}"
        f"{100 * ours['tok_s'] / roofline:>11.1f}%   (step {ours['step_ms']} ms, GPU {ours['gpu_step_ms']} ms)"
    )
    if hf:
        print(f"{'HF eager':<14}{hf['tok_s']:>9.1f}{100 * hf['tok_s'] / roofline:>11.1f}%")
    print(
        f"roofline {roofline:.1f} tok/s = copy {copy_gbs:.0f} GB/s / {ours['weight_bytes_per_token'] / 1e9:.2f} GB"
    )


if __name__ == "__main__":
    main()
