"""Hugging Face transformers baselines for the offline throughput benchmarks.

Shared by ``pageant bench throughput`` (``engine/bench/throughput.py``) and ``benchmarks/gpu_check.py``:

- ``hf_static``: ``generate`` over static, left-padded batches in arrival order; every batch runs as
  many steps as its longest request, and only the tokens each request asked for are counted.
- ``hf_continuous``: transformers' own continuous batching, the ``ContinuousBatchingManager`` behind
  ``generate_batch`` (paged KV cache, ``paged|<attn>`` attention), with each request's own
  ``max_new_tokens`` and no EOS (``eos_token_id=-1``), counting the tokens it really generated.

Requests are ``(prompt token ids, output length)`` pairs. Only torch 2.11 / transformers 5.17-era
APIs are used (the GPU image's versions); CUDA-only steps (graph capture) run only on CUDA.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

Request = tuple[list[int], int]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_requests(requests: list[Request]) -> None:
    if not requests:
        raise ValueError("requests must not be empty")
    for i, (ids, n) in enumerate(requests):
        if not ids or n < 1:
            raise ValueError(f"request {i} needs a non-empty prompt and an output length >= 1 (got "
                             f"{len(ids)} prompt tokens, output length {n})")


def hf_static(model, requests: list[Request], batch_size: int, *, pad_token_id: int = 0,
              progress: bool = False) -> dict:
    """transformers ``generate`` over static left-padded batches of ``batch_size`` in arrival order.

    Each batch generates exactly as many tokens as its longest request (``min_new_tokens`` =
    ``max_new_tokens``, checked); ``output_tokens`` counts only the tokens the requests asked for.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_requests(requests)
    device = model.device
    bar = tqdm(total=sum(n for _, n in requests), desc=f"hf batch={batch_size}", unit="tok",
               disable=not progress)
    _sync(device)
    start, peak_kv = time.perf_counter(), 0
    for b in range(0, len(requests), batch_size):
        batch = requests[b:b + batch_size]
        max_in, max_out = max(len(ids) for ids, _ in batch), max(n for _, n in batch)
        peak_kv = max(peak_kv, len(batch) * (max_in + max_out))
        input_ids = torch.full((len(batch), max_in), pad_token_id, dtype=torch.long)  # [batch, max_in]
        attention_mask = torch.zeros((len(batch), max_in), dtype=torch.long)  # [batch, max_in]
        for row, (ids, _) in enumerate(batch):  # left padding
            input_ids[row, max_in - len(ids):] = torch.tensor(ids)
            attention_mask[row, max_in - len(ids):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids.to(device), attention_mask=attention_mask.to(device),
                                 max_new_tokens=max_out, min_new_tokens=max_out, do_sample=False,
                                 pad_token_id=pad_token_id)  # [batch, max_in + max_out]
        if out.shape[1] - max_in != max_out:
            raise RuntimeError(f"HF generate made {out.shape[1] - max_in} new tokens for a batch that asked "
                               f"for {max_out}")
        bar.update(sum(n for _, n in batch))
    _sync(device)
    seconds = time.perf_counter() - start
    bar.close()
    tokens = sum(n for _, n in requests)
    return {"batch_size": batch_size, "seconds": seconds, "output_tokens": tokens,
            "output_tokens_per_s": tokens / seconds if seconds else 0.0,
            "prompt_tokens": sum(len(ids) for ids, _ in requests), "peak_kv_tokens": peak_kv}


def cb_sizes(requests: list[Request], *, device: str | torch.device, block_size: int | None = None,
             num_blocks: int | None = None, max_batch_tokens: int | None = None,
             max_requests_per_batch: int | None = None) -> dict:
    """The ``ContinuousBatchingConfig`` sizes to use: the given ones; off CUDA, where transformers
    would size the cache from free memory (most of the host's RAM), also a block size of 16, enough
    blocks to hold every request at its full length at once (plus a warm-up request), and 2048
    tokens per batch. On CUDA what is not given is left to transformers."""
    sizes = {"block_size": block_size, "num_blocks": num_blocks, "max_batch_tokens": max_batch_tokens,
             "max_requests_per_batch": max_requests_per_batch}
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if torch.device(device).type != "cuda":
        bs = sizes["block_size"] = block_size or 16
        if num_blocks is None:
            sizes["num_blocks"] = sum(math.ceil((len(ids) + n) / bs) for ids, n in requests) + 1
        sizes["max_batch_tokens"] = max_batch_tokens or 2048
    return {k: v for k, v in sizes.items() if v is not None}


