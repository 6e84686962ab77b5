"""A tensor-parallel worker: ranks 1..N-1, started by rank 0 (``distributed.py``), one process each.

    python -m inflight.backend.executor.worker --rank R --world-size N --port P --backend nccl|gloo
        --parent-pid PID --config '{ExecutorConfig as JSON}'

It joins the group, builds the same ``ModelExecutor`` as rank 0 (its shard of the weights, the same KV
cache sizing, calibration and graph captures, each a collective in the same order), then runs every step
rank 0 sends until STOP. It exits when its parent goes (checked twice a second), so a killed Triton stub
leaves no worker behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from datetime import timedelta

PARENT_CHECK_S = 0.5


def _exit_with_parent(parent_pid: int) -> None:
    """A daemon thread: exit at once when the parent process is gone (re-parented: ppid changed)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(PARENT_CHECK_S)

    threading.Thread(target=watch, name="inflight-worker-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", choices=["nccl", "gloo"], required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--config", required=True, help="the ExecutorConfig as JSON")
    args = parser.parse_args(argv)
    _exit_with_parent(args.parent_pid)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s inflight[tp{args.rank}] %(levelname)s %(message)s"
    )
    logger = logging.getLogger("inflight")

    import torch
    import torch.distributed as dist

    from inflight.backend.executor.distributed import JOIN_TIMEOUT_S, join_group
    from inflight.backend.executor.executor import ExecutorConfig, ModelExecutor
    from inflight.backend.executor.model_config import ModelConfig
    from inflight.backend.executor.parallel import ParallelConfig
    from inflight.backend.executor.step_channel import StepChannel

    if args.backend == "gloo":
        # NOTE: the ranks share the CPU; N processes with every core each would only contend.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    store = dist.TCPStore("127.0.0.1", args.port, args.world_size, is_master=False,
                          timeout=timedelta(seconds=JOIN_TIMEOUT_S))  # fmt: skip
    store.set(f"joined/{args.rank}", "1")
    config = ExecutorConfig(**json.loads(args.config))
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cpu_group = join_group(store, args.backend, args.rank, args.world_size, device)
    parallel = ParallelConfig(args.rank, args.world_size, dist.group.WORLD)
    executor = ModelExecutor(config, ModelConfig.from_pretrained(config.model),
                             worker=(parallel, StepChannel(cpu_group, dist.group.WORLD, device)))  # fmt: skip
    logger.info("tensor-parallel rank %d of %d ready on %s", args.rank, args.world_size, device)
    executor.serve_steps()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
