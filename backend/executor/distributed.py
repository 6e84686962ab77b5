"""Tensor parallelism across processes: rank 0 starts ranks 1..N-1 and holds the group together.

Rank 0 is the engine's process (under Triton: the model instance's stub). It starts each worker from the
installed package (``python -m inflight.backend.executor.worker``) with its own device chosen before CUDA
starts (``CUDA_VISIBLE_DEVICES``), and a rendezvous store on a port the OS picked for this group alone, so
two models or two instances with tensor parallelism can share a server. torch.distributed runs NCCL on GPUs
and gloo on CPU; step messages always go over a gloo group (``step_channel.py``).

Faults: a watchdog thread polls the workers; one that exits makes the group dead (``dead_reason``), calls the
death listeners (the serving layer turns the model not ready) and aborts the NCCL communicator so that a
rank-0 collective waiting for the dead peer returns. Workers exit by themselves when rank 0's process goes
(worker.py watches its parent). ``shutdown`` sends STOP, waits, then kills: no process outlives an unload.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from inflight.backend.executor.parallel import ParallelConfig
from inflight.backend.executor.step_channel import StepChannel

logger = logging.getLogger("inflight")

WORKER_MODULE = "inflight.backend.executor.worker"
JOIN_TIMEOUT_S = 600.0  # a worker's start: imports, then loading its shard of the weights
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
WATCH_INTERVAL_S = 0.2
STOP_TIMEOUT_S = 8.0  # then killed: unload and shutdown leave no process behind within 10 s


def python_executable() -> str:
    """The interpreter to start workers with. Inside Triton's Python-backend stub ``sys.executable`` is the stub
    itself, not a Python; the stub takes its packages from the ``python3`` first on PATH, so that one has
    inflight installed."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    found = shutil.which("python3")
    if found is None:
        raise RuntimeError(
            f"no python3 on PATH to start tensor-parallel workers with (sys.executable is {sys.executable!r})"
        )
    return found


def join_group(
    store: dist.Store, backend: str, rank: int, world_size: int, device: torch.device
) -> dist.ProcessGroup:
    """Join the group as ``rank`` (every rank runs this, so the groups are created in the same order): the
    default group (NCCL or gloo) for the model's collectives, and a gloo group for the step messages, which is
    the default one on CPU. Returns the gloo group.

    On a GPU one all-reduce follows at once: NCCL creates its communicator at the first collective, which must
    not be one a CUDA graph is capturing (with ``kv_cache_memory_bytes`` given no profiling forward runs before
    the captures)."""
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    if device.type == "cuda":
        dist.all_reduce(torch.zeros(1, device=device))
        torch.cuda.synchronize(device)
    return cpu_group


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process exited while the engine ran."""


def worker_devices(device: torch.device, world_size: int) -> list[str]:
    """Each rank's device: rank r on the r-th GPU after rank 0's (wrapping), or the CPU for all.

    The index is a physical one, as CUDA_VISIBLE_DEVICES numbers it (or the parent's own mapping of it)."""
    if device.type != "cuda":
        return ["cpu"] * world_size
    count = torch.cuda.device_count()
    if world_size > count:
        raise ValueError(
            f"tensor_parallel_size {world_size} needs {world_size} GPUs, but {count} are visible"
        )
    first = device.index or 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(count)]
    return [ids[(first + r) % count] for r in range(world_size)]


