"""Randomized add/schedule/update/finish/abort runs that check the pool's invariants every step.

A fake KV store records, for every slot written, the request and position that produced it (a token
still being sampled is known only later: the prefix is read when it is checked); each scheduled request
must then read back exactly its own prefix through its block table (what attention does).
"""

import random
from collections import Counter, deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inflight.batching import (
    PENDING_TOKEN_ID,
    QueueFullError,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)


def random_config(rng: random.Random, caching: bool, chunked: bool) -> SchedulerConfig:
    block_size = rng.choice([1, 2, 4])
    max_model_len = rng.choice([8, 16, 24])
    min_blocks = -(-max_model_len // block_size) + 1
    return SchedulerConfig(
        max_num_seqs=rng.choice([1, 2, 4, 8]),
        max_num_batched_tokens=rng.choice([1, 3, 8, 32]) if chunked else max_model_len + rng.randrange(10),
        max_model_len=max_model_len,
        block_size=block_size,
        num_blocks=min_blocks + rng.randrange(8),  # tight pools: frequent preemption
        enable_prefix_caching=caching,
        enable_chunked_prefill=chunked,
        max_queue_size=rng.choice([None, 3, 8]),
        num_host_blocks=rng.choice([0, 0, 2, 8]),  # a victim that fits is swapped out, else recomputed
    )


class Harness:
    """Drives a Scheduler like the engine does (at most one step planned ahead) and checks it."""

    def __init__(self, config: SchedulerConfig, rng: random.Random) -> None:
        self.config, self.rng, self.bs = config, rng, config.block_size
        self.sched = Scheduler(config)
        self.prefixes = [[rng.randrange(6) for _ in range(rng.randrange(1, 20))] for _ in range(3)]
        self.max_tokens: dict[str, int] = {}
        self.in_flight: deque[SchedulerOutput] = deque()
        self.kv_store: dict[int, list[tuple[Request, int] | None]] = {}
        self.host_store: dict[int, list[tuple[Request, int] | None]] = {}  # swapped-out blocks
        self.admission_seq: dict[str, int] = {}
        self.num_admissions = 0
        self.num_added = 0

    def add(self) -> None:
        rng = self.rng
        tokens = rng.choice(self.prefixes)[: rng.randrange(20)] + [rng.randrange(6) for _ in range(8)]
        max_model_len = self.config.max_model_len
        tokens = tokens[: rng.randint(1, max_model_len)]
        max_tokens = rng.randint(1, 12)
        given = max_tokens if rng.random() < 0.5 else None
        req = Request(f"r{self.num_added}", tokens, self.bs, arrival_index=self.num_added,
                      max_output_tokens=given)  # fmt: skip
        try:
            self.sched.add_request(req)
        except QueueFullError:
            # Preempted requests go back to the queue regardless of the limit, so it may be exceeded.
            assert self.sched.num_waiting >= self.config.max_queue_size
            return
        except ValueError:
            assert len(tokens) == max_model_len  # one position must be left to generate
            return
        assert len(tokens) < max_model_len
        room = max_model_len - len(tokens)
        assert req.max_output_tokens == (room if given is None else min(given, room))
        self.num_added += 1
        self.max_tokens[req.request_id] = max_tokens

    def step(self) -> None:
        if len(self.in_flight) >= 2:  # the engine plans at most one step ahead
            return
        waiting_before = {r.request_id for r in self.sched.waiting}
        running_before = list(self.sched.running)
        out = self.sched.schedule()
        # the engine's copies, before the step's forward: device -> host first, then host -> device
        for device, host in out.swap_out:
            self.host_store[host] = list(self.kv_store.get(device, [None] * self.bs))
        for host, device in out.swap_in:
            self.kv_store[device] = list(self.host_store.pop(host))
        self.check_output(out, waiting_before, running_before)
        self.check_pool()
        if out.scheduled:
            self.in_flight.append(out)

    def update(self) -> None:
        if not self.in_flight:
            return
        out = self.in_flight.popleft()
        sampled = {s.request_id: self.rng.randrange(6) for s in out.scheduled if s.needs_sample}
        self.sched.append_sampled_tokens(list(sampled), list(sampled.values()))
        # The engine's finish check: the length limit (max_model_len included, through max_output_tokens),
        # else a stop (here: after max_tokens outputs, whether or not that was the request's limit).
        length, stopped = [], []
        for request_id in sampled:
            req = self.sched.get_request(request_id)
            if req is None:
                continue
            assert (
                req.num_output_tokens <= req.max_output_tokens and req.num_tokens <= self.config.max_model_len
            )
            if req.num_output_tokens == req.max_output_tokens:
                length.append(request_id)
            elif req.num_output_tokens >= self.max_tokens[request_id]:
                stopped.append(request_id)
        self.sched.finish_requests(length, RequestStatus.FINISHED_LENGTH)
        self.sched.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)

    def abort(self) -> None:
        live = sorted(self.sched.requests)
        if live:
            self.sched.finish_requests(self.rng.choice(live), RequestStatus.FINISHED_ABORTED)

    def check_output(
        self, out: SchedulerOutput, waiting_before: set[str], running_before: list[Request]
    ) -> None:
        sched, bs, config = self.sched, self.bs, self.config
        victims = [r for r in running_before if r.status == RequestStatus.PREEMPTED]
        assert out.num_batched_tokens == sum(len(s.token_ids) for s in out.scheduled)
        assert out.num_batched_tokens <= config.max_num_batched_tokens
        assert len(sched.running) <= config.max_num_seqs
        for s in out.scheduled:  # write this step's KV first (prefix hits may read it) ...
            req = sched.get_request(s.request_id)
            assert req is not None and req.status == RequestStatus.RUNNING and s.token_ids
            end = s.start_position + len(s.token_ids)
            known = req.all_token_ids[s.start_position : end]
            assert s.token_ids == known + [PENDING_TOKEN_ID] * s.last_token_pending
            assert req.num_computed_tokens == end and len(s.token_ids) == end - s.start_position
            assert s.needs_sample == (end == req.num_tokens + req.num_pending_tokens - s.needs_sample)
            assert req.num_pending_tokens <= 2
            # never sampled past max_output_tokens, nor the KV of the token that reaches it computed
            assert req.num_output_tokens + req.num_pending_tokens <= req.max_output_tokens
            assert end < req.num_prompt_tokens + req.max_output_tokens <= config.max_model_len
            assert s.block_ids == [b.block_id for b in sched.kv_cache_manager.get_blocks(s.request_id)]
            if not config.enable_chunked_prefill:
                assert s.needs_sample
            if s.request_id in waiting_before:  # admitted by this step
                assert not victims  # no admission in a step that preempted
                self.admission_seq[s.request_id] = self.num_admissions
                self.num_admissions += 1
            for pos in range(s.start_position, end):
                slots = self.kv_store.setdefault(s.block_ids[pos // bs], [None] * bs)
                slots[pos % bs] = (req, pos)
        for s in out.scheduled:  # ... then every scheduled request must read back its own prefix
            req = sched.get_request(s.request_id)
            for pos in range(s.start_position + len(s.token_ids)):
                assert self.read_kv(s.block_ids[pos // bs], pos % bs) == tuple(req.all_token_ids[: pos + 1])
        seqs = [self.admission_seq[r.request_id] for r in sched.running]
        assert seqs == sorted(seqs)  # running order is admission order
        if victims:  # the newest running requests, at the front of the queue in running order
            assert sched.running == running_before[: len(running_before) - len(victims)]
            assert list(sched.waiting)[: len(victims)] == victims

    def read_kv(self, block_id: int, offset: int) -> tuple[int, ...] | None:
        """The token prefix whose KV a slot holds (a pending token's id appears once it is known)."""
        entry = self.kv_store[block_id][offset]
        return None if entry is None else tuple(entry[0].all_token_ids[: entry[1] + 1])

    def check_pool(self) -> None:
        manager = self.sched.kv_cache_manager
        pool = manager.block_pool
        owners: Counter[int] = Counter()
        for req in self.sched.running:
            block_ids = manager.get_block_ids(req.request_id)
            assert block_ids == [b.block_id for b in manager.get_blocks(req.request_id)]
            assert len(block_ids) == -(-req.num_computed_tokens // self.bs)
            assert len(set(block_ids)) == len(block_ids) and 0 not in block_ids
            owners.update(block_ids)
        host_owned: list[int] = []
        for req in self.sched.waiting:
            assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert manager.get_block_ids(req.request_id) == []
            if manager.is_swapped(req):  # its KV in host blocks, one per device block it had
                host_ids = manager._req_to_host_blocks[req.request_id]
                assert req.num_computed_tokens > 0 and len(host_ids) == -(-req.num_computed_tokens // self.bs)
                host_owned += host_ids
            else:
                assert req.num_computed_tokens == 0
        assert set(manager._req_to_host_blocks) <= {r.request_id for r in self.sched.waiting}
        assert sorted(host_owned + manager._free_host_blocks) == list(range(self.config.num_host_blocks))
        assert set(manager.req_to_blocks) == {r.request_id for r in self.sched.running}
        for block in pool.blocks[1:]:
            assert block.ref_cnt == owners[block.block_id]
        free = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
        assert sorted(free) == [i for i in range(1, self.config.num_blocks) if owners[i] == 0]
        assert pool.null_block.ref_cnt == 0 and pool.null_block.prev_free_block is None
        for block_hash, block in pool.cached_block_hash_to_block.items():
            assert block.block_hash == block_hash and None not in self.kv_store[block.block_id]
            # every token of a cached block is known (none is still being sampled)
            assert all(len(entry[0].all_token_ids) > entry[1] for entry in self.kv_store[block.block_id])
        assert sum(b.block_hash is not None for b in pool.blocks) == len(pool.cached_block_hash_to_block)
        if not self.config.enable_prefix_caching:
            assert not pool.cached_block_hash_to_block

    def drain(self) -> None:
        for _ in range(10_000):
            if not self.sched.has_unfinished_requests() and not self.in_flight:
                break
            self.update()
            self.step()
        else:
            raise AssertionError("requests never finished")
        pool = self.sched.kv_cache_manager.block_pool
        free = pool.free_block_queue.get_all_free_blocks()
        assert len(free) == self.config.num_blocks - 1 == pool.get_num_free_blocks()
        assert sorted(b.block_id for b in free) == list(range(1, self.config.num_blocks))
        assert all(b.ref_cnt == 0 for b in pool.blocks)
        assert self.sched.kv_cache_manager.req_to_blocks == {} and self.sched.requests == {}
        assert self.sched.kv_cache_manager.num_free_host_blocks == self.config.num_host_blocks


def run_ops(harness: Harness, ops: list[int]) -> None:
    actions = [
        harness.add,
        harness.add,
        harness.step,
        harness.step,
        harness.step,
        harness.update,
        harness.update,
    ]
    for op in ops:
        if op < len(actions):
            actions[op]()
        else:
            harness.abort()
    harness.drain()


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("chunked", [True, False])
def test_random_runs_leave_every_block_free(caching: bool, chunked: bool) -> None:
    num_preemptions = num_swaps = num_hit_tokens = 0
    for seed in range(25):
        rng = random.Random(seed * 4 + 2 * caching + chunked)
        harness = Harness(random_config(rng, caching, chunked), rng)
        run_ops(harness, [rng.choice(range(8)) if rng.random() < 0.97 else 7 for _ in range(300)])
        num_preemptions += harness.sched.num_preemptions_total
        num_swaps += harness.sched.num_swapped_out_total
        num_hit_tokens += harness.sched.kv_cache_manager.stats.num_hit_tokens
    # The runs must actually exercise preemption (recomputed and swapped) and (when on) prefix hits.
    assert num_preemptions > num_swaps > 0
    assert (num_hit_tokens > 0) == caching


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    caching=st.booleans(),
    chunked=st.booleans(),
    ops=st.lists(st.integers(0, 7), max_size=120),
)
def test_hypothesis_runs_leave_every_block_free(
    seed: int, caching: bool, chunked: bool, ops: list[int]
) -> None:
    rng = random.Random(seed)
    run_ops(Harness(random_config(rng, caching, chunked), rng), ops)
