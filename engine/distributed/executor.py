"""The driver: rank 0 in the engine's process, the node's other ranks in spawned workers.

``DistributedRunner`` looks like a ``ModelRunner`` to the engine (``prepare``, ``execute``,
``num_kv_blocks``, ``device``): ``execute`` broadcasts the step's host inputs once, then runs rank
0's own shard, whose logits (last stage, all-gathered over the tensor group) the engine samples.

Faults: a thread watches the worker processes; one that exits sets ``failure`` at once (so
``/health`` turns 503) and the step in flight fails (its collective sees the closed sockets)
with ``WorkerFailedError``, which the engine treats as fatal. A rank that hangs fails the step
after ``distributed_timeout_seconds``. ``shutdown`` (also run at garbage collection and at exit)
stops every worker; workers also exit when this process disappears.
"""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
import subprocess
import sys
import threading
import time
import weakref

import torch

from pageant.engine.distributed.comm import free_port, init_distributed
from pageant.engine.distributed.messages import LoRAMessage, ShutdownMessage, StepMessage
from pageant.engine.distributed.topology import RankInfo, check_model_split, node_ranks
from pageant.engine.distributed.worker import WorkerArgs, build_runner, rank_device

logger = logging.getLogger(__name__)


class WorkerFailedError(RuntimeError):
    """A rank died, hung or failed: the engine cannot go on (the process should exit)."""


def rendezvous(config, *, required: bool) -> tuple[str, int]:
    """``master_addr:master_port`` from the config, else MASTER_ADDR/MASTER_PORT, else (one node
    only) 127.0.0.1 and a free port."""
    addr = config.master_addr or os.environ.get("MASTER_ADDR")
    port = config.master_port or (int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else None)
    if required and (addr is None or port is None):
        raise ValueError("a multi-node engine needs master_addr and master_port (--master-addr/--master-port, "
                         "or MASTER_ADDR/MASTER_PORT): the address of node 0 and a free port on it")
    return addr or "127.0.0.1", port or free_port()


def check_devices(config, ranks_per_node: int) -> None:
    """Refuse more ranks per node than it has GPUs (on CUDA)."""
    if config.device.startswith("cuda"):
        found = torch.cuda.device_count()
        if ranks_per_node > found:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size / nnodes = {ranks_per_node} ranks on "
                             f"this node need {ranks_per_node} GPUs, but {found} are visible")


def spawn_workers(args_for_rank, ranks: list[int]) -> list[subprocess.Popen]:
    """One ``python -m pageant.engine.distributed.worker`` per rank, its ``WorkerArgs`` on stdin."""
    procs = []
    for rank in ranks:
        p = subprocess.Popen([sys.executable, "-m", "pageant.engine.distributed.worker"], stdin=subprocess.PIPE)
        p.name = f"rank {rank}"
        p.stdin.write(pickle.dumps(args_for_rank(rank)))
        p.stdin.close()
        procs.append(p)
    return procs


