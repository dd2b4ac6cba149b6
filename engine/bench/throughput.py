"""``pageant bench throughput``: Pageant's engine vs Hugging Face transformers, offline, one process.

Every side runs the same checkpoint on the same prompts (token ids) with the same output lengths
(``ignore_eos``), so they do identical useful work. Baselines (``hf_baselines.py``): ``hf``,
``generate`` over static left-padded batches (each generating as many tokens as its longest
request) at several batch sizes; ``hf-cb``, transformers' own continuous batching (the manager
behind ``generate_batch``). Only the tokens the requests asked for count, on every side.
"""

from __future__ import annotations

import gc
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pageant.engine.bench.hf_baselines import hf_continuous, hf_static

BASELINES = ("hf", "hf-cb", "none")


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
    dtype = getattr(config, "dtype", None) or "float32"  # ``torch_dtype`` is deprecated in transformers 5
    dtype_bytes = 4 if str(dtype).endswith("float32") else 2
    return 2 * config.num_hidden_layers * num_kv_heads * head_dim * dtype_bytes


def run_pageant(model: str, requests: list[tuple[list[int], int]], *, dtype: str, device: str,
                max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                progress: bool = True, engine_kwargs: dict | None = None) -> ThroughputResult:
    """Drive ``LLMEngine`` step by step (as ``LLM.generate`` does: FINAL_ONLY outputs) so the KV
    pool can be sampled."""
    from pageant.engine import LLMEngine, RequestOutputKind, SamplingParams

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
                           SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True,
                                          output_kind=RequestOutputKind.FINAL_ONLY))
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


def count_parameters(model_dir: str | Path) -> int:
    """Parameters stored in a checkpoint's safetensors files (tied weights are stored once)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors file in {model_dir}")
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                total += math.prod(st.get_slice(name).get_shape())
    return total


def _load_hf(model: str, dtype: str, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()


def run_hf(model: str, requests: list[tuple[list[int], int]], batch_size: int, *, dtype: str,
           device: str, pad_token_id: int, progress: bool = True) -> ThroughputResult:
    """Hugging Face ``generate`` over static, left-padded batches of ``batch_size`` in arrival order."""
    hf = _load_hf(model, dtype, device)
    num_parameters = sum(p.numel() for p in hf.parameters())
    hf_static(hf, [(requests[0][0][:8], 2)], 1, pad_token_id=pad_token_id)  # warm-up
    r = hf_static(hf, requests, batch_size, pad_token_id=pad_token_id, progress=progress)
    del hf
    gc.collect()
    return ThroughputResult(f"hf_batch{batch_size}", r["seconds"], r["output_tokens"], r["prompt_tokens"],
                            extra={"batch_size": batch_size, "peak_kv_tokens": r["peak_kv_tokens"],
                                   "num_parameters": num_parameters})


def run_hf_cb(model: str, requests: list[tuple[list[int], int]], *, dtype: str, device: str,
              progress: bool = True, **sizes) -> ThroughputResult:
    """transformers' continuous batching (``hf_continuous``; ``sizes`` as ``cb_sizes``), warm-up untimed."""
    hf = _load_hf(model, dtype, device)
    r = hf_continuous(hf, requests, progress=progress, **sizes)
    del hf
    gc.collect()
    keys = ("cb_config", "attn_implementation", "expected_tokens", "exact_lengths", "length_mismatches",
            "complete", "errors", "warmup_s", "cuda_graph_warmup")
    return ThroughputResult("hf_cb", r["seconds"], r["output_tokens"], r["prompt_tokens"],
                            extra={k: r[k] for k in keys})


def kv_memory_report(config, pageant: ThroughputResult, hf_best: ThroughputResult | None,
                     max_model_len: int, hf_cb: ThroughputResult | None = None) -> dict:
    """KV memory, in MiB: what Pageant's pool really used at its peak, what it allocated, what a
    contiguous max-length allocation per request would need for the same concurrency, the peak of
    Hugging Face's padded static batches and the pool transformers' continuous batching allocated."""
    bpt = kv_bytes_per_token(config)
    mib = 1024 * 1024
    e = pageant.extra
    out = {
        "bytes_per_token": bpt,
        "pageant_used_peak_mib": e["peak_used_kv_blocks"] * e["block_size"] * bpt / mib,
        "pageant_pool_allocated_mib": e["num_kv_blocks"] * e["block_size"] * bpt / mib,
        "contiguous_max_len_same_concurrency_mib": e["peak_running_requests"] * max_model_len * bpt / mib,
    }
    if hf_best is not None:
        out["hf_padded_static_batch_peak_mib"] = hf_best.extra["peak_kv_tokens"] * bpt / mib
    if hf_cb is not None:
        c = hf_cb.extra["cb_config"]
        if "num_blocks" in c and "block_size" in c:
            out["hf_cb_pool_allocated_mib"] = c["num_blocks"] * c["block_size"] * bpt / mib
    return out


