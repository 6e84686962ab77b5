"""Rank 0 -> the other tensor-parallel ranks: each step's inputs as one packed int64 tensor.

Rank 0 plans every step; the workers run the same forward on it. A message is two broadcasts over the CPU
(gloo) group: a fixed header, then one flat int64 payload::

    STEP  header [STEP, T, S, B, L, P, R, num_top, fill, 0]
          payload input_ids[T] positions[T] slot_mapping[T] block_tables[S*B] seq_lens[S]
                  query_start_loc[S+1] logits_rows[L] pending_rows[P] prompt_rows[R]
          then, when ``fill``: the P pending token ids, broadcast on the device group (they are still on
          rank 0's GPU: the step in flight is sampling them)
    SWAP  header [SWAP, n_out, n_in, ...]  payload the (device, host) pairs, then the (host, device) pairs
    STOP  header [STOP, ...]

No Python object is pickled: the workers rebuild ``StepInputs`` from the arrays (request ids are not needed
there: only rank 0 samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from inflight.backend.executor.model_runner import PreparedStep
from inflight.backend.executor.prompt_logprobs import PromptRows
from inflight.backend.executor.step_inputs import StepInputs

STEP, SWAP, STOP = 1, 2, 3
HEADER = 10


@dataclass
class Message:
    kind: int
    step: PreparedStep | None = None
    swap_out: list[tuple[int, int]] | None = None
    swap_in: list[tuple[int, int]] | None = None


class StepChannel:
    """Both ends of the step broadcast: rank 0 sends, the others receive, in the same order."""

    def __init__(self, cpu_group: dist.ProcessGroup | None, device_group: dist.ProcessGroup | None,
                 device: torch.device) -> None:  # fmt: skip
        self.cpu_group = cpu_group
        self.device_group = device_group
        self.device = device

    # ------------------------------------------------------------------------------------------ rank 0
    def send_step(self, step: PreparedStep) -> None:
        i, plan, fill = step.inputs, step.plan, step.fill
        tables = i.block_tables
        plan_rows = plan.rows if plan is not None else []
        header = [STEP, len(i.input_ids), len(i.seq_lens), tables.shape[1], len(i.logits_rows),
                  len(i.pending_rows), len(plan_rows) if plan is not None else -1,
                  plan.num_top if plan is not None else 0, int(fill is not None), 0]  # fmt: skip
        payload = np.concatenate([
            i.input_ids, i.positions, i.slot_mapping, tables.reshape(-1).astype(np.int64),
            np.asarray(i.seq_lens, dtype=np.int64), np.asarray(i.query_start_loc, dtype=np.int64),
            np.asarray(i.logits_rows, dtype=np.int64), np.asarray(i.pending_rows, dtype=np.int64),
            np.asarray(plan_rows, dtype=np.int64),
        ])  # fmt: skip
        self._send(header, payload)
        if fill is not None:
            dist.broadcast(fill[1].contiguous(), src=0, group=self.device_group)

    def send_swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        pairs = np.asarray(swap_out + swap_in, dtype=np.int64).reshape(-1)
        self._send([SWAP, len(swap_out), len(swap_in)] + [0] * (HEADER - 3), pairs)

    def send_stop(self) -> None:
        self._send([STOP] + [0] * (HEADER - 1), np.zeros(0, dtype=np.int64))

    def _send(self, header: list[int], payload: np.ndarray) -> None:
        head = torch.tensor(header + [len(payload)], dtype=torch.int64)
        dist.broadcast(head, src=0, group=self.cpu_group)
        if len(payload):
            dist.broadcast(torch.from_numpy(np.ascontiguousarray(payload)), src=0, group=self.cpu_group)

    # ------------------------------------------------------------------------------------------ workers
    def receive(self) -> Message:
        head = torch.empty(HEADER + 1, dtype=torch.int64)
        dist.broadcast(head, src=0, group=self.cpu_group)
        header = head.tolist()
        payload = np.zeros(header[-1], dtype=np.int64)
        if len(payload):
            buffer = torch.from_numpy(payload)
            dist.broadcast(buffer, src=0, group=self.cpu_group)
        kind = header[0]
        if kind == SWAP:
            n_out, n_in = header[1], header[2]
            pairs = [tuple(p) for p in payload.reshape(-1, 2).tolist()]
            return Message(SWAP, swap_out=pairs[:n_out], swap_in=pairs[n_out : n_out + n_in])
        if kind == STEP:
            return Message(STEP, step=self._unpack_step(header, payload))
        return Message(kind)

    def _unpack_step(self, header: list[int], payload: np.ndarray) -> PreparedStep:
        _, t, s, b, n_logits, n_pending, n_plan, num_top, has_fill = header[:9]
        sizes = [t, t, t, s * b, s, s + 1, n_logits, n_pending, max(n_plan, 0)]
        parts = np.split(payload, np.cumsum(sizes)[:-1])
        ids, positions, slots, tables, seq_lens, starts, logits_rows, pending_rows, plan_rows = parts
        inputs = StepInputs(
            input_ids=ids.copy(), positions=positions, slot_mapping=slots,
            block_tables=tables.reshape(s, b).astype(np.int32), seq_lens=seq_lens.tolist(),
            query_start_loc=starts.tolist(), logits_rows=logits_rows.tolist(), sample_ids=[""] * n_logits,
            pending_rows=pending_rows.tolist(), pending_ids=[""] * n_pending,
        )  # fmt: skip
        fill = None
        if has_fill:
            values = torch.empty(n_pending, dtype=torch.int64, device=self.device)
            dist.broadcast(values, src=0, group=self.device_group)
            fill = (torch.from_numpy(pending_rows.copy()).to(self.device), values)
        # NOTE: the targets are rank 0's business (it reads the log-probabilities); zeros do here.
        plan = PromptRows(plan_rows.tolist(), [0] * n_plan, [], num_top) if n_plan >= 0 else None
        return PreparedStep(inputs, fill, plan)
