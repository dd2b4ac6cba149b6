"""Linear layers that know their tensor-parallel shard and how checkpoint tensors land in them.

Every layer owns a ``quant_method`` that creates its parameters and does the multiply
(``UnquantizedLinearMethod``: a dense ``[out, in]`` weight and ``F.linear``; the quantization work
adds more methods behind the same two calls). Every layer (the module owning the parameters, so
the contract survives ``to_empty``, which replaces parameter objects) has

- ``weight_loader(param, loaded_weight, shard_id=None)``: copies the rank's part of a checkpoint
  tensor into ``param`` (shape-checked, ``ValueError`` otherwise);
- ``shard_ids``: the shards a merged parameter is filled from (``("q", "k", "v")``, ``(0, 1)``), or
  None for parameters loaded in one piece — the loader checks every shard arrived.

Sharding (vLLM's rules): column-parallel layers split the output features across ranks,
row-parallel layers the input features (then one all-reduce, bias added after it); the q/k/v
projection splits heads, replicating KV heads when there are fewer than ranks.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pageant.engine.layers.parallel import SINGLE, ParallelState, divide


class UnquantizedLinearMethod:
    """Dense weights ``[output_size_per_partition, input_size_per_partition]`` in the model dtype."""

    def create_weights(self, layer: "LinearBase", input_size: int, output_size: int, dtype: torch.dtype | None) -> None:
        weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        layer.register_parameter("weight", weight)

    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)  # [num_tokens, in] -> [num_tokens, out]


def _copy(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape {tuple(loaded.shape)} does not fit the parameter's {tuple(param.shape)}")
    param.data.copy_(loaded.to(param.dtype))


class LinearBase(nn.Module):
    """``y = x @ W.T + b`` over this rank's shard; subclasses say how the shard is cut."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool, input_size_per_partition: int,
                 output_size_per_partition: int, parallel: ParallelState = SINGLE, quant_method=None,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_size_per_partition
        self.output_size_per_partition = output_size_per_partition
        self.parallel = parallel
        self.params_dtype = params_dtype
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_size_per_partition, output_size_per_partition, params_dtype)
        if bias:
            bias_size = output_size if isinstance(self, RowParallelLinear) else output_size_per_partition
            self.bias = nn.Parameter(torch.empty(bias_size, dtype=params_dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    shard_ids: tuple | None = None

    @property
    def in_features(self) -> int:  # nn.Linear's names, for code that inspects projections
        return self.input_size_per_partition

    @property
    def out_features(self) -> int:
        return self.output_size_per_partition

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _copy(param, loaded)

    def set_quant_method(self, method) -> None:
        """Replace the weights with ``method``'s (a quantized checkpoint; call on the meta build).

        A method with ``weight_loader(layer, param, loaded, shard_id, dense_loader)`` sees every
        checkpoint tensor first (to unpack or quantize it) and hands the rows to the layer's own
        loader ``dense_loader``, which places shards as for dense weights."""
        for name in [n for n, _ in self.named_parameters(recurse=False) if n != "bias"]:
            delattr(self, name)
        self.quant_method = method
        method.create_weights(self, self.input_size_per_partition, self.output_size_per_partition, self.params_dtype)
        load = getattr(method, "weight_loader", None)
        if load is not None:
            dense = type(self).weight_loader.__get__(self)
            self.weight_loader = lambda param, loaded, shard_id=None: load(self, param, loaded, shard_id, dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [num_tokens, out]
        return self.quant_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank (routers, small heads)."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, **kw):
        super().__init__(input_size, output_size, bias=bias, input_size_per_partition=input_size,
                         output_size_per_partition=output_size, **kw)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: rank ``r`` holds rows ``[r * n, (r + 1) * n)``."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False,
                 parallel: ParallelState = SINGLE, **kw):
        per = divide(output_size, parallel.tp_size, "output size")
        super().__init__(input_size, output_size, bias=bias, input_size_per_partition=input_size,
                         output_size_per_partition=per, parallel=parallel, **kw)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if self.parallel.tp_size > 1:
            loaded = loaded.narrow(0, self.parallel.tp_rank * param.shape[0], param.shape[0])
        _copy(param, loaded)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed (one all-reduce), then bias."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False,
                 parallel: ParallelState = SINGLE, **kw):
        per = divide(input_size, parallel.tp_size, "input size")
        super().__init__(input_size, output_size, bias=bias, input_size_per_partition=per,
                         output_size_per_partition=output_size, parallel=parallel, **kw)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if self.parallel.tp_size > 1 and param.dim() == 2:  # the bias is whole on every rank
            n = param.shape[1]
            loaded = loaded.narrow(1, self.parallel.tp_rank * n, n)
        _copy(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in / tp] -> [num_tokens, out]
        out = self.parallel.all_reduce(self.quant_method.apply(self, x, None))
        return out if self.bias is None else out + self.bias


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate and up).

    ``output_sizes`` are the full sizes of the parts, in output order; checkpoint tensor ``i``
    loads with ``shard_id=i``, a checkpoint that already fuses them with ``shard_id=None``.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], *, bias: bool = False,
                 parallel: ParallelState = SINGLE, **kw):
        self.output_sizes = tuple(output_sizes)
        self.shard_ids = tuple(range(len(self.output_sizes)))
        super().__init__(input_size, sum(self.output_sizes), bias=bias, parallel=parallel, **kw)

    def shard_range(self, shard_id: int) -> tuple[int, int]:
        """(offset, size) of part ``shard_id`` inside this rank's output rows."""
        tp = self.parallel.tp_size
        return sum(self.output_sizes[:shard_id]) // tp, self.output_sizes[shard_id] // tp

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # fused in the checkpoint: split it into the parts
            for i, part in enumerate(loaded.split(list(self.output_sizes), dim=0)):
                self.weight_loader(param, part, i)
            return
        if shard_id not in self.shard_ids:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {self.shard_ids}")
        offset, size = self.shard_range(shard_id)
        if self.parallel.tp_size > 1:
            loaded = loaded.narrow(0, self.parallel.tp_rank * size, size)
        _copy(param.data.narrow(0, offset, size), loaded)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul, output rows ``[q | k | v]`` of this rank's heads.

    Heads are split across ranks; with fewer KV heads than ranks each KV head is replicated on
    ``tp_size // total_num_kv_heads`` ranks. Checkpoint tensors load with ``shard_id`` "q", "k" or
    "v", or fused (already ``[q | k | v]``) with ``shard_id=None``.
    """

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int, *,
                 bias: bool = False, parallel: ParallelState = SINGLE, **kw):
        tp = parallel.tp_size
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp, "number of attention heads")
        if tp >= total_num_kv_heads:
            self.num_kv_heads, self.num_kv_head_replicas = 1, divide(tp, total_num_kv_heads, "tp size")
        else:
            self.num_kv_heads, self.num_kv_head_replicas = divide(total_num_kv_heads, tp, "number of KV heads"), 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp * head_dim
        super().__init__(hidden_size, output_size, bias=bias, parallel=parallel, **kw)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # fused [q | k | v] over all heads
            q, kv = self.total_num_heads * self.head_dim, self.total_num_kv_heads * self.head_dim
            if loaded.shape[0] != q + 2 * kv:
                raise ValueError(f"fused qkv has {loaded.shape[0]} rows, expected {q + 2 * kv}")
            for sid, part in zip(self.shard_ids, loaded.split([q, kv, kv], dim=0)):
                self.weight_loader(param, part, sid)
            return
        rank = self.parallel.tp_rank
        if shard_id == "q":
            offset, size, index = 0, self.q_size, rank
        elif shard_id in ("k", "v"):
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, index = self.kv_size, rank // self.num_kv_head_replicas
        else:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {self.shard_ids}")
        if self.parallel.tp_size > 1:
            loaded = loaded.narrow(0, index * size, size)
        _copy(param.data.narrow(0, offset, size), loaded)
