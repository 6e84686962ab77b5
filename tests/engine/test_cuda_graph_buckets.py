"""The CUDA graphs' host side, on CPU: bucket ladders and the padded input layout (``pack_step``); and the
runner's logits rows (the GEMM's padded row count, the last layer run for the sampled rows only).

Replaying the graphs needs a GPU: ``tests/gpu/test_gpu_engine.py`` checks their output against HF.
"""

from __future__ import annotations

import numpy as np
import pytest

from inflight.backend.executor.cuda_graphs import MixedGraphs, graph_batch_sizes, graph_token_sizes, pack_step
from inflight.backend.executor.step_inputs import flatten_step
from inflight.batching import ScheduledRequest, SchedulerOutput


def test_ladders() -> None:
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_token_sizes(1024) == [32, 64, *range(128, 1025, 128)]
    assert graph_token_sizes(300) == [32, 64, 128, 256, 300]
    assert graph_token_sizes(48) == [32, 48]


def _mixed(token_sizes: list[int], seq_sizes: list[int]) -> MixedGraphs:
    graphs = object.__new__(MixedGraphs)  # the bucket logic only; no device buffers
    graphs.token_sizes, graphs.seq_sizes = token_sizes, seq_sizes
    return graphs


def test_mixed_buckets_hold_the_step_and_are_the_smallest() -> None:
    graphs = _mixed(graph_token_sizes(1024), [1, 2, 4, 8, 16])
    assert graphs._bucket(467, 1) == (512, 1)
    assert graphs._bucket(470, 4) == (512, 4)
    assert graphs._bucket(471, 5) == (512, 8)
    assert graphs._bucket(20, 3) == (32, 4)
    assert graphs._bucket(1024, 16) == (1024, 16)
    assert graphs.can_run(1024, 16) and not graphs.can_run(1025, 1) and not graphs.can_run(100, 17)
    keys = graphs._keys()
    assert keys[0] == (1024, 16) and (32, 16) in keys and all(s <= t for t, s in keys)
    assert len(keys) == len(set(keys)) == 10 * 5


def _step(chunks: list[tuple[int, int, list[int]]], block_size: int) -> SchedulerOutput:
    """A scheduled step: (start position, tokens this step, block ids) per request."""
    scheduled = [
        ScheduledRequest(
            request_id=f"r{i}",
            token_ids=list(range(100 + start, 100 + start + n)),
            start_position=start,
            block_ids=blocks,
            needs_sample=True,
        )  # fmt: skip
        for i, (start, n, blocks) in enumerate(chunks)
    ]
    return SchedulerOutput(scheduled, sum(n for _, n, _ in chunks))


def test_pack_step_pads_tokens_and_sequences() -> None:
    bs = 4
    out = _step([(0, 6, [3, 4]), (9, 1, [7, 8, 9]), (2, 3, [5, 6])], bs)
    inputs = flatten_step(out, bs)
    T, S = 16, 4
    host = np.full(3 * T + 2 * S + 1 + 3 * 3, 777, dtype=np.int64)
    end = pack_step(inputs, host, T, S)
    assert end == host.size
    ids, pos, slots = host[:T], host[T : 2 * T], host[2 * T : 3 * T]
    lens, qsl, tables = (
        host[3 * T : 3 * T + S],
        host[3 * T + S : 3 * T + 2 * S + 1],
        host[3 * T + 2 * S + 1 :],
    )
    # The real tokens, then padding: id 0, position 0, slot -1 (no cache write).
    assert ids.tolist() == [*range(100, 106), 109, 102, 103, 104] + [0] * 6
    assert pos.tolist() == [0, 1, 2, 3, 4, 5, 9, 2, 3, 4] + [0] * 6
    # slot = block_ids[pos // bs] * bs + pos % bs, from the requests' own block lists
    expect = [3 * 4 + 0, 13, 14, 15, 4 * 4 + 0, 17, 9 * 4 + 1, 5 * 4 + 2, 23, 6 * 4 + 0]
    assert slots.tolist() == expect + [-1] * 6
    # Padding sequence: length 0 and no query tokens (its query_start_loc stays at the real token count).
    assert lens.tolist() == [6, 10, 5, 0]
    assert qsl.tolist() == [0, 6, 7, 10, 10]
    assert tables.reshape(3, 3).tolist() == [[3, 4, 0], [7, 8, 9], [5, 6, 0]]


def test_pack_step_without_padding() -> None:
    inputs = flatten_step(_step([(0, 2, [1]), (0, 2, [2])], 4), 4)
    host = np.zeros(3 * 4 + 2 * 2 + 1 + 2, dtype=np.int64)
    pack_step(inputs, host, 4, 2)
    assert host[8:12].tolist() == [4, 5, 8, 9] and host[12:14].tolist() == [2, 2]
    assert host[14:17].tolist() == [0, 2, 4]