def _wait_for(manager, request_id: str, end: float) -> None:
    while time.monotonic() < end:
        r = manager.get_result(timeout=1)
        if r is not None and r.request_id == request_id and r.is_finished():
            if r.error:
                raise RuntimeError(f"HF continuous batching warm-up failed: {r.error}")
            return
        if r is None and not manager.is_running():
            raise RuntimeError("HF continuous batching: the generation thread stopped during the warm-up")
    raise RuntimeError("HF continuous batching: the warm-up request did not finish in the time limit")


def hf_continuous(model, requests: list[Request], *, time_limit: float | None = None, warmup: bool = True,
                  progress: bool = False, keep_tokens: bool = False, **sizes) -> dict:
    """transformers' continuous batching over ``requests``, all queued at once in arrival order.

    ``sizes`` (``block_size``, ``num_blocks``, ``max_batch_tokens``, ``max_requests_per_batch``) go
    through ``cb_sizes``. Untimed warm-up: on CUDA ``manager.warmup()`` (graph capture), then one
    short request. ``output_tokens`` counts the tokens the manager generated (``generated_tokens``);
    ``exact_lengths`` says whether every request got exactly its ``max_new_tokens``. Stops
    ``time_limit`` seconds after the call, warm-up included (``complete`` is then false).
    ``keep_tokens`` adds every request's generated token ids (``tokens``).
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    _check_requests(requests)
    end = time.monotonic() + (time_limit if time_limit is not None else float("inf"))
    on_cuda = model.device.type == "cuda"
    sizes = cb_sizes(requests, device=model.device, **sizes)
    res = {"has_generate_batch": hasattr(model, "generate_batch"), "num_requests": len(requests),
           "cb_config": sizes, "expected_tokens": sum(n for _, n in requests)}
    gen = GenerationConfig(max_new_tokens=max(n for _, n in requests), do_sample=False, eos_token_id=-1,
                           pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen,
                                             continuous_batching_config=ContinuousBatchingConfig(**sizes))
    start = time.perf_counter()
    res["has_warmup"] = hasattr(manager, "warmup")
    res["cuda_graph_warmup"] = bool(res["has_warmup"] and on_cuda and not getattr(manager, "warmed_up", True))
    if res["cuda_graph_warmup"]:
        manager.warmup()  # CUDA graphs at the largest sizes (generate_batch's default); CUDA only
    manager.start()
    lengths: dict[int, int] = {}
    tokens_by_request: dict[int, list[int]] = {}
    errors: list[str] = []
    bar = tqdm(total=res["expected_tokens"], desc="hf continuous batching", unit="tok", disable=not progress)
    try:
        if warmup:
            manager.add_request(requests[0][0][:8], request_id="cb-warmup", max_new_tokens=2, eos_token_id=-1)
            _wait_for(manager, "cb-warmup", min(end, time.monotonic() + 600.0))
        res["warmup_s"] = time.perf_counter() - start
        res["attn_implementation"] = model.config._attn_implementation  # paged|... once the manager runs
        _sync(model.device)
        start = time.perf_counter()
        for i, (ids, n) in enumerate(requests):
            manager.add_request(ids, request_id=f"cb{i}", max_new_tokens=n, eos_token_id=-1)
        while len(lengths) < len(requests) and time.monotonic() < end:
            r = manager.get_result(timeout=1)
            if r is None:
                if not manager.is_running():
                    errors.append("the generation thread stopped")
                    break
                continue
            if r.is_finished() and r.request_id.startswith("cb") and r.request_id[2:].isdigit():
                i = int(r.request_id[2:])
                lengths[i] = len(r.generated_tokens)
                bar.update(lengths[i])
                if keep_tokens:
                    tokens_by_request[i] = list(r.generated_tokens)
                if r.error:
                    errors.append(str(r.error)[:200])
        _sync(model.device)
    finally:
        seconds = time.perf_counter() - start
        bar.close()
        manager.stop(block=True, timeout=10, hard_stop=len(lengths) < len(requests))
        if hasattr(manager, "destroy"):
            manager.destroy()
    tokens = sum(lengths.values())
    mismatches = [{"request": i, "max_new_tokens": requests[i][1], "generated": n}
                  for i, n in sorted(lengths.items()) if n != requests[i][1]]
    res.update(finished=len(lengths), complete=len(lengths) == len(requests), seconds=seconds,
               output_tokens=tokens, output_tokens_per_s=tokens / seconds if seconds else 0.0,
               prompt_tokens=sum(len(ids) for ids, _ in requests), errors=errors[:5],
               exact_lengths=not mismatches and len(lengths) == len(requests), length_mismatches=mismatches[:5])
    if keep_tokens:
        res["tokens"] = [tokens_by_request.get(i) for i in range(len(requests))]
    return res
