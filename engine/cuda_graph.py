"""CUDA graphs for decode-only steps (vLLM's piecewise idea, whole-model here).

Decode batches are padded up to the next *capture size* (1, 2, 4, 8, 16, 24, 32, ... up to
``max_num_seqs``); each size has one graph, captured once at start-up, that runs the whole model
plus ``compute_logits`` on static input buffers. Padding rows have token 0, position 0, slot -1
(``reshape_and_cache`` writes nothing) and ``seq_len`` 0 (the decode kernels return zeros), so
they change neither the KV cache nor the real rows. Prefill and mixed batches run eagerly.

Only the Triton backend on CUDA is captured: the torch reference kernels read ``seq_lens`` on the
host, which a graph cannot do. LoRA batches run eagerly (their kernel metadata has per-step shapes).

What a GPU session must verify (no GPU was available when this was written):
``tests/engine/test_runner_cuda_graph.py`` runs the padded path eagerly on the CPU; on a GPU,
``benchmarks/e2e_gpu.py`` and the greedy-equivalence tests with ``device="cuda"`` should give the
same tokens with and without ``enforce_eager``.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pageant.engine.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8, and ``max_num_seqs``."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = {s for s in (1, 2, 4, 8) if s <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 8))
    sizes.add(max_num_seqs)
    return sorted(sizes)


def padded_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest capture size >= ``num_seqs`` (None if the batch is larger than every size)."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


@dataclass
class DecodeBuffers:
    """Static device tensors that every captured graph reads; ``fill`` writes one step into them."""

    input_ids: torch.Tensor  # [max_size] int64
    positions: torch.Tensor  # [max_size] int64
    slot_mapping: torch.Tensor  # [max_size] int64
    seq_lens: torch.Tensor  # [max_size] int32
    block_tables: torch.Tensor  # [max_size, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor  # [max_size + 1] int32: arange (one query token per row)

    @classmethod
    def allocate(cls, max_size: int, max_blocks_per_seq: int, device: torch.device) -> "DecodeBuffers":
        buffers = cls(
            input_ids=torch.zeros(max_size, dtype=torch.int64, device=device),
            positions=torch.zeros(max_size, dtype=torch.int64, device=device),
            slot_mapping=torch.full((max_size,), -1, dtype=torch.int64, device=device),
            seq_lens=torch.zeros(max_size, dtype=torch.int32, device=device),
            block_tables=torch.zeros(max_size, max_blocks_per_seq, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(max_size + 1, dtype=torch.int32, device=device),
        )
        return buffers

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata, size: int) -> None:
        """Copy a decode-only step of ``n`` sequences into rows ``[:n]`` and pad rows ``[n:size]``.
        Device-to-device copies only: no host synchronisation."""
        n = input_ids.shape[0]
        if n > size or md.num_decode_seqs != n or md.num_seqs != n:
            raise ValueError(f"not a decode-only batch of at most {size} sequences")
        width = md.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(md.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(md.seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(md.block_tables, non_blocking=True)
        self.block_tables[:n, width:].zero_()
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[n:size].zero_()

    def metadata(self, size: int, max_seq_len: int) -> AttentionMetadata:
        """Views of the first ``size`` rows (the same storage on every replay)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            num_decode_seqs=size,
            max_query_len=1,
            max_seq_len=max_seq_len,
        )


class DecodeGraphs:
    """One CUDA graph per capture size over ``model`` + ``compute_logits``.

    ``use_graphs=False`` runs the same padded path eagerly (how the CPU tests check the padding).
    """

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, max_num_seqs: int,
                 max_blocks_per_seq: int, max_model_len: int, *, use_graphs: bool = True):
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        self.buffers = DecodeBuffers.allocate(self.sizes[-1], max_blocks_per_seq, kv_cache.device)
        self.use_graphs = use_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # size -> [size, vocab] float32, the graph's output

    def _forward(self, size: int) -> torch.Tensor:  # [size, vocab] float32
        b = self.buffers
        hidden = self.model(b.input_ids[:size], b.positions[:size], self.kv_cache,
                            b.metadata(size, self.max_model_len))  # [size, hidden]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, in one shared memory pool. Padding-only inputs
        (every slot -1), so the KV cache is untouched."""
        if not self.use_graphs:
            return
        b = self.buffers
        b.slot_mapping.fill_(-1)
        b.seq_lens.zero_()
        pool = None
        for size in tqdm(list(reversed(self.sizes)), desc="Capturing CUDA graphs", unit="graph", leave=False,
                         disable=None):
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                self._forward(size)
            torch.cuda.synchronize(self.kv_cache.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.kv_cache.device)
        logger.info("captured %d CUDA graphs for decode batch sizes %s", len(self.graphs), self.sizes)

    def can_run(self, num_seqs: int) -> bool:
        return padded_size(num_seqs, self.sizes) is not None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """Logits ``[padded_size, vocab]`` float32 of a decode-only step (rows past ``num_seqs`` are
        padding). With graphs the tensor is the graph's output, overwritten by the next replay."""
        size = padded_size(input_ids.shape[0], self.sizes)
        if size is None:
            raise ValueError(f"decode batch of {input_ids.shape[0]} exceeds the largest graph ({self.sizes[-1]})")
        self.buffers.fill(input_ids, positions, md, size)
        if self.use_graphs:
            self.graphs[size].replay()
            return self.logits[size]
        return self._forward(size)