@pytest.mark.parametrize("n", [1, 3])
def test_pack_step_of_a_decode_step(n: int) -> None:
    inputs = flatten_step(_step([(5 + i, 1, [i + 1, i + 2]) for i in range(n)], 4), 4)
    host = np.zeros(3 * 4 + 2 * 4 + 1 + n * 2, dtype=np.int64)
    pack_step(inputs, host, 4, 4)
    assert host[12:16].tolist() == [6 + i for i in range(n)] + [0] * (4 - n)
    assert host[8:12].tolist()[n:] == [-1] * (4 - n)


class _EagerReplay:
    """Stands in for a captured graph on CPU: unpacks the staged step into the static buffers and runs the
    model on them as the graph would, with the host lists the torch reference path needs read back."""

    def __init__(self, graphs, key: tuple[int, int], max_query_len: int) -> None:
        self.graphs, self.key, self.max_query_len = graphs, key, max_query_len

    def replay(self) -> None:
        from inflight.backend.executor.step_inputs import AttentionMetadata

        g, (T, S) = self.graphs, self.key
        g._unpack(T, S)
        meta = AttentionMetadata(g.slot_mapping[:T], g.block_tables[:S], g.seq_lens[:S], g.query_start_loc[: S + 1],
                                 g.seq_lens[:S].tolist(), g.query_start_loc[: S + 1].tolist(), self.max_query_len,
                                 g.max_model_len)  # fmt: skip
        g.outputs[self.key].copy_(g.model(g.input_ids[:T], g.positions[:T], meta))


@pytest.fixture(scope="module")
def runner():
    import torch

    from benchmarks.kernels.profile_steps import build_runner

    shape = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256,
             "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    return build_runner(
        shape, max_model_len=128, kv_tokens=40 * 16, device=torch.device("cpu"), dtype=torch.float32
    )


def test_mixed_graph_run_gives_the_eager_steps_hidden_states(runner) -> None:
    """``MixedGraphs.run`` stages a step into the padded static buffers (offsets, padding, block tables,
    the id filled from the device); a forward over those buffers gives the eager step's rows."""
    import torch

    graphs = MixedGraphs(runner.model, runner.device, 64, 4, 8, 128)
    for key in graphs._keys():
        graphs.graphs[key] = _EagerReplay(graphs, key, key[0])
        graphs.outputs[key] = torch.empty(key[0], 32)
    # A chunk past a cached prefix, a decode whose input id is still on the device, a new prompt.
    chunks = [(16, 9, [1, 2]), (20, 1, [3, 4]), (0, 7, [5])]
    out = _step(chunks, 16)
    inputs = flatten_step(out, 16)
    fill = (torch.tensor([9]), torch.tensor([123]))
    with torch.inference_mode():
        runner._forward_eager(
            flatten_step(_step([(0, 16, [1]), (0, 20, [3, 4])], 16), 16), None
        )  # the prefixes
        cache = runner.kv_cache.clone()
        eager = runner._forward_eager(inputs, fill)
        runner.kv_cache.copy_(cache)
        graphed = graphs.run(inputs, fill)
    assert graphs.replays == 1 and graphs._bucket(17, 3) == (32, 4)
    assert graphed.shape == (32, 32) and eager.shape == (17, 32)  # the whole bucket: the step's rows first
    torch.testing.assert_close(graphed[:17], eager, rtol=1e-5, atol=1e-5)
    assert graphs.input_ids[9] == 123 and graphs.slot_mapping[17:32].eq(-1).all()
    assert graphs.query_start_loc[:5].tolist() == [0, 9, 10, 17, 17] and graphs.seq_lens[3] == 0


def test_decode_graph_run_stages_the_step(runner) -> None:
    import torch

    from inflight.backend.executor.cuda_graphs import DecodeGraphs

    graphs = DecodeGraphs(runner.model, runner.device, 8, 8, 128)
    unpack_only = type("UnpackOnly", (), {"__init__": lambda self, key: setattr(self, "key", key),
                                           "replay": lambda self: graphs._unpack(*self.key)})  # fmt: skip
    graphs.graphs = {key: unpack_only(key) for key in graphs._keys()}
    graphs.outputs = {key: torch.zeros(key[0], 32) for key in graphs._keys()}
    inputs = flatten_step(_step([(5, 1, [7]), (20, 1, [3, 4]), (40, 1, [6, 8, 9])], 16), 16)
    graphs.run(inputs, (torch.tensor([1]), torch.tensor([77])))
    assert graphs._bucket(3, 3) == (4, 4)
    assert graphs.input_ids[:4].tolist() == [105, 77, 140, 0]
    assert graphs.positions[:4].tolist() == [5, 20, 40, 0]
    assert graphs.slot_mapping[:4].tolist() == [7 * 16 + 5, 4 * 16 + 4, 9 * 16 + 8, -1]
    assert graphs.seq_lens[:4].tolist() == [6, 21, 41, 0]
    assert graphs.block_tables[:3, :3].tolist() == [[7, 0, 0], [3, 4, 0], [6, 8, 9]]
    assert graphs.query_start_loc[:5].tolist() == [0, 1, 2, 3, 4]  # static: 0..n


