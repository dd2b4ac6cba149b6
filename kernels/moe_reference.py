"""PyTorch reference of the fused Mixture-of-Experts (Mixtral-style) kernels: the CPU path and the
ground truth for ``pageant.kernels.moe`` (the Triton twin, same signatures).

Weight layout (vLLM's, one tensor per projection for all experts)::

    w13: [num_experts, 2 * intermediate, hidden]  rows [0:I] = gate (Mixtral's w1), [I:2I] = up (w3)
    w2:  [num_experts, hidden, intermediate]      the down projection

For every token ``t`` and routing slot ``j`` (expert ``e = topk_ids[t, j]``)::

    out[t] += topk_weights[t, j] * w2[e] @ (act(w1[e] @ x[t]) * (w3[e] @ x[t]))

with ``act`` SiLU (Mixtral) or tanh-approximated GELU (GeGLU experts). ``fused_moe`` here groups
the (token, slot) pairs by expert and runs one matmul pair per expert that has tokens, then
index-adds the weighted results back, as transformers' ``MixtralExperts`` eager loop does (so
float32 results agree with Hugging Face to rounding, and bfloat16 rounds at the same points).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int32, torch.int64)


def activation_fn(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gate activation called ``activation``: "silu" or "gelu" (tanh approximation)."""
    if activation == "silu":
        return F.silu
    if activation == "gelu":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown MoE activation {activation!r}; expected one of {ACTIVATIONS}")


def check_router_logits(router_logits: torch.Tensor, top_k: int) -> None:
    """``select_experts``' checks (shapes only, no device data read)."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [num_tokens, num_experts]; got shape {tuple(router_logits.shape)}")
    if not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be floating point; got {router_logits.dtype}")
    num_experts = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}]; got {top_k!r}")


def check_moe_shapes(
    hidden_states: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]
    w2: torch.Tensor,  # [num_experts, hidden, intermediate]
    topk_weights: torch.Tensor,  # [num_tokens, top_k]
    topk_ids: torch.Tensor,  # [num_tokens, top_k]
    activation: str,
) -> None:
    """``fused_moe``'s checks of shapes, dtypes and the activation name; ValueError on a mismatch.

    Reads no device data: whether the expert ids are in range is not checked here.
    """
    activation_fn(activation)
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [num_tokens, hidden]; got shape {tuple(hidden_states.shape)}")
    if hidden_states.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden_states must be one of {_FLOAT_DTYPES}; got {hidden_states.dtype}")
    num_tokens, hidden = hidden_states.shape
    if w13.dim() != 3 or w13.shape[2] != hidden or w13.shape[1] % 2:
        raise ValueError(
            f"w13 must be [num_experts, 2 * intermediate, hidden={hidden}]; got shape {tuple(w13.shape)}"
        )
    num_experts, intermediate = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (num_experts, hidden, intermediate):
        raise ValueError(
            f"w2 must be [num_experts={num_experts}, hidden={hidden}, intermediate={intermediate}]; "
            f"got shape {tuple(w2.shape)}"
        )
    if w13.dtype != hidden_states.dtype or w2.dtype != hidden_states.dtype:
        raise ValueError(
            f"w13 ({w13.dtype}) and w2 ({w2.dtype}) must have hidden_states' dtype {hidden_states.dtype}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must be [num_tokens={num_tokens}, top_k]; got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in _INT_DTYPES:
        raise ValueError(f"topk_ids must be int32 or int64; got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must have one shape"
        )
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be floating point; got {topk_weights.dtype}")
    if topk_ids.shape[1] > num_experts:
        raise ValueError(f"top_k={topk_ids.shape[1]} exceeds num_experts={num_experts}")


def select_experts(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # (topk_weights [num_tokens, top_k] float32, topk_ids [.., top_k] int32)
    """Mixtral routing: softmax over the experts in float32, the ``top_k`` largest, optionally
    renormalised to sum to 1 per token (transformers' ``MixtralTopKRouter`` always renormalises)."""
    check_router_logits(router_logits, top_k)
    probs = torch.softmax(router_logits.float(), dim=-1)  # [num_tokens, num_experts]
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # [num_tokens, top_k] each
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids.to(torch.int32)


def fused_moe(
    hidden_states: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]: gate rows then up rows
    w2: torch.Tensor,  # [num_experts, hidden, intermediate]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] (float32 from select_experts)
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int32/int64, values in [0, num_experts)
    activation: str = "silu",
) -> torch.Tensor:  # [num_tokens, hidden], hidden_states' dtype
    """The experts' gated MLPs for each token's ``top_k`` experts, weighted and summed.

    Pairs (token, slot) are sorted by expert id; each expert with tokens runs
    ``linear(x, w13[e]) -> act(gate) * up -> linear(., w2[e]) * weight`` once on its rows, which are
    index-added into the output (as transformers' eager loop). This CPU path reads the expert ids on
    the host (one sync) and raises ValueError for ids outside ``[0, num_experts)``.
    """
    check_moe_shapes(hidden_states, w13, w2, topk_weights, topk_ids, activation)
    act = activation_fn(activation)
    num_tokens, top_k = topk_ids.shape
    num_experts, intermediate = w13.shape[0], w13.shape[1] // 2
    out = torch.zeros_like(hidden_states)  # [num_tokens, hidden]
    if num_tokens == 0:
        return out
    flat_ids = topk_ids.reshape(-1).long()  # [num_pairs], pair p = token * top_k + slot
    low, high = torch.aminmax(flat_ids)
    if int(low) < 0 or int(high) >= num_experts:
        raise ValueError(f"topk_ids must be in [0, {num_experts}); got values in [{int(low)}, {int(high)}]")
    order = torch.argsort(flat_ids, stable=True)  # [num_pairs] pairs grouped by expert, tokens ascending
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    tokens = order // top_k  # [num_pairs] the token of each sorted pair
    x_sorted = hidden_states.index_select(0, tokens)  # [num_pairs, hidden]
    w_sorted = topk_weights.reshape(-1).index_select(0, order)  # [num_pairs]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        start += count
        gate_up = F.linear(x_sorted[rows], w13[expert])  # [count, 2 * intermediate]
        h = act(gate_up[:, :intermediate]) * gate_up[:, intermediate:]  # [count, intermediate]
        y = F.linear(h, w2[expert]) * w_sorted[rows, None]  # [count, hidden] (float32 if the weights are)
        out.index_add_(0, tokens[rows], y.to(out.dtype))
    return out
