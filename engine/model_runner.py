"""Runs the model on a ``SchedulerOutput``: builds the step's tensors, owns the KV-cache pool.

Input tensors are built with a handful of numpy operations per step (no per-token Python), then
moved to the device once. Logits are computed only where they are needed: the last query token
of each sequence that samples, and prompt positions of requests asking for prompt logprobs.

On CUDA the KV pool is sized by a profiling forward (``engine/memory.py`` does the arithmetic) and
decode-only steps replay CUDA graphs (``engine/cuda_graph.py``) unless ``enforce_eager``.

With tensor/pipeline parallelism (``dist`` given, see ``pageant.engine.distributed``) the runner
holds one rank's shard: its stage's layers, its KV heads, a pool of the size every rank can hold.
``prepare_host`` is the part the driver computes once and broadcasts; every rank then runs
``to_device`` and ``execute`` on it; a stage other than the last hands its hidden states on and
returns no output.
"""

from __future__ import annotations

import itertools
import logging
import pathlib
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from pageant.engine.adapters import LoRAManager, wrap_model
from pageant.engine.attention import AttentionMetadata
from pageant.engine.config import EngineConfig, ModelConfig
from pageant.engine.cuda_graph import DecodeGraphs
from pageant.engine.distributed.topology import kv_heads_per_rank
from pageant.engine.layers.attention import kv_cache_torch_dtype
from pageant.engine.layers.parallel import SINGLE
from pageant.engine.loader import build_dummy_model, load_model
from pageant.engine.memory import MemoryProfile, kv_cache_budget_bytes, num_kv_blocks_for_budget
from pageant.engine.multimodal.encoder_cache import EncoderCache, MultiModalBatch
from pageant.engine.multimodal.encoder_cache import build_batch as build_mm_batch
from pageant.engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HostInput:
    """One step's inputs on the host (picklable: the driver broadcasts it to the other ranks)."""

    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    query_start_loc: np.ndarray  # [num_seqs + 1] int32
    seq_lens: np.ndarray  # [num_seqs] int32
    block_tables: np.ndarray  # [num_seqs, max_blocks] int32
    num_decode_seqs: int
    max_query_len: int
    max_seq_len: int
    logits_indices: np.ndarray  # [num_sample_rows] int64
    prompt_logits_indices: np.ndarray | None  # [num_prompt_positions] int64
    prompt_targets: np.ndarray | None  # [num_prompt_positions] int64
    prompt_spans: list[tuple[int, int, int]]
    blocks_to_copy: tuple[tuple[int, int], ...]  # (source, destination) KV blocks, before the forward
    lora_names: tuple[str | None, ...] | None  # per sequence (None: LoRA off)
    num_new_tokens: tuple[int, ...]  # per sequence
    pooling: bool  # some sequence is an embedding request: keep the hidden states
    mm: MultiModalBatch | None = None  # image features to merge / M-RoPE positions (None: text only)