class _CountingModel:
    """The runner's model with the row counts of its logits GEMMs recorded."""

    def __init__(self, model) -> None:
        self.model, self.rows, self.config = model, [], model.config

    def compute_logits(self, hidden):
        self.rows.append(hidden.shape[0])
        return self.model.compute_logits(hidden)


def test_logits_gemm_rows_are_padded_to_the_warmed_sizes(runner) -> None:
    """After ``warm_logits`` every logits GEMM has a row count from the warmed ladder (each warmed once), and
    the logits of the step's rows are those of an unpadded GEMM over exactly those rows."""
    import torch

    counting = _CountingModel(runner.model)
    model, runner.model = runner.model, counting
    try:
        runner.warm_logits(40, torch.float32)
        assert runner.logits_sizes == [1, 2, 4, 8, 16, 32, 40] and counting.rows == runner.logits_sizes
        hidden = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
        cases = [  # (tokens of the step, rows in `hidden`, sampled rows, the GEMM's rows)
            (3, 4, [0, 1, 2], 4),  # a decode step from a graph: the bucket's padding rows fill the GEMM
            (3, 3, [0, 1, 2], 4),  # the same step run eagerly: the last row repeated
            (9, 9, [2, 5, 8], 4),  # a prefill step: the chunks' last tokens
            (20, 32, list(range(20)), 32),
            (33, 48, list(range(33)), 40),
            (8, 8, [0, 7], 2),  # a size of the ladder: no padding
            (44, 48, list(range(44)), 44),  # past the ladder (more rows than max_num_seqs): as it is
        ]
        for tokens, available, rows, gemm in cases:
            counting.rows.clear()
            logits = runner._logits(hidden[:available], tokens, rows)
            assert counting.rows == [gemm], (tokens, rows)
            expect = model.compute_logits(hidden[rows])
            assert logits.shape == expect.shape == (len(rows), 300)
            torch.testing.assert_close(logits, expect, rtol=1e-6, atol=1e-6)
    finally:
        runner.model, runner.logits_sizes = model, []


def test_last_layer_runs_past_attention_for_the_sampled_rows_only(runner) -> None:
    """An eager step with ``rows`` gives exactly those rows of the full forward, writes the same K/V for
    every token, and ``execute`` gives the same logits as the full forward's sampled rows."""
    import torch

    from inflight.backend.executor.models.llama import LlamaModel

    calls = []  # the row count each decoder layer's down_proj ran on (it runs as forward_silu_mul)
    projections = [layer.mlp.down_proj for layer in runner.model.model.layers]

    def counting(original):
        def forward_silu_mul(x, *args, **kwargs):
            calls.append(x.shape[0])
            return original(x, *args, **kwargs)

        return forward_silu_mul

    for projection in projections:
        projection.forward_silu_mul = counting(projection.forward_silu_mul)
    out = _step([(0, 16, [1, 2]), (16, 9, [3, 4]), (0, 7, [5])], 16)  # a chunk past a prefix, a new prompt
    inputs = flatten_step(out, 16)
    try:
        with torch.inference_mode():
            runner._forward_eager(flatten_step(_step([(0, 16, [3])], 16), 16), None)  # the chunk's prefix
            before = runner.kv_cache.clone()
            full = runner._forward_eager(inputs, None)
            cache_full = runner.kv_cache.clone()
            for rows in ([15, 24, 31], [24, 31, 31, 31], [0]):
                runner.kv_cache.copy_(before)
                calls.clear()
                pruned = runner._forward_eager(inputs, None, torch.tensor(rows))
                assert calls == [32, len(rows)]  # layer 0 over every token, the last over `rows`
                torch.testing.assert_close(pruned, full[rows], rtol=1e-5, atol=1e-5)
                assert torch.equal(runner.kv_cache, cache_full)
            runner.kv_cache.copy_(before)
            calls.clear()
            logits = runner.execute(out).logits
            assert calls == [32, 3] and inputs.logits_rows == [15, 24, 31]
            torch.testing.assert_close(
                logits, runner.model.compute_logits(full[[15, 24, 31]]), rtol=1e-5, atol=1e-5
            )
    finally:
        for projection in projections:
            del projection.forward_silu_mul  # the instance attribute: the method again
    assert isinstance(runner.model.model, LlamaModel) and len(runner.model.model.layers) == 2
