"""End-to-end GPU benchmark: a Llama-3.1-8B-shaped model with random bf16 weights built on the device.

    python benchmarks/e2e_gpu.py [--shape llama3.1-8b] [--num-requests 1000] [--hf]

1. Copy bandwidth of the card (a device-to-device copy, read + write bytes over time).
2. Decode step time (``LLMEngine.step`` with every sequence decoding) at batch 1/8/64/256 and
   context 128/1024/4096, against the roofline ``(weight bytes + batch * context * KV bytes per
   token) / bandwidth``; points whose KV does not fit the pool are skipped (and listed).
3. Output tokens/s over ``--num-requests`` requests with ShareGPT-like lengths (mean ~200 in /
   ~180 out, ``pageant.engine.bench.datasets.sharegpt_like_lengths``), ignore_eos.
4. With ``--hf``: the issue 8 comparison on the same GPU. Hugging Face needs a checkpoint, so the
   random model is saved once (transformers ``save_pretrained``) and both sides load it; Pageant and
   ``run_hf`` (static batches ``--hf-batch-sizes``, up to 64) serve the same ``--hf-num-requests``.

No weight files for steps 1-3 (``load_format="dummy"``). Writes JSON + PNG to ``--result-dir`` with
the device, versions and date. On a machine without CUDA it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import platform
import random
import sys
import tempfile
import time

SHAPES = {
    "llama3.1-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
    ),
    "tiny": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
    ),
}
BATCHES = (1, 8, 64, 256)
CONTEXTS = (128, 1024, 4096)


def write_model_dir(path: pathlib.Path, shape: str) -> pathlib.Path:
    """A checkpoint folder without weights: ``config.json`` of ``shape`` and a small tokenizer (only
    used to detokenize; prompts are token ids)."""
    from pageant.engine.testing import build_tokenizer

    path = pathlib.Path(path)
    build_tokenizer(path)
    (path / "config.json").write_text(json.dumps(SHAPES[shape], indent=1))
    return path


def build_engine(model_dir: pathlib.Path, *, device: str = "cuda", dtype: str = "bfloat16",
                 load_format: str = "dummy", **kwargs):
    """``LLMEngine`` over ``model_dir``; with ``load_format="dummy"`` the weights are random,
    made directly on ``device``."""
    from pageant.engine import LLMEngine

    return LLMEngine.from_kwargs(model=str(model_dir), device=device, dtype=dtype, load_format=load_format,
                                 **kwargs)


def weight_bytes(engine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())


def copy_bandwidth(device: str, num_bytes: int = 2**30, repeat: int = 10) -> float:
    """Bytes per second moved by a device-to-device copy (bytes read + bytes written)."""
    import torch

    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * num_bytes * repeat / (start.elapsed_time(end) / 1000)


def _random_ids(n: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(16, vocab) for _ in range(n)]


def decode_max_tokens(engine, batch: int, context: int, num_steps: int) -> int:
    """Output tokens each sequence needs so none finishes before the timed steps end: the earliest
    sequences decode while the last ones are still prefilling (chunked, one token budget a step)."""
    prefill_steps = -(-batch * context // engine.config.max_num_batched_tokens)
    return num_steps + prefill_steps + 8


def decode_step_time(engine, batch: int, context: int, num_steps: int = 20) -> float:
    """Seconds per ``step()`` once ``batch`` sequences of ``context`` tokens are all decoding."""
    from pageant.engine import SamplingParams

    rng = random.Random(batch * 100003 + context)
    params = SamplingParams(temperature=0.0, max_tokens=decode_max_tokens(engine, batch, context, num_steps),
                            ignore_eos=True)
    ids = [f"d{batch}-{context}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, {"prompt_token_ids": _random_ids(context, engine.vocab_size, rng)}, params)
    while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
        engine.step()  # prefill (chunked) until every sequence has its first token
    for _ in range(2):
        engine.step()
    start = time.perf_counter()
    for _ in range(num_steps):
        engine.step()  # step() reads the sampled tokens on the host: a full sync every step
    seconds = (time.perf_counter() - start) / num_steps
    engine.abort_request(ids)
    return seconds


def throughput(engine, requests: list[tuple[list[int], int]]) -> dict:
    """Output tokens/s with every request queued at once (ignore_eos, greedy)."""
    from tqdm import tqdm

    from pageant.engine import SamplingParams

    bar = tqdm(total=sum(o for _, o in requests), desc="pageant throughput", unit="tok")
    start = time.perf_counter()
    for i, (ids, n_out) in enumerate(requests):
        engine.add_request(f"t{i}", {"prompt_token_ids": ids},
                           SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True))
    out_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                out_tokens += len(out.outputs[0].token_ids)
                bar.update(len(out.outputs[0].token_ids))
    seconds = time.perf_counter() - start
    bar.close()
    return {"seconds": seconds, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / seconds,
            "num_requests": len(requests), "prompt_tokens": sum(len(i) for i, _ in requests)}


def sharegpt_requests(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    from pageant.engine.bench.datasets import sharegpt_like_lengths

    rng = random.Random(seed)
    return [(_random_ids(i, vocab, rng), o) for i, o in sharegpt_like_lengths(n, seed=seed)]


def save_hf_checkpoint(model_dir: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """Random weights written once with transformers, so ``run_hf`` and Pageant load the same model."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja":
            shutil.copy(f, out_dir / f.name)
    del model
    torch.cuda.empty_cache()
    return out_dir


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    for context in CONTEXTS:
        rows = [r for r in report["decode"] if r["context"] == context]
        if rows:
            line, = ax.plot([r["batch"] for r in rows], [r["step_ms"] for r in rows], "o-", label=f"context {context}")
            ax.plot([r["batch"] for r in rows], [r["roofline_ms"] for r in rows], "--", color=line.get_color(),
                    label=f"roofline {context}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode batch size")
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"decode step, {report['config']['shape']} bf16")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    bars = {"pageant": report["throughput"]["output_tokens_per_s"]}
    if report.get("hf"):
        bars["pageant (hf set)"] = report["hf"]["pageant"]["output_tokens_per_s"]
        bars.update({r["name"]: r["output_tokens_per_s"] for r in report["hf"]["runs"]})
    ax.bar(list(bars), list(bars.values()))
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput (ShareGPT-like lengths)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=4096 + 256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--hf", action="store_true", help="also compare with Hugging Face generate")
    ap.add_argument("--hf-num-requests", type=int, default=200)
    ap.add_argument("--hf-batch-sizes", default="16,32,64")
    ap.add_argument("--result-dir", default="benchmarks/results")
    ap.add_argument("--label", default=None)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("e2e_gpu.py: no CUDA device here (this benchmark needs a GPU); nothing to do", file=sys.stderr)
        return 2
    import transformers
    import triton

    from pageant.engine.bench.throughput import run_hf, run_pageant

    report: dict = {
        "meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                 "triton": triton.__version__, "transformers": transformers.__version__,
                 "python": platform.python_version(), "host": platform.node()},
        "config": vars(args),
    }
    engine_kwargs = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                         max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                         enforce_eager=args.enforce_eager)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(pathlib.Path(tmp) / "model", args.shape)
        bandwidth = copy_bandwidth("cuda")
        report["copy_bandwidth_gb_s"] = bandwidth / 1e9
        print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
        engine = build_engine(model_dir, **engine_kwargs)
        w_bytes = weight_bytes(engine)
        mc = engine.model_config
        kv_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 2  # bf16
        pool_tokens = engine.config.num_kv_blocks * engine.config.block_size
        report.update(weight_bytes=w_bytes, kv_bytes_per_token=kv_per_token, num_kv_blocks=engine.config.num_kv_blocks,
                      cuda_graphs=engine.runner.graphs is not None)
        print(f"weights {w_bytes / 2**30:.1f} GiB; KV pool {pool_tokens} tokens; "
              f"CUDA graphs: {engine.runner.graphs is not None}")
        report["decode"], report["decode_skipped"] = [], []
        if not args.skip_decode:
            for context in CONTEXTS:
                for batch in BATCHES:
                    longest = context + decode_max_tokens(engine, batch, context, 20)
                    need = batch * longest
                    if batch > args.max_num_seqs or need > pool_tokens or longest > args.max_model_len:
                        report["decode_skipped"].append({"batch": batch, "context": context, "kv_tokens_needed": need})
                        continue
                    step = decode_step_time(engine, batch, context)
                    roof = (w_bytes + batch * context * kv_per_token) / bandwidth
                    report["decode"].append({"batch": batch, "context": context, "step_ms": step * 1e3,
                                             "roofline_ms": roof * 1e3, "fraction_of_roofline": roof / step,
                                             "tokens_per_s": batch / step})
                    print(f"decode batch {batch:4d} context {context:5d}: {step * 1e3:8.2f} ms/step "
                          f"(roofline {roof * 1e3:.2f} ms, {roof / step:.0%})")
        requests = sharegpt_requests(args.num_requests, engine.vocab_size)
        report["throughput"] = throughput(engine, requests)
        print(f"throughput: {report['throughput']['output_tokens_per_s']:.0f} output tok/s "
              f"({args.num_requests} requests)")
        del engine
        torch.cuda.empty_cache()
        if args.hf:
            ckpt = save_hf_checkpoint(model_dir, pathlib.Path(tmp) / "hf")
            subset = requests[: args.hf_num_requests]
            ours = run_pageant(str(ckpt), subset, dtype="bfloat16", device="cuda", max_num_seqs=args.max_num_seqs,
                               max_num_batched_tokens=args.max_num_batched_tokens,
                               max_model_len=args.max_model_len,
                               engine_kwargs={"gpu_memory_utilization": args.gpu_memory_utilization,
                                              "enforce_eager": args.enforce_eager})
            torch.cuda.empty_cache()
            runs = [run_hf(str(ckpt), subset, int(b), dtype="bfloat16", device="cuda", pad_token_id=0)
                    for b in args.hf_batch_sizes.split(",")]
            best = max(runs, key=lambda r: r.output_tokens_per_s)
            report["hf"] = {
                "pageant": {"seconds": ours.seconds, "output_tokens_per_s": ours.output_tokens_per_s, **ours.extra},
                "runs": [{"name": r.name, "seconds": r.seconds, "output_tokens_per_s": r.output_tokens_per_s,
                          **r.extra} for r in runs],
                "best_hf": best.name,
                "ratio_vs_best_hf": ours.output_tokens_per_s / best.output_tokens_per_s,
            }
            print(f"pageant {ours.output_tokens_per_s:.0f} tok/s vs best HF ({best.name}) "
                  f"{best.output_tokens_per_s:.0f} tok/s: {report['hf']['ratio_vs_best_hf']:.2f}x")
    out_dir = pathlib.Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = args.label or f"e2e-gpu-{args.shape}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    (out_dir / f"{label}.json").write_text(json.dumps(report, indent=1))
    plot(report, out_dir / f"{label}.png")
    print(f"saved {out_dir / (label + '.json')} and {out_dir / (label + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
