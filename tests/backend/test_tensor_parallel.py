"""Tensor parallelism for real: two gloo ranks on CPU against the single-rank model and dense layers.

One spawn of two ranks runs everything (process start-up dominates the runtime); each rank writes its
results to a file and the parent compares them with what it computes on one rank.
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from inflight.backend.executor.layers.embedding import VocabParallelEmbedding
from inflight.backend.executor.layers.linear import RowParallelLinear
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.model_runner import ModelRunner
from inflight.backend.executor.parallel import SINGLE_RANK, ParallelConfig
from inflight.backend.executor.quantization import QuantConfig
from inflight.backend.executor.quantization.fp8 import Fp8LinearMethod
from inflight.backend.executor.step_inputs import AttentionMetadata
from inflight.backend.executor.weight_loader import load_model

from ..engine.tiny_models import build_tiny_checkpoint

TP = 2
VOCAB = 1001  # odd: rank 1's slice of the vocabulary has a padding row
BLOCK = 4
TIMEOUT_S = 120
# name -> (tiny_models config, overrides): untied with every bias, tied, tied with its one KV head
# replicated on both ranks, q/k norm. (HF initialises biases to zero, so bias-once is the layer test's.)
CASES = {
    "llama-untied": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2-tied-kv-replicated": ("qwen2", {}),
    "qwen3-qk-norm": ("qwen3", {}),
}
PROMPTS = [[0, 500, 501, 1000, 7], [3, 999, 250, 751, 12, 499, 502, 64, 900, 1, 33]]  # both halves, edges
NEXT_TOKENS = [1000, 0]  # one decode step after the prefill
FP8_AT_LOAD = QuantConfig("fp8 at load", False, True, False, False)


def _checkpoint(case: str, out: Path) -> Path:
    name, overrides = CASES[case]
    return build_tiny_checkpoint(name, out, vocab_size=VOCAB, **overrides)


def _meta(slots: list[int], tables: list[list[int]], seq_lens: list[int], starts: list[int]):
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc_tensor=torch.tensor(starts, dtype=torch.int32),
        seq_lens=seq_lens,
        query_start_loc=starts,
        max_query_len=max(b - a for a, b in zip(starts, starts[1:], strict=False)),
        max_seq_len=max(seq_lens),
    )


@torch.inference_mode()
def _logits(path: Path, parallel: ParallelConfig) -> dict[str, object]:
    """Load through the real path, prefill ``PROMPTS`` and decode ``NEXT_TOKENS`` over a paged cache:
    the logits of every token of both steps, and the local sizes that show the model is sharded."""
    cfg = ModelConfig.from_pretrained(path)
    model = load_model(cfg, torch.float32, torch.device("cpu"), 64, parallel)
    runner = ModelRunner(model, torch.device("cpu"), BLOCK, torch.float32, 64)
    runner.allocate_kv_cache(16)
    tables = [[1, 2, 3, 0], [4, 5, 6, 7]]  # block 0 is the null block

    def slot(seq: int, pos: int) -> int:
        return tables[seq][pos // BLOCK] * BLOCK + pos % BLOCK

    ids, positions, slots, starts = [], [], [], [0]
    for seq, prompt in enumerate(PROMPTS):
        ids += prompt
        positions += range(len(prompt))
        slots += [slot(seq, p) for p in range(len(prompt))]
        starts.append(len(ids))
    lens = [len(p) for p in PROMPTS]
    prefill = model(torch.tensor(ids), torch.tensor(positions), _meta(slots, tables, lens, starts))
    decode = model(
        torch.tensor(NEXT_TOKENS),
        torch.tensor(lens),
        _meta([slot(s, n) for s, n in enumerate(lens)], tables, [n + 1 for n in lens], [0, 1, 2]),
    )
    layer = model.model.layers[0]
    return {
        "logits": model.compute_logits(torch.cat([prefill, decode])),
        "local": (
            model.model.embed_tokens.weight.shape[0],
            layer.self_attn.qkv_proj.q_size,
            layer.mlp.down_proj.weight.shape[1],
        ),
    }


def _layer_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(5, 24, generator=gen),
        "w": torch.randn(16, 24, generator=gen),
        "b": torch.randn(16, generator=gen),
        "residual": torch.randn(5, 16, generator=gen),
        "table": torch.randn(VOCAB, 8, generator=gen),
        "ids": torch.tensor([0, 1, 500, 501, 502, 999, 1000, 250, 750]),
    }


@torch.inference_mode()
def _layers(parallel: ParallelConfig) -> dict[str, torch.Tensor]:
    """Row-parallel products (with and without bias and residual) and an embedding lookup. The row-parallel
    input is this rank's columns of ``x``, as a column-parallel layer before it leaves them."""
    t, out = _layer_inputs(), {}
    x = t["x"].chunk(parallel.tp_size, dim=-1)[parallel.tp_rank]
    for bias in (False, True):
        row = RowParallelLinear(24, 16, bias, torch.float32, parallel)
        row.weight_loader(row.weight, t["w"])
        if bias:
            row.weight_loader(row.bias, t["b"])
        out[f"row_bias{bias}"] = row(x)
        out[f"row_bias{bias}_residual"] = row(x, t["residual"].clone())
    embed = VocabParallelEmbedding(VOCAB, 8, torch.float32, parallel)
    embed.weight_loader(embed.weight, t["table"])
    out["embed"] = embed(t["ids"])
    # FP8 quantized at load: a row-parallel shard's scales are the whole rows'
    fp8 = RowParallelLinear(24, 16, False, torch.float32, parallel, Fp8LinearMethod(FP8_AT_LOAD))
    fp8.weight_loader(fp8.weight, t["w"])
    fp8.linear_method.process_weights_after_loading(fp8)
    out["fp8_weight"], out["fp8_scale"] = fp8.weight.float(), fp8.weight_scale.clone()
    return out


