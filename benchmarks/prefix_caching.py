"""Automatic prefix caching: throughput and TTFT with and without it on a shared-prefix workload.

Builds a small random Llama checkpoint and a ``prefix`` workload (``pageant.engine.bench.datasets``:
every request starts with one of ``--num-prefixes`` shared system prompts of ``--prefix-len``
tokens, then its own ``--suffix-len`` tokens), and runs the engine on it with
``enable_prefix_caching`` off and on, side by side (settings interleaved in every round, a fresh
engine, i.e. a cold cache, for every run; greedy, ``ignore_eos``):

- ``burst``: every request arrives at once; output throughput, total (prompt + output) token
  throughput, and the TTFT distribution (first token time minus arrival) over the requests;
- ``sequential``: one request at a time; TTFT of each alone (its prefill latency). After the first
  request of each system prompt, caching computes only the suffix.

On the CPU (1 torch thread by default) throughput is tokens per CPU-second of this process, robust
to other processes sharing the machine (wall-clock figures are kept too); TTFT is wall-clock.
The greedy outputs of both settings are checked to be identical.

Writes ``benchmarks/results/prefix-caching-<device>-<utc time>.json`` and a PNG beside it.

    python benchmarks/prefix_caching.py             # CPU, a few minutes on 2 cores
    python benchmarks/prefix_caching.py --quick     # smaller model, fewer requests
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = {"caching off": False, "caching on": True}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--suffix-len", default="16:64", help="MIN:MAX own tokens after the shared prefix")
    p.add_argument("--output-len", default="16:32", help="MIN:MAX output tokens")
    p.add_argument("--num-sequential", type=int, default=12, help="requests in the one-at-a-time TTFT run")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs are timed in CPU seconds)")
    p.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, 16 prompts, 1 round")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.num_prompts, args.num_sequential, args.repeats = 256, 2, 16, 8, 1
    return args


def make_engine(model: str, caching: bool, args):
    from pageant.engine import LLMEngine, SamplingParams

    engine = LLMEngine.from_kwargs(
        model=model, device=args.device, enable_prefix_caching=caching, block_size=args.block_size,
        max_num_seqs=max(args.num_prompts, 1), max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=1024,
    )
    engine.add_request("warmup", {"prompt_token_ids": [1, 5, 6, 7, 8]}, SamplingParams(temperature=0, max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    return engine


def run_burst(engine, requests) -> dict:
    """Every request at once; (wall s, CPU s, tokens, TTFTs, outputs, cache stats)."""
    from pageant.engine import SamplingParams

    before = engine.stats()
    t0, c0 = time.perf_counter(), time.process_time()
    for i, r in enumerate(requests):
        engine.add_request(f"b{i}", {"prompt_token_ids": r.prompt},
                           SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    outs = [finished[f"b{i}"] for i in range(len(requests))]
    after = engine.stats()
    return {
        "wall_seconds": wall, "cpu_seconds": cpu,
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "prompt_tokens": sum(r.prompt_len for r in requests),
        "ttft_s": [o.metrics.first_token_time - o.metrics.arrival_time for o in outs],
        "queries": after["prefix_cache_queries"] - before["prefix_cache_queries"],
        "hits": after["prefix_cache_hits"] - before["prefix_cache_hits"],
        "outputs": [o.outputs[0].token_ids for o in outs],
    }


def run_sequential(engine, requests) -> list[float]:
    """One request at a time; the TTFT of each (wall seconds from add to its first token)."""
    from pageant.engine import SamplingParams

    ttfts = []
    for i, r in enumerate(requests):
        t0 = time.perf_counter()
        engine.add_request(f"s{i}", {"prompt_token_ids": r.prompt}, SamplingParams(temperature=0, max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        ttfts.append(time.perf_counter() - t0)
    return ttfts


def summary(values: list[float]) -> dict:
    v = sorted(values)
    return {"mean": statistics.fmean(v), "p50": v[len(v) // 2], "p90": v[min(len(v) - 1, int(len(v) * 0.9))]}


def plot(result: dict, burst_ttfts: dict, path: pathlib.Path) -> None:
    from pageant.engine.bench.scripts import annotated_bars, figure, throughput_label

    names = list(result["runs"])
    colors = ["#777", "#3a7"]
    with figure(path, 1, 3, figsize=(15, 4)) as (fig, axes):
        tps = [result["runs"][n]["total_tokens_per_s"] for n in names]
        annotated_bars(axes[0], names, tps, [f"{result['runs'][n]['total_tokens_per_s'] / tps[0]:.2f}x" for n in names],
                       colors)
        axes[0].set_ylabel(throughput_label(result["timing"], "prompt + output tokens"))
        axes[0].set_title("burst throughput")
        for n, c in zip(names, colors):
            v = sorted(t * 1000 for t in burst_ttfts[n])
            axes[1].plot(v, [(i + 1) / len(v) for i in range(len(v))], color=c, label=n)
        axes[1].set_xlabel("TTFT (ms)")
        axes[1].set_ylabel("fraction of requests")
        axes[1].set_title("burst TTFT (all requests at once)")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
        seq = [result["runs"][n]["sequential_ttft_ms"]["p50"] for n in names]
        annotated_bars(axes[2], names, seq, [f"{s:.1f} ms" for s in seq], colors)
        axes[2].set_ylabel("median TTFT (ms)")
        axes[2].set_title("one request at a time")
        s = result["settings"]
        fig.suptitle(f"prefix caching, {result['device']}: hidden {s['hidden']}, {s['layers']} layers, "
                     f"{s['num_prompts']} prompts over {s['num_prefixes']} shared {s['prefix_len']}-token prefixes",
                     fontsize=9)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from pageant.engine.bench.datasets import parse_range, prefix_requests
    from pageant.engine.bench.scripts import is_cuda, result_header, save_result, setup_device, small_llama
    from pageant.engine.tokenizer import Tokenizer

    cpu_only = not is_cuda(args.device)
    setup_device(args.device, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = small_llama(pathlib.Path(tmp) / "base", args.hidden, args.layers, max_position_embeddings=1024)
        tokenizer = Tokenizer(model)
        requests = prefix_requests(args.num_prompts, args.prefix_len, args.num_prefixes, parse_range(args.suffix_len),
                                   parse_range(args.output_len), seed=0, tokenizer=tokenizer)
        sequential = prefix_requests(args.num_sequential, args.prefix_len, args.num_prefixes,
                                     parse_range(args.suffix_len), (1, 1), seed=1, tokenizer=tokenizer)
        bursts: dict[str, list[dict]] = {n: [] for n in SETTINGS}
        seq_ttfts: dict[str, list[float]] = {n: [] for n in SETTINGS}
        for _ in tqdm(range(args.repeats), desc="rounds"):
            for name, caching in SETTINGS.items():  # interleaved: load drift hits both alike
                bursts[name].append(run_burst(make_engine(model, caching, args), requests))
                seq_ttfts[name] += run_sequential(make_engine(model, caching, args), sequential)
    off, on = (bursts[n][0]["outputs"] for n in SETTINGS)
    if off != on:
        raise SystemExit("greedy outputs differ with and without prefix caching")
    runs = {}
    for name, rs in bursts.items():
        best = min(rs, key=lambda r: r["cpu_seconds"] if cpu_only else r["wall_seconds"])
        secs = best["cpu_seconds"] if cpu_only else best["wall_seconds"]
        tokens = best["output_tokens"] + best["prompt_tokens"]
        runs[name] = {
            "wall_seconds": [r["wall_seconds"] for r in rs], "cpu_seconds": [r["cpu_seconds"] for r in rs],
            "output_tokens": best["output_tokens"], "prompt_tokens": best["prompt_tokens"],
            "output_tokens_per_s": best["output_tokens"] / secs, "total_tokens_per_s": tokens / secs,
            "wall_total_tokens_per_s": tokens / min(r["wall_seconds"] for r in rs),
            "burst_ttft_ms": {k: v * 1000 for k, v in summary([t for r in rs for t in r["ttft_s"]]).items()},
            "sequential_ttft_ms": {k: v * 1000 for k, v in summary(seq_ttfts[name]).items()},
            "prefix_cache_queries": best["queries"], "prefix_cache_hits": best["hits"],
            "hit_rate": best["hits"] / best["queries"] if best["queries"] else 0.0,
        }
    a, b = runs["caching off"], runs["caching on"]
    result = result_header("prefix_caching", args)
    result["runs"] = runs
    result["ratio_on_to_off"] = {
        "total_tokens_per_s": b["total_tokens_per_s"] / a["total_tokens_per_s"],
        "output_tokens_per_s": b["output_tokens_per_s"] / a["output_tokens_per_s"],
        "burst_ttft_mean": b["burst_ttft_ms"]["mean"] / a["burst_ttft_ms"]["mean"],
        "sequential_ttft_p50": b["sequential_ttft_ms"]["p50"] / a["sequential_ttft_ms"]["p50"],
    }
    result["outputs_identical"] = True
    burst_ttfts = {n: [t for r in rs for t in r["ttft_s"]] for n, rs in bursts.items()}
    path = save_result(result, args.out, "prefix-caching", args.device, lambda png: plot(result, burst_ttfts, png))
    for name, r in runs.items():
        print(f"{name:>12}: {r['total_tokens_per_s']:8.1f} tokens/s, {r['output_tokens_per_s']:7.1f} output tokens/s, "
              f"burst TTFT mean {r['burst_ttft_ms']['mean']:7.1f} ms, sequential TTFT p50 "
              f"{r['sequential_ttft_ms']['p50']:6.1f} ms, hit rate {r['hit_rate']:.2f}")
    for k, v in result["ratio_on_to_off"].items():
        print(f"on/off {k}: {v:.3f}")
    print(f"wrote {path} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
