"""``pageant bench throughput``: Pageant's engine vs Hugging Face ``generate``, offline, one process.

Both run the same checkpoint on the same prompts (token ids) with the same output lengths
(``ignore_eos``), so they do identical useful work. The Hugging Face baseline uses static batches,
left-padded, each generating as many tokens as its longest request, at the best of several batch
sizes; only the requested tokens count towards its throughput, as for Pageant.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm


@dataclass
class ThroughputResult:
    """One side's figures; ``output_tokens`` counts only the tokens the requests asked for."""

    name: str
    seconds: float
    output_tokens: int
    prompt_tokens: int
    extra: dict = field(default_factory=dict)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


def make_requests(num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
                  vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """Random token-id prompts (avoiding the first 16 ids, where special tokens live) and output lengths."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_prompts):
        n_in = rng.randint(*input_len)
        reqs.append(([rng.randrange(16, vocab_size) for _ in range(n_in)], rng.randint(*output_len)))
    return reqs


def kv_bytes_per_token(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dtype_bytes = 4 if str(getattr(config, "torch_dtype", "float32")).endswith("float32") else 2
    return 2 * config.num_hidden_layers * num_kv_heads * head_dim * dtype_bytes


def run_pageant(model: str, requests: list[tuple[list[int], int]], *, dtype: str, device: str,
                max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                progress: bool = True, engine_kwargs: dict | None = None) -> ThroughputResult:
    """Drive ``LLMEngine`` step by step (as ``LLM.generate`` does) so the KV pool can be sampled."""
    from pageant.engine import LLMEngine, SamplingParams

    engine = LLMEngine.from_kwargs(
        model=model, dtype=dtype, device=device, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
        **(engine_kwargs or {}),
    )
    # warm-up: one short request through prefill and decode
    engine.add_request("warmup", {"prompt_token_ids": requests[0][0][:8]},
                       SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    total_blocks = engine.stats()["num_kv_blocks"]
    min_free, peak_running, out_tokens = total_blocks, 0, 0
    bar = tqdm(total=sum(o for _, o in requests), desc="pageant", unit="tok", disable=not progress)
    start = time.perf_counter()
    for i, (ids, n_out) in enumerate(requests):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids},
                           SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True))
    while engine.has_unfinished_requests():
        outputs = engine.step()
        stats = engine.stats()
        min_free = min(min_free, stats["num_free_kv_blocks"])
        peak_running = max(peak_running, stats["num_requests_running"])
        for out in outputs:
            if out.finished:
                n = len(out.outputs[0].token_ids)
                out_tokens += n
                bar.update(n)
    seconds = time.perf_counter() - start
    bar.close()
    stats = engine.stats()
    block_size = stats.get("block_size", 16)
    result = ThroughputResult(
        "pageant", seconds, out_tokens, sum(len(ids) for ids, _ in requests),
        extra={
            "num_kv_blocks": total_blocks,
            "peak_used_kv_blocks": total_blocks - min_free,
            "block_size": block_size,
            "peak_running_requests": peak_running,
            "num_preemptions": stats.get("num_preemptions", 0),
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
        },
    )
    del engine
    gc.collect()
    return result


def run_hf(model: str, requests: list[tuple[list[int], int]], batch_size: int, *, dtype: str,
           device: str, pad_token_id: int, progress: bool = True) -> ThroughputResult:
    """Hugging Face ``generate`` over static, left-padded batches of ``batch_size`` in arrival order."""
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device).eval()
    num_parameters = sum(p.numel() for p in hf.parameters())
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    # warm-up
    with torch.inference_mode():
        hf.generate(torch.tensor([requests[0][0][:8]], device=device), max_new_tokens=2,
                    min_new_tokens=2, do_sample=False, pad_token_id=pad_token_id)
    bar = tqdm(total=sum(o for _, o in requests), desc=f"hf batch={batch_size}", unit="tok",
               disable=not progress)
    peak_kv_tokens = 0
    start = time.perf_counter()
    for batch in batches:
        max_in = max(len(ids) for ids, _ in batch)
        max_out = max(o for _, o in batch)
        peak_kv_tokens = max(peak_kv_tokens, len(batch) * (max_in + max_out))
        input_ids = torch.full((len(batch), max_in), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), max_in), dtype=torch.long)
        for row, (ids, _) in enumerate(batch):  # left padding
            input_ids[row, max_in - len(ids):] = torch.tensor(ids)
            attention_mask[row, max_in - len(ids):] = 1
        with torch.inference_mode():
            hf.generate(input_ids.to(device), attention_mask=attention_mask.to(device),
                        max_new_tokens=max_out, min_new_tokens=max_out, do_sample=False,
                        pad_token_id=pad_token_id)
        bar.update(sum(o for _, o in batch))
    seconds = time.perf_counter() - start
    bar.close()
    del hf
    gc.collect()
    return ThroughputResult(
        f"hf_batch{batch_size}", seconds, sum(o for _, o in requests),
        sum(len(ids) for ids, _ in requests),
        extra={"batch_size": batch_size, "peak_kv_tokens": peak_kv_tokens, "num_parameters": num_parameters},
    )


def kv_memory_report(config, pageant: ThroughputResult, hf_best: ThroughputResult,
                     max_model_len: int) -> dict:
    """KV memory, in MiB: what Pageant's pool really used at its peak, what it allocated, what a
    contiguous max-length allocation per request would need for the same concurrency, and the peak of
    Hugging Face's padded static batches."""
    bpt = kv_bytes_per_token(config)
    mib = 1024 * 1024
    e = pageant.extra
    return {
        "bytes_per_token": bpt,
        "pageant_used_peak_mib": e["peak_used_kv_blocks"] * e["block_size"] * bpt / mib,
        "pageant_pool_allocated_mib": e["num_kv_blocks"] * e["block_size"] * bpt / mib,
        "contiguous_max_len_same_concurrency_mib": e["peak_running_requests"] * max_model_len * bpt / mib,
        "hf_padded_static_batch_peak_mib": hf_best.extra["peak_kv_tokens"] * bpt / mib,
    }