def _rank_main(rank: int, init_file: str, out_dir: str, paths: dict[str, str]) -> None:
    out = Path(out_dir)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP,
                                timeout=timedelta(seconds=TIMEOUT_S))  # fmt: skip
        parallel = ParallelConfig(rank, TP, dist.group.WORLD)
        results = {"layers": _layers(parallel)}
        results.update({case: _logits(Path(p), parallel) for case, p in paths.items()})
        torch.save(results, out / f"rank{rank}.pt")
        # NOTE: both ranks out of their last collective before either tears gloo down: a rank that destroyed
        # its group while its peer still had one in flight aborted the peer ("terminate called without an
        # active exception", once in a loaded make test run).
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _run_ranks(tmp: Path, paths: dict[str, str]) -> list[dict]:
    """Both ranks' results; the first rank to fail (or a hang past ``TIMEOUT_S``) fails the caller and
    ends the other, which would otherwise wait in a collective for its peer."""
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(r, str(tmp / "rendezvous"), str(tmp), paths)) for r in range(TP)
    ]
    for p in procs:
        p.start()
    try:
        pending = {p.sentinel: (r, p) for r, p in enumerate(procs)}
        while pending:
            ready = wait(list(pending), timeout=TIMEOUT_S)
            if not ready:
                pytest.fail(
                    f"ranks {sorted(r for r, _ in pending.values())} still running after {TIMEOUT_S} s"
                )
            for sentinel in ready:
                rank, proc = pending.pop(sentinel)
                proc.join()
                if proc.exitcode != 0:
                    err = tmp / f"rank{rank}.err"
                    detail = err.read_text() if err.exists() else "(no traceback)"
                    pytest.fail(f"rank {rank} exited with {proc.exitcode}:\n{detail}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(TP)]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory) -> tuple[dict[str, Path], list[dict]]:
    root = tmp_path_factory.mktemp("tp")
    paths = {case: _checkpoint(case, root / case) for case in CASES}
    run_dir = root / "run"
    run_dir.mkdir()
    return paths, _run_ranks(run_dir, {c: str(p) for c, p in paths.items()})


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_single_rank_logits(tp_results, case: str) -> None:
    paths, ranks = tp_results
    expected = _logits(paths[case], SINGLE_RANK)
    full = expected["logits"]
    assert full.shape == (sum(map(len, PROMPTS)) + len(NEXT_TOKENS), VOCAB)
    for rank, results in enumerate(ranks):
        got = results[case]
        assert got["local"] == tuple(-(-n // TP) for n in expected["local"]), f"rank {rank} is not sharded"
        # fp32: the row-parallel products add two partial dot products, an order one rank does not use
        # (measured: at most 2e-6 off, on logits up to 3.6).
        torch.testing.assert_close(got["logits"], full, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, r=rank: f"rank {r}: {m}")  # fmt: skip
        assert torch.equal(got["logits"].argmax(-1), full.argmax(-1)), f"rank {rank}: greedy tokens differ"


def test_row_parallel_adds_bias_and_residual_once(tp_results) -> None:
    t = _layer_inputs()
    dense = t["x"] @ t["w"].T
    ranks = [r["layers"] for r in tp_results[1]]
    for bias in (False, True):
        product = dense + t["b"] if bias else dense
        for key, expected in (
            (f"row_bias{bias}", product),
            (f"row_bias{bias}_residual", product + t["residual"]),
        ):
            for rank, got in enumerate(ranks):
                torch.testing.assert_close(got[key], expected, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, r=rank, k=key: f"rank {r} {k}: {m}")  # fmt: skip
            assert torch.equal(ranks[0][key], ranks[1][key]), (
                f"{key}: the ranks disagree after the all-reduce"
            )


def test_vocab_parallel_embedding_looks_up_both_halves(tp_results) -> None:
    t = _layer_inputs()
    for results in tp_results[1]:
        # exact: each row is one rank's row plus zeros from the other
        assert torch.equal(results["layers"]["embed"], F.embedding(t["ids"], t["table"]))


def test_fp8_quantized_at_load_shards_are_the_single_rank_weight(tp_results) -> None:
    """Each rank's columns of a row-parallel FP8 weight, and the scales, are the unsharded ones': the scales
    come from the whole rows (an all-reduce max), not from this rank's columns."""
    from inflight.kernels.fp8 import quantize_weight_per_channel_reference

    w_q, scale = quantize_weight_per_channel_reference(_layer_inputs()["w"])
    for rank, results in enumerate(tp_results[1]):
        got = results["layers"]
        assert torch.equal(got["fp8_scale"], scale), f"rank {rank}"
        assert torch.equal(got["fp8_weight"], w_q.float().chunk(TP, dim=1)[rank]), f"rank {rank}"
    # without the all-reduce, rank 0's scales would be its own columns' (checks the test can fail)
    own, _ = _layer_inputs()["w"].chunk(TP, dim=1)
    assert not torch.equal(quantize_weight_per_channel_reference(own)[1], scale)
