"""The engine's host work per step, with the model's forward stubbed out: what a GPU step must outlast.

    python -m benchmarks.host_overhead --num-seqs 64,256,512 --prompt-len 128 --output-len 128

Runs the real engine (scheduler, KV-cache manager, step flattening, sampling-batch build, sampler,
detokenization, outputs) on the CPU; only the model is replaced by a stand-in that returns random logits at
once. Every request is greedy with ``ignore_eos``, all start together, so after the prompts' steps every step
is a decode step of all of them. Reports the median host time of those decode steps, split by phase.

With async scheduling the host's work for step N+1 overlaps the GPU's step N, so decode steps are bound by
the host when its time per step is above the GPU's (an 8B decode step of 512 sequences is 14.5 ms of kernels
on an H200: ``benchmarks/kernels/profile_steps.py``). The figures are this machine's: run it on the GPU
machine's host to compare with that.
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import environment, write_result

DEFAULT_MODEL = Path(".cache/models/SmolLM2-135M-Instruct")
PHASES = ("schedule", "sampling batch", "flatten step", "sampler", "read step")


class _StandIn:
    """The model's forward and the sampler's choice replaced: the step is flattened as for the model, the
    logits are random over 64 columns (the real sampler runs on them), and column c stands for the c-th of
    64 ordinary text tokens, so detokenization sees text as with a real model."""

    def __init__(self, engine: Any, seed: int) -> None:
        self.block_size = engine.executor.runner.block_size
        self.sampler = engine.executor.sampler
        generator = torch.Generator().manual_seed(seed)
        self.logits = torch.rand(engine.scheduler.config.max_num_seqs, 64, generator=generator)
        tokenizer = engine.tokenizer
        words = [tokenizer.encode(f" {w}", add_special_tokens=False)[0] for w in _WORDS]
        self.table = torch.tensor(words, dtype=torch.int64)

    def execute(self, out: Any, pending: Any = None, prompt_logprobs: Any = None) -> Any:
        from inflight.backend.executor.model_runner import ModelOutput
        from inflight.backend.executor.step_inputs import flatten_step

        inputs = flatten_step(out, self.block_size)
        n = len(inputs.sample_ids)
        self.logits[:n] = self.logits[:n].roll(1, dims=1)  # a different token each step
        return ModelOutput(inputs.sample_ids, self.logits[:n])

    def sample(self, logits: torch.Tensor, batch: Any) -> Any:
        out = self.sampler(logits, batch)
        out.sampled_token_ids = self.table[out.sampled_token_ids]
        return out


_WORDS = ("the of and to in is was for on are with as by at from that this be or have an not which but "
          "all were when we there can been has more if no out do so what up its about into than them only "
          "other new some could time these two may then first any my now such like our over man me even "
          "most made after also").split()[:64]  # fmt: skip


def measure(model: Path, num_seqs: int, prompt_len: int, output_len: int, seed: int = 0) -> dict[str, Any]:
    """Run ``num_seqs`` requests through the engine with a stand-in model; host ms per decode step."""
    from inflight import LLM, SamplingParams
    from inflight.backend.executor.model_config import ModelConfig
    from inflight.backend.executor.model_runner import kv_cache_bytes_per_block

    cfg = ModelConfig.from_pretrained(str(model))
    max_len = prompt_len + output_len
    blocks = num_seqs * -(-max_len // 16) + 2  # every request's blocks at once (block_size 16)
    kv_bytes = blocks * kv_cache_bytes_per_block(cfg, 16, torch.bfloat16, cfg.num_kv_heads)
    llm = LLM(str(model), device="cpu", dtype="bfloat16", max_model_len=max_len, max_num_seqs=num_seqs,
              max_num_batched_tokens=max(16384, prompt_len), enable_prefix_caching=False,
              kv_cache_memory_bytes=kv_bytes)  # fmt: skip
    engine = llm.engine
    stand_in = _StandIn(engine, seed)
    engine.executor.runner.execute = stand_in.execute
    engine.executor.sampler = stand_in.sample
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(owner: Any, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - start

        setattr(owner, name, wrapper)

    # NOTE: as the serving engine does (EngineService): the objects alive at start are frozen, so full
    # collections do not walk them during the steps (about 25% of the median step on the 2-core CPU).
    gc.collect()
    gc.freeze()
    timed(engine.scheduler, "schedule", "schedule")
    timed(engine.executor, "_sampling_batch", "sampling batch")
    timed(engine.executor.runner, "execute", "flatten step")
    timed(engine.executor, "sampler", "sampler")
    timed(engine, "_update", "read step")
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request(f"host-{i}", [int(t) for t in rng.integers(3, vocab, prompt_len)], params)
    steps: list[tuple[float, dict[str, float], int]] = []
    tokens = 0
    while engine.has_unfinished_requests():
        spent.clear()
        scheduled_before = engine.scheduler.num_running
        start = time.perf_counter()
        outputs = engine.step()
        steps.append((time.perf_counter() - start, dict(spent), scheduled_before))
        tokens += sum(len(o.new_token_ids) for o in outputs)
    gc.unfreeze()
    # Decode steps of the whole batch: every request running before the step (the prompts are done).
    decode = [s for s in steps[2:] if s[2] == num_seqs]
    if not decode:
        raise RuntimeError("no decode step of the whole batch: raise --output-len")
    return {
        "num_seqs": num_seqs,
        "prompt_len": prompt_len,
        "output_len": output_len,
        "output_tokens": tokens,
        "decode_steps": len(decode),
        "host_ms_per_step": round(1e3 * statistics.median(s[0] for s in decode), 3),
        "phases_ms": {p: round(1e3 * statistics.median(s[1].get(p, 0.0) for s in decode), 3) for p in PHASES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="config and tokenizer (weights unused)"
    )
    parser.add_argument("--num-seqs", default="64,256,512", help="batch sizes, e.g. 64,256,512")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", type=Path, help="result JSON")
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.num_seqs.split(",")):
        print(f"measuring {n} sequences ...", flush=True)
        rows.append(measure(args.model, n, args.prompt_len, args.output_len))
    print(f"\n{'seqs':>6} {'host ms/step':>13} " + " ".join(f"{p:>15}" for p in PHASES))
    for r in rows:
        print(f"{r['num_seqs']:>6} {r['host_ms_per_step']:>13.2f} "
              + " ".join(f"{r['phases_ms'][p]:>15.2f}" for p in PHASES))  # fmt: skip
    if args.out:
        write_result(args.out, {"benchmark": "host_overhead", **environment(), "model": args.model.name,
                                "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