def _side(r: ThroughputResult) -> dict:
    return {"name": r.name, "seconds": r.seconds, "output_tokens": r.output_tokens,
            "prompt_tokens": r.prompt_tokens, "output_tokens_per_s": r.output_tokens_per_s, **r.extra}


def build_report(pageant: ThroughputResult, hf: list[ThroughputResult], hf_cb: ThroughputResult | None,
                 *, config, max_model_len: int, num_parameters: int, baselines: list[str], meta: dict,
                 run_config: dict) -> dict:
    """The JSON document: every side, the ratios (``None`` for a baseline not run) and KV memory."""
    best = max(hf, key=lambda r: r.output_tokens_per_s) if hf else None
    return {
        "meta": meta, "config": run_config, "num_parameters": num_parameters, "baselines": baselines,
        "pageant": _side(pageant),
        "hf": [_side(r) for r in hf],
        "hf_cb": _side(hf_cb) if hf_cb else None,
        "best_hf": best.name if best else None,
        "ratio_vs_best_hf": pageant.output_tokens_per_s / best.output_tokens_per_s if best else None,
        "ratio_vs_hf_cb": pageant.output_tokens_per_s / hf_cb.output_tokens_per_s if hf_cb else None,
        "kv_memory_mib": kv_memory_report(config, pageant, best, max_model_len, hf_cb),
    }


def format_report(report: dict) -> str:
    """The printed table: output tok/s of every side and Pageant's ratio to it, then the ratios."""
    p = report["pageant"]
    rows = [("pageant", p)] + [(f"hf generate, batch {h['batch_size']}", h) for h in report["hf"]]
    if report["hf_cb"]:
        rows.append(("hf continuous batching", report["hf_cb"]))
    lines = [f"model: {report['num_parameters'] / 1e6:.1f}M parameters; {p['output_tokens']} output tokens, "
             f"{p['prompt_tokens']} prompt tokens",
             f"{'side':<26}{'output tok/s':>14}{'seconds':>10}{'tokens':>9}{'pageant / side':>16}"]
    for name, s in rows:
        ratio = "" if s is p else f"{p['output_tokens_per_s'] / s['output_tokens_per_s']:.2f}x"
        lines.append(f"{name:<26}{s['output_tokens_per_s']:>14.1f}{s['seconds']:>10.1f}{s['output_tokens']:>9}"
                     f"{ratio:>16}")
    if report["best_hf"]:
        lines.append(f"ratio pageant / best HF static ({report['best_hf']}): {report['ratio_vs_best_hf']:.2f}x")
    if report["hf_cb"]:
        lines.append(f"ratio pageant / HF continuous batching: {report['ratio_vs_hf_cb']:.2f}x")
    for k, v in report["kv_memory_mib"].items():
        lines.append(f"  {k}: {v:.2f}" if isinstance(v, float) else f"  {k}: {v}")
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> Path:
    """Bars: output tokens/s of Pageant, each HF static batch size and HF continuous batching; KV memory."""
    from pageant.engine.bench.plots import _plt

    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    sides = [report["pageant"]] + report["hf"] + ([report["hf_cb"]] if report["hf_cb"] else [])
    colors = ["tab:green"] + ["tab:gray"] * len(report["hf"]) + (["tab:blue"] if report["hf_cb"] else [])
    ax1.bar([s["name"] for s in sides], [s["output_tokens_per_s"] for s in sides], color=colors)
    ax1.set_ylabel("output tokens/s")
    title = [f"{report['ratio_vs_best_hf']:.2f}x best HF static"] if report["best_hf"] else []
    title += [f"{report['ratio_vs_hf_cb']:.2f}x HF CB"] if report["hf_cb"] else []
    ax1.set_title("Pageant vs Hugging Face" + (": " + ", ".join(title) if title else ""))
    ax1.tick_params(axis="x", rotation=30)
    kv = report["kv_memory_mib"]
    names = {"pageant_used_peak_mib": "pageant used (peak)", "pageant_pool_allocated_mib": "pageant pool",
             "contiguous_max_len_same_concurrency_mib": "contiguous max-len",
             "hf_padded_static_batch_peak_mib": "HF padded (peak)", "hf_cb_pool_allocated_mib": "HF CB pool"}
    keys = [k for k in names if k in kv]
    ax2.bar([names[k] for k in keys], [kv[k] for k in keys])
    ax2.set_ylabel("KV cache MiB")
    ax2.set_title("KV memory")
    ax2.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