def stop_workers(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """Wait for workers to leave, then terminate (and kill) the ones that do not."""
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class DistributedRunner:
    """Rank 0's ``ModelRunner`` plus the node's worker processes (see the module docstring)."""

    def __init__(self, config, model_config, path: pathlib.Path, backend: str, max_model_len: int,
                 lora_manager=None):
        check_model_split(model_config, config.tensor_parallel_size, config.pipeline_parallel_size)
        world = config.world_size
        per_node = world // config.nnodes
        if config.node_rank != 0:
            raise ValueError("the engine (HTTP server) runs on node 0; start other nodes with --headless")
        check_devices(config, per_node)
        addr, port = rendezvous(config, required=config.nnodes > 1)
        self._state = _State()
        self._lock = threading.Lock()
        info0 = RankInfo(0, world, config.tensor_parallel_size, config.pipeline_parallel_size, config.nnodes)
        threads = None if config.device.startswith("cuda") else max(1, (os.cpu_count() or 1) // per_node)

        def args_for(rank: int) -> WorkerArgs:
            return WorkerArgs(config=config, path=str(path), max_model_len=max_model_len, backend=backend,
                              info=RankInfo(rank, world, config.tensor_parallel_size, config.pipeline_parallel_size,
                                            config.nnodes),
                              master_addr=addr, master_port=port, parent_pid=os.getpid(), num_threads=threads)

        self.procs = spawn_workers(args_for, node_ranks(world, config.nnodes, 0)[1:])
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, None, [False])
        try:
            self.dist = init_distributed(info0, addr, port, rank_device(config, info0),
                                         config.distributed_timeout_seconds)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.dist, [False])
            self.local = build_runner(config, path, max_model_len, backend, self.dist, lora_manager)
        except BaseException:
            self.shutdown()
            raise
        # the watcher holds the processes and the shared state, not this runner (which stays collectable)
        threading.Thread(target=_watch, args=(self.procs, self._state), name="pageant-rank-watch", daemon=True).start()

    @property
    def failure(self) -> str | None:
        return self._state.failure

    @failure.setter
    def failure(self, reason: str | None) -> None:
        self._state.failure = reason

    @property
    def _closed(self) -> bool:
        return self._state.closed

    # ------------------------------------------------------------ what the engine calls
    def __getattr__(self, name):  # num_kv_blocks, device, model, kv_cache, ...: rank 0's
        if name == "local":
            raise AttributeError(name)
        return getattr(self.local, name)

    def prepare(self, so):
        return self.local.prepare(so)

    def execute(self, so, inp):
        self._check()
        try:
            with self._lock:
                self.dist.broadcast(StepMessage(inp.host))
            return self.local.execute(so, inp)
        except Exception as exc:
            # a collective fails the moment a peer's sockets close: name the rank that exited
            reason = _exited(self.procs, wait=1.0) or self.failure or f"the distributed step failed: {exc!r}"
            self.failure = reason
            raise WorkerFailedError(reason) from exc

    def lora_command(self, op: str, args: tuple) -> None:
        """Mirror an adapter change on every rank's manager."""
        self._check()
        with self._lock:
            self.dist.broadcast(LoRAMessage(op, tuple(args)))

    def shutdown(self) -> None:
        """Stop every worker (a clean shutdown message first, if they can still hear it)."""
        if self._state.closed:
            return
        self._state.closed = True
        self._finalizer.detach()
        _shutdown(self.procs, getattr(self, "dist", None), [self.failure is not None])

    # ------------------------------------------------------------ faults
    def _check(self) -> None:
        if self.failure is not None:
            raise WorkerFailedError(self.failure)
        if self._closed:
            raise WorkerFailedError("the engine was shut down")


class _State:
    """What the runner and its watcher thread share."""

    def __init__(self):
        self.failure: str | None = None
        self.closed = False


def _exited(procs, wait: float = 0.0) -> str | None:
    """Which worker has exited (waiting up to ``wait`` seconds for one to), else None."""
    deadline = time.monotonic() + wait
    while True:
        for p in procs:
            if p.poll() is not None:
                return f"worker {p.name} (pid {p.pid}) exited with code {p.returncode}"
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _watch(procs, state: _State) -> None:
    """Record the first worker that exits while the runner is open."""
    while not state.closed:
        reason = _exited(procs)
        if reason is not None:
            if not state.closed and (state.failure is None or "exited with code" not in state.failure):
                state.failure = reason
                logger.error("%s: the engine cannot continue", reason)
            return
        time.sleep(0.2)


def _shutdown(procs, dist, failed: list[bool]) -> None:
    if dist is not None and not failed[0] and all(p.poll() is None for p in procs):
        try:
            dist.broadcast(ShutdownMessage())
        except Exception:  # noqa: BLE001 - a worker already gone; they are stopped below anyway
            logger.debug("shutdown broadcast failed", exc_info=True)
    stop_workers(procs, timeout=10.0 if not failed[0] else 2.0)
    if dist is not None:
        dist.close()
