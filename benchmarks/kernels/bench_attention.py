"""Paged attention kernels on the GPU, against the memory / tensor-core ceilings measured in the same run
and next to torch SDPA on the same shapes (contiguous K/V).

    python -m benchmarks.kernels.bench_attention --out benchmarks/results/attention-h100.json
    (or: python benchmarks/kernels/bench_attention.py --out ...)

Decode (batch 64, context 4096, 32 query / 8 KV heads, head_dim 128, bf16, block size 16, shuffled block
ids): GB/s of K/V read (every cached K and V byte once), and % of the device-to-device copy bandwidth
(read + write counted). Prefill (one 4096-token causal sequence, same heads): TFLOP/s counting the causal
half, ``4 * T^2 / 2 * H * D``, and % of a bf16 8192^3 torch.matmul. Each kernel runs a small sweep of
its tuning knobs; the table shows the default and the best, the JSON all of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import copy_bandwidth_gbs, environment, matmul_tflops, write_result  # noqa: E402
from inflight.kernels.paged_decode_attention import (  # noqa: E402
    DEFAULT_BLOCK_N,
    DEFAULT_PARTITION_SIZE,
    paged_decode_attention,
)
from inflight.kernels.paged_prefill_attention import paged_prefill_attention  # noqa: E402


def bench_ms(fn) -> float:
    """Median milliseconds of ``fn`` (triton's do_bench: warm-up, L2 flushed between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def paged_cache(
    num_seqs: int, seq_len: int, num_kv_heads: int, head_dim: int, block_size: int, shuffle: bool
):
    """K/V caches holding ``num_seqs`` sequences of ``seq_len`` tokens, their block table (shuffled ids
    unless ``shuffle`` is False), and the same K/V as contiguous ``[num_seqs, num_kv_heads, seq_len, D]``."""
    blocks_per_seq = -(-seq_len // block_size)
    num_blocks = num_seqs * blocks_per_seq + 1
    ids = torch.arange(1, num_blocks)
    if shuffle:
        ids = ids[torch.randperm(num_blocks - 1)]
    block_tables = ids.view(num_seqs, blocks_per_seq).to(torch.int32).cuda()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")

    def contiguous(cache: torch.Tensor) -> torch.Tensor:
        seqs = cache[block_tables.long()].view(num_seqs, blocks_per_seq * block_size, num_kv_heads, head_dim)
        return seqs[:, :seq_len].transpose(1, 2).contiguous()

    return k_cache, v_cache, block_tables, contiguous(k_cache), contiguous(v_cache)


def sdpa(q, k, v, causal: bool) -> tuple[str, float, torch.Tensor]:
    """torch SDPA with GQA (``enable_gqa``), the first backend that accepts it: (name, ms, output)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    errors = []
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ):

        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

        try:
            out = run()
        except RuntimeError as e:
            errors.append(f"{backend.name}: {str(e).splitlines()[0][:120]}")
            continue
        return backend.name, bench_ms(run), out
    raise RuntimeError("no SDPA backend ran: " + "; ".join(errors))


def bench_decode(args, copy_gbs: float) -> dict:
    b, ctx, h, kvh, d = args.batch, args.context, args.heads, args.kv_heads, args.head_dim
    bs = args.block_size
    scale = d**-0.5
    k_cache, v_cache, block_tables, k, v = paged_cache(b, ctx, kvh, d, bs, shuffle=True)
    q = torch.randn(b, h, d, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    kv_bytes = 2 * b * kvh * ctx * d * k_cache.element_size()

    def row(ms: float, **extra) -> dict:
        gbs = kv_bytes / (ms / 1e3) / 1e9
        return {
            **extra,
            "ms": round(ms, 4),
            "kv_gbs": round(gbs, 1),
            "pct_copy": round(100 * gbs / copy_gbs, 1),
        }

    configs = []
    for partition_size in (256, 512, 1024):
        for block_n in (32, 64, 128):

            def run(p=partition_size, n=block_n):
                return paged_decode_attention(
                    q,
                    k_cache,
                    v_cache,
                    block_tables,
                    seq_lens,
                    scale,
                    max_seq_len=ctx,
                    partition_size=p,
                    block_n=n,
                )

            configs.append(row(bench_ms(run), partition_size=partition_size, block_n=block_n))
    default = next(
        c
        for c in configs
        if c["partition_size"] == DEFAULT_PARTITION_SIZE and c["block_n"] == DEFAULT_BLOCK_N
    )
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len=ctx)

    # The same K/V with the block ids in order: what the gather through a shuffled table costs.
    ordered_k, ordered_v, ordered_tables, _, _ = paged_cache(b, ctx, kvh, d, bs, shuffle=False)

    def run_ordered():
        return paged_decode_attention(
            q, ordered_k, ordered_v, ordered_tables, seq_lens, scale, max_seq_len=ctx
        )

    ordered = row(bench_ms(run_ordered))

    backend, sdpa_ms, sdpa_out = sdpa(q.unsqueeze(2), k, v, causal=False)
    max_diff = (out.float() - sdpa_out.squeeze(2).float()).abs().max().item()
    return {
        "shape": dict(batch=b, context=ctx, heads=h, kv_heads=kvh, head_dim=d, block_size=bs, dtype="bf16"),
        "kv_bytes": kv_bytes,
        "default": default,
        "best": min(configs, key=lambda c: c["ms"]),
        "ordered_block_ids": ordered,
        "sweep": configs,
        "sdpa": row(sdpa_ms, backend=backend),
        "max_abs_diff_vs_sdpa": max_diff,
    }


def bench_fp8_kv(args, copy_gbs: float, matmul_rate: float) -> dict:
    """The same decode and prefill shapes with an E4M3 cache (kv_cache_dtype="fp8"), engine defaults: decode's
    KV bytes are half bf16's; its GB/s counts the FP8 bytes, so % of copy compares with bf16's directly."""
    from inflight.kernels.fp8 import FP8_MAX
    from inflight.kernels.kv_cache import quantize_fp8_reference

    def to_fp8(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (cache.float().abs().amax() / FP8_MAX).reshape(())
        return quantize_fp8_reference(cache, scale), scale

    b, ctx, h, kvh, d, bs = (
        args.batch,
        args.context,
        args.heads,
        args.kv_heads,
        args.head_dim,
        args.block_size,
    )
    k_cache, v_cache, block_tables, _, _ = paged_cache(b, ctx, kvh, d, bs, shuffle=True)
    (k8, ks), (v8, vs) = to_fp8(k_cache), to_fp8(v_cache)
    del k_cache, v_cache
    q = torch.randn(b, h, d, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    ms = bench_ms(lambda: paged_decode_attention(q, k8, v8, block_tables, seq_lens, d**-0.5, max_seq_len=ctx,
                                                 k_scale=ks, v_scale=vs))  # fmt: skip
    gbs = 2 * b * kvh * ctx * d / (ms / 1e3) / 1e9
    decode = {"ms": round(ms, 4), "kv_gbs": round(gbs, 1), "pct_copy": round(100 * gbs / copy_gbs, 1)}
    del k8, v8
    torch.cuda.empty_cache()
    t = args.prefill_tokens
    k_cache, v_cache, block_tables, _, _ = paged_cache(1, t, kvh, d, bs, shuffle=True)
    (k8, ks), (v8, vs) = to_fp8(k_cache), to_fp8(v_cache)
    q = torch.randn(t, h, d, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.tensor([t], dtype=torch.int32, device="cuda")
    starts = torch.tensor([0, t], dtype=torch.int32, device="cuda")
    ms = bench_ms(lambda: paged_prefill_attention(q, k8, v8, block_tables, seq_lens, starts, d**-0.5,
                                                  max_query_len=t, k_scale=ks, v_scale=vs))  # fmt: skip
    tflops = 4 * h * d * t * (t + 1) / 2 / (ms / 1e3) / 1e12
    prefill = {
        "ms": round(ms, 4),
        "tflops": round(tflops, 1),
        "pct_matmul": round(100 * tflops / matmul_rate, 1),
    }
    return {"decode": decode, "prefill": prefill}


def sweep_fp8_decode(copy_gbs: float) -> list[dict]:
    """The FP8-KV decode kernel's tuning knobs on the benchmark shape, a decode-heavy serving shape (512
    sequences of 1,536 tokens) and 128/128's decode (1,024 of 192, where the step profile put it at 56% of
    copy): ms, FP8 GB/s and % of copy for each (partition, block_n, warps, stages)."""
    rows = []
    for batch, context in ((64, 4096), (512, 1536), (1024, 192)):
        rows += _fp8_decode_rows(batch, context, copy_gbs)
        torch.cuda.empty_cache()
    return rows


def _fp8_decode_rows(b: int, ctx: int, copy_gbs: float) -> list[dict]:
    from inflight.kernels.fp8 import FP8_MAX
    from inflight.kernels.kv_cache import quantize_fp8_reference

    k_cache, v_cache, block_tables, _, _ = paged_cache(b, ctx, 8, 128, 16, shuffle=True)
    ks = (k_cache.float().abs().amax() / FP8_MAX).reshape(())
    vs = (v_cache.float().abs().amax() / FP8_MAX).reshape(())
    k8, v8 = quantize_fp8_reference(k_cache, ks), quantize_fp8_reference(v_cache, vs)
    del k_cache, v_cache
    q = torch.randn(b, 32, 128, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")

    def run(**knobs):
        return paged_decode_attention(
            q, k8, v8, block_tables, seq_lens, 128**-0.5, max_seq_len=ctx, k_scale=ks, v_scale=vs, **knobs
        )

    rows = []
    for part in (512, 1024):
        for block_n in (64, 128, 256):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    knobs = dict(partition_size=part, block_n=block_n, num_warps=warps, num_stages=stages)
                    try:
                        ms = bench_ms(lambda kw=knobs: run(**kw))
                    except Exception as e:  # e.g. out of shared memory: record it, keep going
                        rows.append(dict(batch=b, context=ctx, **knobs, error=str(e).splitlines()[0][:160]))
                        continue
                    gbs = 2 * b * 8 * ctx * 128 / (ms / 1e3) / 1e9
                    rows.append(dict(batch=b, context=ctx, **knobs, ms=round(ms, 4), kv_gbs=round(gbs, 1),
                                     pct_copy=round(100 * gbs / copy_gbs, 1)))  # fmt: skip
    return rows


PREFILL_CONFIGS = (  # (block_m, block_n, num_warps, num_stages)
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 2),
)


def bench_prefill(args, matmul_rate: float) -> dict:
    """One causal sequence of ``prefill_tokens`` new tokens. The engine's call (``default``) reads this
    step's K/V from the rows the qkv projection wrote (strided views of one ``[T, q | k | v]`` buffer,
    TMA on Hopper); ``cache_only`` reads every key through the shuffled block table instead."""
    t, h, kvh, d, bs = args.prefill_tokens, args.heads, args.kv_heads, args.head_dim, args.block_size
    scale = d**-0.5
    k_cache, v_cache, block_tables, k, v = paged_cache(1, t, kvh, d, bs, shuffle=True)
    qkv = torch.randn(t, (h + 2 * kvh) * d, dtype=torch.bfloat16, device="cuda")
    q = qkv[:, : h * d].view(t, h, d)
    k_new = qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
    v_new = qkv[:, (h + kvh) * d :].view(t, kvh, d)
    k_new.copy_(k[0].transpose(0, 1))
    v_new.copy_(v[0].transpose(0, 1))
    seq_lens = torch.tensor([t], dtype=torch.int32, device="cuda")
    query_start_loc = torch.tensor([0, t], dtype=torch.int32, device="cuda")
    flops = 4 * t * t / 2 * h * d  # the causal half of dense attention's 4*T^2*H*D, as flash-attention counts

    def row(ms: float, **extra) -> dict:
        tflops = flops / (ms / 1e3) / 1e12
        return {
            **extra,
            "ms": round(ms, 4),
            "tflops": round(tflops, 1),
            "pct_matmul": round(100 * tflops / matmul_rate, 1),
        }

    def call(source: str, **kw):
        step = {} if source == "cache" else dict(k_new=k_new, v_new=v_new, use_tma=source == "step_kv_tma")
        return paged_prefill_attention(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_query_len=t, **step, **kw
        )

    configs = []
    for source in ("cache", "step_kv", "step_kv_tma"):
        for block_m, block_n, num_warps, num_stages in PREFILL_CONFIGS:
            knobs = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
            try:
                configs.append(
                    row(bench_ms(lambda s=source, kw=knobs: call(s, **kw)), source=source, **knobs)
                )
            except Exception as e:  # e.g. out of shared memory: record it, keep going
                configs.append(dict(source=source, **knobs, error=str(e).splitlines()[0][:200]))
    ran = [c for c in configs if "ms" in c]

    def engine_call():  # what the attention layer runs: the step's K/V given, every knob at its default
        return paged_prefill_attention(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_query_len=t,
            k_new=k_new, v_new=v_new,
        )  # fmt: skip

    default = row(bench_ms(engine_call), source="engine default")
    cache_only = row(bench_ms(lambda: call("cache")), source="cache, default knobs")
    out = engine_call()
    backend, sdpa_ms, sdpa_out = sdpa(q.transpose(0, 1).unsqueeze(0), k, v, causal=True)
    max_diff = (out.float() - sdpa_out[0].transpose(0, 1).float()).abs().max().item()
    cache_diff = (call("cache").float() - out.float()).abs().max().item()
    return {
        "shape": dict(tokens=t, heads=h, kv_heads=kvh, head_dim=d, block_size=bs, dtype="bf16", causal=True),
        "flops": flops,
        "default": default,
        "cache_only": cache_only,
        "best": min(ran, key=lambda c: c["ms"]),
        "sweep": configs,
        "sdpa": row(sdpa_ms, backend=backend),
        "max_abs_diff_vs_sdpa": max_diff,
        "max_abs_diff_cache_vs_step_kv": cache_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--prefill-tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--fp8-decode-sweep", action="store_true",
                        help="only sweep the FP8-KV decode kernel's knobs (two shapes) and write those rows")  # fmt: skip
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA device")
    torch.manual_seed(0)

    copy_gbs = copy_bandwidth_gbs()
    if args.fp8_decode_sweep:
        rows = sweep_fp8_decode(copy_gbs)
        write_result(args.out, {**environment(), "ceilings": {"copy_gbs_read_plus_write": round(copy_gbs, 1)},
                                "fp8_decode_sweep": rows})  # fmt: skip
        for r in rows:
            knobs = f"b{r['batch']} ctx{r['context']} p{r['partition_size']} n{r['block_n']} w{r['num_warps']} s{r['num_stages']}"
            print(
                f"{knobs:36}"
                + (f"{r['ms']:9.3f} ms {r['pct_copy']:6.1f}% copy" if "ms" in r else r["error"][:80])
            )
        return
    matmul_rate = matmul_tflops()
    decode = bench_decode(args, copy_gbs)
    torch.cuda.empty_cache()
    prefill = bench_prefill(args, matmul_rate)
    torch.cuda.empty_cache()
    fp8_kv = bench_fp8_kv(args, copy_gbs, matmul_rate)
    result = {
        **environment(),
        "ceilings": {
            "copy_gbs_read_plus_write": round(copy_gbs, 1),
            "bf16_matmul_8192_tflops": round(matmul_rate, 1),
        },
        "decode": decode,
        "prefill": prefill,
        "fp8_kv": fp8_kv,
    }
    write_result(args.out, result)

    print(f"\n{result['device']}  torch {result['versions']['torch']}  triton {result['versions']['triton']}")
    print(f"ceilings: copy {copy_gbs:,.0f} GB/s (read+write), bf16 matmul {matmul_rate:,.0f} TFLOP/s")
    s = decode["shape"]
    heads = f"{s['heads']}/{s['kv_heads']} heads, d{s['head_dim']}"
    print(f"\ndecode  batch {s['batch']} x ctx {s['context']}, {heads}")
    print(f"{'':28}{'ms':>9}{'KV GB/s':>10}{'% copy':>8}")
    for name, r in (
        ("triton (default)", decode["default"]),
        (f"triton best p{decode['best']['partition_size']} n{decode['best']['block_n']}", decode["best"]),
        ("triton, ordered block ids", decode["ordered_block_ids"]),
        (f"torch SDPA ({decode['sdpa']['backend'].lower()})", decode["sdpa"]),
    ):
        print(f"{name:28}{r['ms']:9.3f}{r['kv_gbs']:10,.0f}{r['pct_copy']:7.1f}%")
    print(f"max |triton - sdpa| = {decode['max_abs_diff_vs_sdpa']:.2e}")
    print("\nprefill sweep:")
    for c in prefill["sweep"]:
        knobs = f"{c['source']:12} m{c['block_m']} n{c['block_n']} w{c['num_warps']} s{c['num_stages']}"
        print(f"  {knobs:32}" + (f"{c['ms']:9.3f}{c['tflops']:8.1f}" if "ms" in c else c["error"][:80]))
    s = prefill["shape"]
    print(f"\nprefill {s['tokens']} tokens causal, {s['heads']}/{s['kv_heads']} heads, d{s['head_dim']}")
    print(f"{'':40}{'ms':>9}{'TFLOP/s':>10}{'% mm':>8}")
    best = prefill["best"]
    rows = [
        ("triton (engine default)", prefill["default"]),
        ("triton, all keys via cache", prefill["cache_only"]),
        (
            f"best {best['source']} m{best['block_m']} n{best['block_n']} w{best['num_warps']} "
            f"s{best['num_stages']}",
            best,
        ),
        (f"torch SDPA ({prefill['sdpa']['backend'].lower()})", prefill["sdpa"]),
    ]
    for name, r in rows:
        if r is not None:
            print(f"{name:40}{r['ms']:9.3f}{r['tflops']:10,.1f}{r['pct_matmul']:7.1f}%")
    print(f"max |triton - sdpa| = {prefill['max_abs_diff_vs_sdpa']:.2e}")
    f8 = result["fp8_kv"]
    print(f"\nFP8 KV cache (engine defaults): decode {f8['decode']['ms']:.3f} ms, {f8['decode']['kv_gbs']:,.0f} GB/s "
          f"({f8['decode']['pct_copy']:.1f}% copy); prefill {f8['prefill']['ms']:.3f} ms, "
          f"{f8['prefill']['tflops']:,.1f} TFLOP/s ({f8['prefill']['pct_matmul']:.1f}% of bf16 matmul)")  # fmt: skip


if __name__ == "__main__":
    main()
