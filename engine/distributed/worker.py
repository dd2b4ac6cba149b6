"""A worker process: one rank's model runner, driven by the driver's broadcasts.

Started as ``python -m pageant.engine.distributed.worker`` with its pickled ``WorkerArgs`` on stdin
(a fresh interpreter: CUDA and torch threads start clean, and the user's ``__main__`` is never
re-imported, so scripts without an ``if __name__ == "__main__"`` guard work). The
loop receives every message the driver broadcasts, in order: a step (run the forward on this
rank's shard; a middle pipeline stage sends its hidden states on), a LoRA change (mirrored in this
rank's own manager, so every rank puts every adapter in the same slot), or shutdown. Any error
ends the process non-zero: the driver sees its sockets close and fails the engine.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import threading
import time
from dataclasses import dataclass

import torch

from pageant.engine.config import EngineConfig, ModelConfig
from pageant.engine.distributed.comm import DistContext, init_distributed
from pageant.engine.distributed.messages import LoRAMessage, ShutdownMessage, StepMessage
from pageant.engine.distributed.topology import RankInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerArgs:
    """What a spawned rank needs (picklable)."""

    config: EngineConfig
    path: str  # the resolved checkpoint folder
    max_model_len: int
    backend: str  # "torch" or "triton"
    info: RankInfo
    master_addr: str
    master_port: int
    parent_pid: int | None  # exit when this process is gone (None: do not watch)
    num_threads: int | None  # torch CPU threads (None: torch's default)


def rank_device(config: EngineConfig, info: RankInfo) -> torch.device:
    """``cuda:<local rank>`` on CUDA (one GPU per rank), else the CPU."""
    if config.device.startswith("cuda"):
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def build_runner(config: EngineConfig, path: pathlib.Path, max_model_len: int, backend: str,
                 dist: DistContext | None, lora_manager=None):
    """The rank's ``ModelRunner`` (and, with LoRA on and none given, its own LoRA manager)."""
    import pageant.kernels
    from pageant.engine.adapters import LoRAManager, LoRAModelSpec
    from pageant.engine.model_runner import ModelRunner

    model_config = ModelConfig.from_pretrained(path)
    device = dist.device if dist is not None else torch.device(config.device)
    if lora_manager is None and config.enable_lora:
        lora_manager = LoRAManager(
            LoRAModelSpec.from_model_config(model_config), max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank, max_cpu_loras=config.max_cpu_loras, device=device,
            dtype=getattr(torch, config.dtype), backend=backend, adapter_root=config.allowed_lora_root)
    return ModelRunner(config, model_config, path, pageant.kernels.get_ops(backend), max_model_len, lora_manager,
                       dist=dist)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the process that started this one is gone (no orphaned ranks, even after SIGKILL)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.5)


def run_worker(args: WorkerArgs) -> None:
    """Join the world, build the runner, serve the driver until shutdown."""
    if args.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    device = rank_device(args.config, args.info)
    dist = init_distributed(args.info, args.master_addr, args.master_port, device,
                            args.config.distributed_timeout_seconds)
    runner = build_runner(args.config, pathlib.Path(args.path), args.max_model_len, args.backend, dist)
    manager = runner.lora_manager
    try:
        with torch.inference_mode():
            while True:
                message = dist.broadcast()
                if isinstance(message, StepMessage):
                    runner.execute(None, runner.to_device(message.host))
                elif isinstance(message, LoRAMessage):
                    if message.op == "add":
                        manager.add_lora(*message.args)
                    elif message.op == "remove":
                        manager.remove_lora(*message.args)
                elif isinstance(message, ShutdownMessage):
                    break
    finally:
        dist.close()


def worker_main(args: WorkerArgs) -> None:
    """The spawned process's entry point: exit 0 after a shutdown, 1 on any error."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{args.info.rank} %(name)s: "
                                                  "%(message)s")
    try:
        run_worker(args)
    except BaseException:  # noqa: BLE001 - reported, then a non-zero exit the driver notices
        logger.exception("rank %d failed", args.info.rank)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    import pickle

    worker_main(pickle.load(sys.stdin.buffer))
