"""``pageant serve --headless``: a node other than node 0 runs its ranks and nothing else.

Every rank of the node is a worker process (see ``worker.py``) joining node 0's rendezvous. The
node's process waits on them: when one fails the others are stopped and it exits 1 (under a
LeaderWorkerSet the group is then recreated); after the driver's clean shutdown it exits 0.
SIGTERM/SIGINT stop the workers.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from pageant.engine.config import EngineConfig, ModelConfig, resolve_max_model_len
from pageant.engine.distributed.executor import check_devices, rendezvous, spawn_workers, stop_workers
from pageant.engine.distributed.topology import RankInfo, check_model_split, node_ranks
from pageant.engine.distributed.worker import WorkerArgs
from pageant.engine.loader import resolve_model_path

logger = logging.getLogger(__name__)


def run_headless(config: EngineConfig) -> int:
    """Run node ``config.node_rank``'s ranks until they end; the exit status for the process."""
    if config.nnodes < 2 or config.node_rank == 0:
        raise ValueError("--headless runs the ranks of a node other than node 0: give --nnodes > 1 and "
                         "--node-rank >= 1 (node 0 runs pageant serve without --headless)")
    path = resolve_model_path(config.model, config.revision, config.download_dir)
    model_config = ModelConfig.from_pretrained(path)
    check_model_split(model_config, config.tensor_parallel_size, config.pipeline_parallel_size)
    world, per_node = config.world_size, config.world_size // config.nnodes
    check_devices(config, per_node)
    addr, port = rendezvous(config, required=True)
    backend = config.attention_backend or ("triton" if config.device.startswith("cuda") else "torch")
    threads = None if config.device.startswith("cuda") else max(1, (os.cpu_count() or 1) // per_node)
    max_model_len = resolve_max_model_len(config.max_model_len, model_config)

    def args_for(rank: int) -> WorkerArgs:
        info = RankInfo(rank, world, config.tensor_parallel_size, config.pipeline_parallel_size, config.nnodes)
        return WorkerArgs(config=config, path=str(path), max_model_len=max_model_len, backend=backend, info=info,
                          master_addr=addr, master_port=port, parent_pid=os.getpid(), num_threads=threads)

    ranks = node_ranks(world, config.nnodes, config.node_rank)
    logger.info("node %d of %d: ranks %s, rendezvous %s:%d", config.node_rank, config.nnodes, ranks, addr, port)
    procs = spawn_workers(args_for, ranks)
    stopping = []
    previous = {sig: signal.signal(sig, lambda *_: stopping.append(True)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopping:
            codes = [p.poll() for p in procs]
            failed = [(p, c) for p, c in zip(procs, codes) if c not in (None, 0)]
            if failed:
                p, code = failed[0]
                logger.error("worker %s exited with code %s: stopping this node", p.name, code)
                return 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        stop_workers(procs, timeout=5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