@dataclass(frozen=True)
class ModelInput:
    """The flat batch of one step, ready for ``model.forward``."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sample_rows] int64, into the flat tokens
    prompt_logits_indices: torch.Tensor | None  # [num_prompt_positions] int64
    prompt_targets: torch.Tensor | None  # [num_prompt_positions] int64: next prompt token
    prompt_spans: list[tuple[int, int, int]]  # (scheduled index, first position, count)
    host: HostInput | None = None


@dataclass
class ModelOutput:
    """Logits for the sample rows (float32), per prompt-logprob span its logits, and (when the
    step has embedding requests) the final hidden state of every token for their pooling."""

    logits: torch.Tensor  # [num_sample_rows (+ proposals verified), vocab]
    prompt_logits: torch.Tensor | None  # [num_prompt_positions, vocab]
    hidden: torch.Tensor | None = None  # [num_tokens, hidden]


class ModelRunner:
    """Loads the model and allocates the KV pool ``[num_layers, 2, num_blocks, block_size,
    num_kv_heads, head_dim]``; ``execute`` runs one step."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, path: pathlib.Path,
                 ops: ModuleType, max_model_len: int, lora_manager: LoRAManager | None = None, dist=None):
        self.config = config
        self.dist = dist  # a DistContext (this rank's groups), or None: one process
        parallel = dist.parallel if dist is not None else SINGLE
        self.parallel = parallel
        self.lora_manager = lora_manager  # None: LoRA off; else the model's projections get its deltas
        self.model_config = model_config
        self.device = dist.device if dist is not None else torch.device(config.device)
        self.dtype = _DTYPES[config.dtype]
        self.kv_cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)  # float8_e4m3fn for "fp8"
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        max_position = max(max_model_len, model_config.max_position_embeddings)
        if config.load_format == "dummy":
            self.model = build_dummy_model(model_config, ops, self.dtype, self.device, max_position, config.seed,
                                           parallel=parallel)
        else:
            self.model = load_model(path, model_config, ops, self.dtype, self.device, max_position, parallel,
                                    quantization=config.quantization)
        self.start_layer, self.end_layer = parallel.layer_range(model_config.num_layers)
        self.num_layers = self.end_layer - self.start_layer  # this stage's, in the KV pool
        self.num_kv_heads = kv_heads_per_rank(model_config.num_kv_heads, parallel.tp_size)  # this shard's
        if lora_manager is not None:
            wrap_model(self.model, lora_manager)
        self.num_kv_blocks = config.num_kv_blocks or self._blocks_from_memory()
        if dist is not None:  # every rank's pool has the same blocks: the fewest any rank can hold
            self.num_kv_blocks = dist.min_over_ranks(self.num_kv_blocks)
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        mc = model_config
        shape = (self.num_layers, 2, self.num_kv_blocks, self.block_size, self.num_kv_heads, mc.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_kv_blocks, self.block_size,
                    self.kv_cache.numel() * self.kv_cache.element_size() / 2**20)
        # vision-language models: image features by content hash (pageant.engine.multimodal)
        self.encoder_cache = EncoderCache() if getattr(self.model, "supports_multimodal", False) else None
        self.graphs: DecodeGraphs | None = None
        if self.uses_cuda_graphs(ops):
            self.graphs = DecodeGraphs(self.model, self.kv_cache, config.max_num_seqs, self.max_blocks_per_seq,
                                       max_model_len)
            self.graphs.capture()

    def uses_cuda_graphs(self, ops: ModuleType) -> bool:
        """Decode steps replay CUDA graphs on cuda with the Triton kernels, unless ``enforce_eager``
        or LoRA is on (the torch kernels read device data on the host; LoRA metadata varies)."""
        return (self.device.type == "cuda" and ops.__name__.endswith("triton_ops") and self.dist is None
                and not self.config.enforce_eager and self.lora_manager is None)

    # ------------------------------------------------------------------ sizing
    def bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.kv_cache_dtype).element_size()  # 1 byte for an FP8 cache
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * mc.head_dim * elem

    def _blocks_from_memory(self) -> int:
        per_block = self.bytes_per_block()
        max_useful = self.config.max_num_seqs * -(-self.max_model_len // self.block_size)
        if self.device.type == "cpu":
            budget = int(self.config.kv_cache_memory_gib * 2**30)
            return max(1, min(budget // per_block, max_useful))
        budget = self._profile_cuda_budget()
        num = num_kv_blocks_for_budget(budget, per_block)
        if num < 1:
            raise ValueError(
                f"no GPU memory left for the KV cache (budget {budget / 2**30:.2f} GiB); "
                "raise gpu_memory_utilization or lower max_num_batched_tokens"
            )
        return int(num)

    def _profile_cuda_budget(self) -> int:
        """Run the largest step once on dummy inputs; what is left under ``gpu_memory_utilization``
        after weights, activations and other processes' memory is the KV budget."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        mc = self.model_config
        nb = -(-n // self.block_size)
        kv = torch.zeros((self.num_layers, 2, nb, self.block_size, self.num_kv_heads, mc.head_dim),
                         dtype=self.kv_cache_dtype, device=self.device)
        md = AttentionMetadata(
            slot_mapping=torch.arange(n, device=self.device),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(nb, dtype=torch.int32, device=self.device)[None, :],
            num_decode_seqs=0, max_query_len=n, max_seq_len=n,
        )
        intermediate = None
        if not self.parallel.is_first_stage:  # a stage's input stream, as the previous stage would send it
            intermediate = {k: torch.zeros(n, mc.hidden_size, dtype=self.dtype, device=self.device)
                            for k in self.model.intermediate_keys}
        with torch.inference_mode():
            extra = () if intermediate is None else (intermediate,)
            hidden = self.model(torch.zeros(n, dtype=torch.int64, device=self.device),
                                torch.arange(n, device=self.device), kv, md, *extra)
            if self.parallel.is_last_stage:
                logits = self.model.compute_logits(hidden[: self.config.max_num_seqs])  # [rows, vocab]
                logits.log_softmax(dim=-1)  # the sampler's largest temporary
        torch.cuda.synchronize(self.device)
        profile_kv = kv.numel() * kv.element_size()
        del kv, hidden, intermediate
        free, total = torch.cuda.mem_get_info(self.device)
        profile = MemoryProfile(total=total, free=free, torch_reserved=torch.cuda.memory_reserved(self.device),
                                torch_peak=torch.cuda.max_memory_allocated(self.device), profile_kv=profile_kv)
        budget = kv_cache_budget_bytes(profile, self.config.gpu_memory_utilization)
        logger.info("memory profile %s -> KV budget %.2f GiB", profile, budget / 2**30)
        return budget

    # ------------------------------------------------------------------ one step
    def prepare(self, so: SchedulerOutput) -> ModelInput:
        return self.to_device(self.prepare_host(so))

    def prepare_host(self, so: SchedulerOutput) -> HostInput:
        sched = so.scheduled
        bs = self.block_size
        q_lens = np.fromiter((s.num_new_tokens for s in sched), dtype=np.int64, count=len(sched))
        starts = np.fromiter((s.start for s in sched), dtype=np.int64, count=len(sched))
        cu = np.zeros(len(sched) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        num_tokens = int(cu[-1])
        seq_lens = starts + q_lens
        positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(cu[:-1] - starts, q_lens)
        input_ids: list[int] = []
        tables = []
        any_spec = False
        for s in sched:  # known tokens, then any speculative proposals after them
            seq = s.seq
            tables.append(seq.block_table)
            if s.num_new_tokens == 1 and not s.spec_token_ids:
                input_ids.append(seq.token_ids[s.start])
                continue
            any_spec = any_spec or bool(s.spec_token_ids)
            input_ids.extend(seq.token_ids[s.start : s.start + s.num_new_tokens - len(s.spec_token_ids)])
            input_ids.extend(s.spec_token_ids)
        # ragged block tables -> one zero-padded array, without a Python loop over rows
        table_lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        width = int(table_lens.max())
        block_tables = np.zeros((len(sched), width), dtype=np.int32)
        block_tables[np.arange(width)[None, :] < table_lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(tables), dtype=np.int32, count=int(table_lens.sum()))
        seq_index = np.repeat(np.arange(len(sched)), q_lens)
        slot_mapping = block_tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        # one row per sample row; a row verifying k proposals gets the k + 1 positions ending its query
        if any_spec:
            logits_indices = np.array([j for _, idx in so.sample_rows
                                       for j in range(cu[idx + 1] - 1 - len(sched[idx].spec_token_ids), cu[idx + 1])],
                                      dtype=np.int64)
        else:
            row_index = np.fromiter((idx for _, idx in so.sample_rows), dtype=np.int64, count=len(so.sample_rows))
            logits_indices = cu[row_index + 1] - 1

        prompt_idx: list[np.ndarray] = []
        prompt_tgt: list[int] = []
        spans: list[tuple[int, int, int]] = []
        for i, s in enumerate(sched):
            req = s.seq.request
            if s.seq.index == 0 and req.needs_prompt_logprobs and s.start < req.num_prompt_tokens - 1:
                end = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)
                count = end - s.start
                prompt_idx.append(np.arange(cu[i], cu[i] + count))
                prompt_tgt.extend(req.prompt_token_ids[s.start + 1 : end + 1])
                spans.append((i, s.start, count))
        return HostInput(
            input_ids=np.array(input_ids, dtype=np.int64), positions=positions, slot_mapping=slot_mapping,
            query_start_loc=cu.astype(np.int32), seq_lens=seq_lens.astype(np.int32), block_tables=block_tables,
            num_decode_seqs=so.num_decode_seqs, max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()),
            logits_indices=logits_indices,
            prompt_logits_indices=np.concatenate(prompt_idx) if prompt_idx else None,
            prompt_targets=np.array(prompt_tgt, dtype=np.int64) if prompt_idx else None,
            prompt_spans=spans,
            blocks_to_copy=tuple(so.blocks_to_copy),
            lora_names=tuple(s.seq.request.lora_name for s in sched) if self.lora_manager is not None else None,
            num_new_tokens=tuple(q_lens.tolist()),
            pooling=any(s.seq.request.pooling is not None for s in sched),
            mm=build_mm_batch(sched, cu, positions) if self.encoder_cache is not None else None,
        )

    def to_device(self, host: HostInput) -> ModelInput:
        dev = self.device

        def to_dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev, non_blocking=True)

        md = AttentionMetadata(
            slot_mapping=to_dev(host.slot_mapping),
            query_start_loc=to_dev(host.query_start_loc),
            seq_lens=to_dev(host.seq_lens),
            block_tables=to_dev(host.block_tables),
            num_decode_seqs=host.num_decode_seqs,
            max_query_len=host.max_query_len,
            max_seq_len=host.max_seq_len,
        )
        return ModelInput(
            input_ids=to_dev(host.input_ids),
            positions=to_dev(host.positions),
            attn_metadata=md,
            logits_indices=to_dev(host.logits_indices),
            prompt_logits_indices=None if host.prompt_logits_indices is None else to_dev(host.prompt_logits_indices),
            prompt_targets=None if host.prompt_targets is None else to_dev(host.prompt_targets),
            prompt_spans=host.prompt_spans,
            host=host,
        )

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput | None, inp: ModelInput) -> ModelOutput | None:
        """One forward (``so`` is unused: everything a rank needs is in ``inp``). None on a pipeline
        stage other than the last (it sent its hidden states on)."""
        host = inp.host
        if host.blocks_to_copy:
            src = torch.tensor([s for s, _ in host.blocks_to_copy], device=self.device)
            dst = torch.tensor([d for _, d in host.blocks_to_copy], device=self.device)
            kv = self.kv_cache.view(torch.uint8) if self.kv_cache.element_size() == 1 else self.kv_cache  # fp8: bytes
            kv[:, :, dst] = kv[:, :, src]
        if self.lora_manager is not None:  # every token's adapter slot, sequences back to back
            self.lora_manager.set_batch(list(host.lora_names), list(host.num_new_tokens))
        md = inp.attn_metadata
        if (self.graphs is not None and md.num_decode_seqs == md.num_seqs and inp.prompt_logits_indices is None
                and not host.pooling and host.mm is None and self.graphs.can_run(md.num_seqs)):
            padded = self.graphs.run(inp.input_ids, inp.positions, md)  # [padded_size, vocab]
            return ModelOutput(logits=padded.index_select(0, inp.logits_indices), prompt_logits=None)
        extra = ()
        if not self.parallel.is_first_stage:  # the previous stage's stream
            extra = (self.dist.recv_intermediate(inp.input_ids.shape[0], self.model_config.hidden_size, self.dtype,
                                                 self.model.intermediate_keys),)
        positions, mm_kwargs = inp.positions, {}
        if host.mm is not None:  # images in this step: encoder (or its cache), features over the embeddings
            positions, mm_kwargs = self.encoder_cache.forward_inputs(self.model, inp.input_ids, positions, host.mm)
        hidden = self.model(inp.input_ids, positions, self.kv_cache, md, *extra, **mm_kwargs)  # [num_tokens, hidden]
        if not self.parallel.is_last_stage:
            self.dist.send_intermediate(hidden, self.model.intermediate_keys)
            return None
        logits = self.model.compute_logits(hidden[inp.logits_indices])  # [num_sample_rows, vocab]
        prompt_logits = None
        if inp.prompt_logits_indices is not None:
            prompt_logits = self.model.compute_logits(hidden[inp.prompt_logits_indices])
        return ModelOutput(logits=logits, prompt_logits=prompt_logits, hidden=hidden if host.pooling else None)