class TensorParallelGroup:
    """Rank 0's side of a tensor-parallel group: the workers, the process groups, the step channel."""

    def __init__(self, config: object, world_size: int, device: torch.device) -> None:
        """``config``: the ``ExecutorConfig`` (a dataclass of plain values); each worker gets it as JSON,
        its device replaced by its own."""
        if dist.is_initialized():
            raise RuntimeError(
                "this process already has a torch.distributed group (one tensor-parallel engine per process; "
                "shut the other down first)"
            )
        self.world_size = world_size
        self.device = device
        self.dead_reason: str | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._stopping = False
        backend = "nccl" if device.type == "cuda" else "gloo"
        self.store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=JOIN_TIMEOUT_S))  # fmt: skip
        devices = worker_devices(device, world_size)
        settings = dataclasses.asdict(config)
        self.processes: list[subprocess.Popen] = []
        for rank in range(1, world_size):
            env = dict(os.environ)
            if device.type == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = devices[rank]
            worker_settings = {**settings, "device": "cuda:0" if device.type == "cuda" else "cpu"}
            command = [python_executable(), "-m", WORKER_MODULE, "--rank", str(rank), "--world-size", str(world_size),
                       "--port", str(self.store.port), "--backend", backend, "--parent-pid", str(os.getpid()),
                       "--config", json.dumps(worker_settings)]  # fmt: skip
            self.processes.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))
        atexit.register(self.kill)
        logger.info("tensor parallelism: %d ranks (%s), workers %s on %s, rendezvous port %d", world_size,
                    backend, [p.pid for p in self.processes], devices[1:], self.store.port)  # fmt: skip
        try:
            self._wait_for_workers()
            cpu_group = join_group(self.store, backend, 0, world_size, device)
        except BaseException:
            self.kill()
            raise
        self.parallel = ParallelConfig(0, world_size, dist.group.WORLD)
        self.channel = StepChannel(cpu_group, dist.group.WORLD, device)
        self._watchdog = threading.Thread(target=self._watch, name="inflight-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _wait_for_workers(self) -> None:
        """Until every worker has reached the store (its imports done), failing fast if one exits."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        pending = set(range(1, self.world_size))
        while pending:
            for rank in list(pending):
                code = self.processes[rank - 1].poll()
                if code is not None:
                    raise WorkerDiedError(f"tensor-parallel worker {rank} exited with code {code} while starting "
                                          "(its error is in the log above)")  # fmt: skip
                if self.store.check([f"joined/{rank}"]):
                    pending.discard(rank)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"tensor-parallel workers {sorted(pending)} did not start in {JOIN_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.05)

    # ------------------------------------------------------------------------------------------- faults
    def add_death_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(reason)`` is called once, from the watchdog thread, if a worker dies."""
        self._listeners.append(listener)
        if self.dead_reason is not None:
            listener(self.dead_reason)

    def _watch(self) -> None:
        while not self._stopping:
            for rank, process in enumerate(self.processes, start=1):
                code = process.poll()
                if code is not None and not self._stopping:
                    self._died(f"tensor-parallel worker {rank} (pid {process.pid}) exited with code {code}")
                    return
            time.sleep(WATCH_INTERVAL_S)

    def _died(self, reason: str) -> None:
        self.dead_reason = reason
        logger.error("%s: the engine cannot run without it", reason)
        if self.device.type == "cuda":
            # NOTE: a rank-0 NCCL collective would wait for the dead peer forever; aborting makes it fail.
            try:
                dist.distributed_c10d._abort_process_group()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - best effort; the listeners still run
                logger.exception("aborting the NCCL communicator failed")
        for listener in self._listeners:
            try:
                listener(reason)
            except Exception:  # noqa: BLE001
                logger.exception("a tensor-parallel death listener failed")

    # ------------------------------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop the workers (STOP, then kill after ``STOP_TIMEOUT_S``) and leave the process group."""
        if self._stopping:
            return
        self._stopping = True
        if self.dead_reason is None:
            try:
                self.channel.send_stop()
            except Exception:  # noqa: BLE001 - a worker already gone: kill the rest below
                logger.warning("tensor parallelism: sending STOP failed", exc_info=True)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                logger.warning("tensor parallelism: leaving the process group failed", exc_info=True)
        atexit.unregister(self.kill)

    def kill(self) -> None:
        """Kill every worker still running and reap it (no zombie, no orphan)."""
        self._stopping = True
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.error("tensor-parallel worker pid %d did not exit after SIGKILL", process.pid)
