"""``FusedMoE``: a Mixtral-style sparse MoE block's experts as two fused weights and one kernel call.

The router (``gate``, a plain ``[num_experts, hidden]`` linear) stays in the model; ``FusedMoE``
takes its logits, picks each token's ``top_k`` experts (``ops.select_experts``) and runs their
gated MLPs in one grouped-GEMM call (``ops.fused_moe``). Parameters, in vLLM's names and layout::

    w13_weight: [num_experts, 2 * intermediate_per_rank, hidden]  rows [0:I] gate (w1), [I:2I] up (w3)
    w2_weight:  [num_experts, hidden, intermediate_per_rank]      down

Checkpoint layouts (both load through ``weight_loader(param, loaded_weight, expert_id, shard_id)``):

- per expert, as Mixtral checkpoints on the Hub store it and as transformers 5 still *saves* it:
  ``model.layers.N.block_sparse_moe.experts.{e}.w1.weight [I, H]`` (gate), ``...w3.weight [I, H]``
  (up), ``...w2.weight [H, I]`` (down): shard ids "w1", "w3", "w2" with ``expert_id = e``;
  ``expert_params_mapping`` lists the name fragments (Qwen-MoE style checkpoints: pass
  ``gate_proj``/``down_proj``/``up_proj``).
- fused, as transformers 5 holds Mixtral in memory (``MixtralExperts``; ``state_dict()`` keys):
  ``model.layers.N.mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows then up rows) and
  ``model.layers.N.mlp.experts.down_proj [E, H, I]``: shard ids "w13" and "w2" with
  ``expert_id=None``; ``fused_params_mapping`` lists those fragments.

Tensor parallelism (vLLM's rule): every rank holds all experts and ``intermediate_size // tp_size``
of each expert's intermediate features (the gate/up rows and the down columns of its slice), so each
rank's output is a partial sum, all-reduced when ``reduce_results`` (the identity on one rank).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from pageant.engine.layers.parallel import SINGLE, ParallelState, divide
from pageant.kernels.moe_reference import ACTIVATIONS

_EXPERT_SHARDS = ("w1", "w3", "w2")
_FUSED_SHARDS = ("w13", "w2")


class FusedMoE(nn.Module):
    """The experts of a sparse MoE block: ``forward(hidden_states, router_logits)``."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        ops: ModuleType,
        *,
        renormalize: bool = True,
        activation: str = "silu",
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
        parallel: ParallelState | None = None,
        reduce_results: bool = True,
    ):
        """``ops`` is the kernels module (``pageant.kernels.get_ops("torch" | "triton")``).
        ``tp_size`` > 1 needs ``parallel`` (the rank and process group) with that size."""
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown MoE activation {activation!r}; expected one of {ACTIVATIONS}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}]; got {top_k}")
        if parallel is None:
            if tp_size != 1:
                raise ValueError(f"tp_size={tp_size} needs parallel=ParallelState(tp_rank, tp_size, group)")
            parallel = SINGLE
        elif tp_size not in (1, parallel.tp_size):
            raise ValueError(f"tp_size={tp_size} disagrees with parallel.tp_size={parallel.tp_size}")
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.ops, self.renormalize, self.activation = ops, renormalize, activation
        self.parallel, self.reduce_results = parallel, reduce_results
        self.tp_rank, self.tp_size = parallel.tp_rank, parallel.tp_size
        self.intermediate_size_per_partition = divide(intermediate_size, self.tp_size, "intermediate_size")
        part = self.intermediate_size_per_partition
        dtype = params_dtype or torch.get_default_dtype()
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * part, hidden_size, dtype=dtype), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, part, dtype=dtype), requires_grad=False)
        for param in (self.w13_weight, self.w2_weight):  # for callers holding only the parameter
            param.weight_loader = self.weight_loader

    def shard_ids(self, param_name: str) -> tuple[tuple[int, str], ...]:
        """The ``(expert_id, shard_id)`` pieces a complete checkpoint fills into ``param_name``
        (the engine's loader checks every one arrived; a fused tensor fills all of them)."""
        shards = ("w1", "w3") if param_name == "w13_weight" else ("w2",)
        return tuple((e, s) for e in range(self.num_experts) for s in shards)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size_per_partition}/{self.intermediate_size}, "
                f"activation={self.activation}, tp={self.tp_rank}/{self.tp_size}")

    @staticmethod
    def expert_params_mapping(
        num_experts: int, ckpt_gate: str = "w1", ckpt_down: str = "w2", ckpt_up: str = "w3", prefix: str = "experts",
    ) -> list[tuple[str, str, int, str]]:
        """``(param_name, checkpoint_fragment, expert_id, shard_id)`` for per-expert checkpoints, as
        vLLM's ``make_expert_params_mapping``: e.g. ``("experts.w13_weight", "experts.3.w1.weight", 3, "w1")``.
        A loader replaces the fragment in a checkpoint name with ``param_name`` (match it after a
        ".", so ``experts.1.`` never hits ``experts.11.``) and calls the parameter's ``weight_loader``."""
        mapping = []
        for expert in range(num_experts):
            for param, ckpt, shard in (("w13_weight", ckpt_gate, "w1"), ("w2_weight", ckpt_down, "w2"),
                                       ("w13_weight", ckpt_up, "w3")):
                mapping.append((f"{prefix}.{param}", f"{prefix}.{expert}.{ckpt}.weight", expert, shard))
        return mapping

    @staticmethod
    def fused_params_mapping(
        ckpt_gate_up: str = "gate_up_proj", ckpt_down: str = "down_proj", prefix: str = "experts",
    ) -> list[tuple[str, str, None, str]]:
        """The same tuples for transformers 5's fused layout (``experts.gate_up_proj [E, 2I, H]``,
        ``experts.down_proj [E, H, I]``): expert id None, shard ids "w13" and "w2"."""
        return [(f"{prefix}.w13_weight", f"{prefix}.{ckpt_gate_up}", None, "w13"),
                (f"{prefix}.w2_weight", f"{prefix}.{ckpt_down}", None, "w2")]

    def _rank_slice(self, loaded: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's ``intermediate_size_per_partition`` features of ``loaded`` along ``dim``."""
        part = self.intermediate_size_per_partition
        return loaded.narrow(dim, self.tp_rank * part, part)

    def _check(self, loaded: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
        if tuple(loaded.shape) != expected:
            raise ValueError(f"{what}: checkpoint tensor has shape {tuple(loaded.shape)}, expected {expected}")

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, expert_id: int | None = None,
                      shard_id: str | None = None) -> None:
        """Copy a checkpoint tensor (full, unsharded) into this rank's part of ``param``.

        ``shard_id`` None with ``expert_id`` None: the fused tensor of ``param`` ("w13" or "w2").
        Per expert (``expert_id`` an int): "w1" gate ``[I, H]`` and "w3" up ``[I, H]`` into
        ``w13_weight``, "w2" down ``[H, I]`` into ``w2_weight``. All experts (``expert_id=None``):
        "w13" ``[E, 2I, H]`` (gate rows then up rows) and "w2" ``[E, H, I]``. ValueError otherwise.
        """
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        part = self.intermediate_size_per_partition
        if shard_id is None and expert_id is None:
            shard_id = "w13" if param is self.w13_weight else "w2"
        target = self.w13_weight if shard_id in ("w1", "w3", "w13") else self.w2_weight
        if shard_id not in _EXPERT_SHARDS + _FUSED_SHARDS:
            raise ValueError(f"unknown shard_id {shard_id!r}; expected one of {_EXPERT_SHARDS} or {_FUSED_SHARDS}")
        if param is not target:
            raise ValueError(f"shard_id {shard_id!r} does not load into a parameter of shape {tuple(param.shape)}")
        if expert_id is None:
            if shard_id not in _FUSED_SHARDS:
                raise ValueError(f"shard_id {shard_id!r} needs an expert_id (fused tensors use 'w13' or 'w2')")
        elif isinstance(expert_id, bool) or not isinstance(expert_id, int) or not 0 <= expert_id < E:
            raise ValueError(f"expert_id must be an int in [0, {E}) or None; got {expert_id!r}")
        elif shard_id not in _EXPERT_SHARDS:
            raise ValueError("shard_id 'w13' loads all experts at once: pass expert_id=None")
        with torch.no_grad():
            if shard_id == "w13":
                self._check(loaded_weight, (E, 2 * I, H), "w13 (gate_up)")
                param.data[:, :part].copy_(self._rank_slice(loaded_weight[:, :I], 1))
                param.data[:, part:].copy_(self._rank_slice(loaded_weight[:, I:], 1))
            elif shard_id == "w2" and expert_id is None:
                self._check(loaded_weight, (E, H, I), "w2 (down, all experts)")
                param.data.copy_(self._rank_slice(loaded_weight, 2))
            elif shard_id == "w2":
                self._check(loaded_weight, (H, I), f"expert {expert_id} w2 (down)")
                param.data[expert_id].copy_(self._rank_slice(loaded_weight, 1))
            else:
                self._check(loaded_weight, (I, H), f"expert {expert_id} {shard_id}")
                rows = slice(0, part) if shard_id == "w1" else slice(part, 2 * part)
                param.data[expert_id, rows].copy_(self._rank_slice(loaded_weight, 0))

    def forward(
        self,
        hidden_states: torch.Tensor,  # [num_tokens, hidden]
        router_logits: torch.Tensor,  # [num_tokens, num_experts]
    ) -> torch.Tensor:  # [num_tokens, hidden]
        """Route each token to its ``top_k`` experts and sum their weighted outputs."""
        topk_weights, topk_ids = self.ops.select_experts(router_logits, self.top_k, self.renormalize)  # [T, k] each
        out = self.ops.fused_moe(hidden_states, self.w13_weight, self.w2_weight, topk_weights, topk_ids,
                                 self.activation)  # [num_tokens, hidden]
        return self.parallel.all_reduce(out) if self.reduce_results else out
