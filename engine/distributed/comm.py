"""The process groups of one rank, and the few collectives the engine itself makes.

Every rank joins one ``torch.distributed`` world (NCCL on CUDA, gloo on the CPU) through a TCP
rendezvous at ``master_addr:master_port``; then, in the same order on every rank, one tensor-parallel
group per pipeline stage (that backend), one gloo group over all ranks for the driver's step
messages and one for the start-up agreement (the KV pool size, after every rank loaded its
weights, however long that takes). The world and tensor groups time out after
``distributed_timeout_seconds`` (a hung rank fails the engine). So does a broadcast on the message
group *on the driver* (gloo's send waits for the receiver), while workers wait on it without limit
(an idle engine sends nothing). A peer that dies closes its sockets, which fails any wait on it at
once.
"""

from __future__ import annotations

import datetime
import logging
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pageant.engine.distributed.topology import RankInfo
from pageant.engine.layers.parallel import ParallelState

logger = logging.getLogger(__name__)

_NO_TIMEOUT = datetime.timedelta(days=365)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for a one-node rendezvous)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class DistContext:
    """One rank's view: its place, its groups, its device. Made by ``init_distributed``."""

    info: RankInfo
    parallel: ParallelState  # this rank's tensor shard and stage, with the stage's tensor group
    message_group: Any  # gloo, every rank: the driver's broadcasts
    startup_group: Any  # gloo, every rank, no time limit: agreements while the ranks load
    device: torch.device

    # ------------------------------------------------------------ driver -> every rank
    def broadcast(self, message: Any = None) -> Any:
        """Rank 0 sends ``message`` to every rank; every rank returns it."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.message_group)
        return box[0]

    def min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` any rank has (the KV pool size every rank can hold)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.startup_group)
        return int(t.item())

    # ------------------------------------------------------------ stage -> next stage
    def send_intermediate(self, tensors: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
        """Hand this stage's output stream (each ``[num_tokens, hidden]``) to the next stage's shard."""
        for key in keys:
            dist.send(tensors[key].contiguous(), dst=self.info.next_stage_peer)

    def recv_intermediate(self, num_tokens: int, hidden_size: int, dtype: torch.dtype,
                          keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        out = {}
        for key in keys:
            t = torch.empty(num_tokens, hidden_size, dtype=dtype, device=self.device)  # [num_tokens, hidden]
            dist.recv(t, src=self.info.prev_stage_peer)
            out[key] = t
        return out

    def close(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer already gone: nothing left to tidy
                logger.debug("destroy_process_group failed", exc_info=True)


def init_distributed(info: RankInfo, master_addr: str, master_port: int, device: torch.device,
                     timeout_seconds: float) -> DistContext:
    """Join the world as ``info.rank`` and make the groups (the same calls, in order, on every rank)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_seconds)
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=info.rank,
                            world_size=info.world_size, timeout=timeout)
    tp_group = None
    for pp_rank in range(info.pp_size):  # every rank creates every group, in the same order
        group = dist.new_group(info.stage_ranks(pp_rank), backend=backend, timeout=timeout)
        if pp_rank == info.pp_rank:
            tp_group = group
    everyone = list(range(info.world_size))
    message_group = dist.new_group(everyone, backend="gloo", timeout=timeout if info.rank == 0 else _NO_TIMEOUT)
    startup_group = dist.new_group(everyone, backend="gloo", timeout=_NO_TIMEOUT)
    parallel = ParallelState(tp_rank=info.tp_rank, tp_size=info.tp_size, group=tp_group if info.tp_size > 1 else None,
                             pp_rank=info.pp_rank, pp_size=info.pp_size)
    logger.info("rank %d of %d: tensor shard %d/%d, pipeline stage %d/%d on %s (%s)", info.rank, info.world_size,
                info.tp_rank, info.tp_size, info.pp_rank, info.pp_size, device, backend)
    return DistContext(info=info, parallel=parallel, message_group=message_group, startup_group=startup_group,
                       device=device)
