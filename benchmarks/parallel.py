"""Tensor parallelism on the CPU: TP=2 (two ranks, gloo, one torch thread each) against TP=1 on the
same two cores (two threads), and TP=1 on one thread, on the same requests, interleaved.

An honest overhead figure, not a speed-up claim: on one machine the two ranks share its memory
bandwidth and pay two all-reduces per layer (attention and MLP) through gloo's TCP loopback, plus the
step's broadcast. Wall-clock throughput is reported (the work happens in several processes), and CPU
seconds of every process of the run (this one and its workers), per output token.

A GPU figure needs two GPUs in one machine; this project's GPU machine has one, so there is none.

Writes ``benchmarks/results/parallel-cpu-<utc time>.json`` and a PNG bar chart beside it.

    python benchmarks/parallel.py            # a few minutes on 2 cores
    python benchmarks/parallel.py --quick    # smaller model and batch
"""

from __future__ import annotations

import pathlib
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    from pageant.engine.bench.scripts import add_workload_args, base_parser

    p = base_parser(__doc__, hidden=512, layers=8, out_default=ROOT / "benchmarks" / "results")
    add_workload_args(p, num_prompts=32)
    p.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, 8 prompts, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.num_prompts, args.repeats = 256, 2, 8, 2
    return args


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    import psutil

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def plot(result: dict, path: pathlib.Path) -> None:
    from pageant.engine.bench.scripts import annotated_bars, figure

    names = list(result["runs"])
    runs = result["runs"]
    tps = [runs[n]["tokens_per_s"] for n in names]
    with figure(path, figsize=(6.5, 4)) as (fig, ax):
        annotated_bars(ax, names, tps, [f"{result['ratio_to_tp1'][n]:.2f}x\n{runs[n]['cpu_ms_per_token']:.1f} "
                                        "CPU-ms/token" for n in names], ["#777", "#3a7", "#aaa"][: len(names)], fontsize=8)
        s = result["settings"]
        ax.set_ylabel("output tokens / s (wall clock)")
        ax.set_title(f"tensor parallel on the CPU (gloo): {result['device']}\nhidden {s['hidden']}, {s['layers']} "
                     f"layers, {s['num_prompts']} prompts x {s['output_len']} tokens", fontsize=9)
        ax.set_ylim(0, max(tps) * 1.35)


def main(argv=None) -> int:
    args = parse_args(argv)
    import os

    import torch
    from tqdm.auto import tqdm

    from pageant.engine import LLM
    from pageant.engine.bench.scripts import greedy_workload, result_header, save_result, small_llama, warm_up

    with tempfile.TemporaryDirectory() as tmp:
        path = small_llama(pathlib.Path(tmp) / "llama", args.hidden, args.layers, max_position_embeddings=1024)
        prompts, sp = greedy_workload(args)
        kw = dict(max_num_seqs=args.num_prompts, max_model_len=1024,
                  max_num_batched_tokens=max(2048, args.num_prompts * args.prompt_len))
        # name: (engine, torch threads of this process while it runs)
        configs = {"tp1 (2 threads)": (LLM(model=path, **kw), 2), "tp2 (2 ranks x 1 thread)":
                   (LLM(model=path, tensor_parallel_size=2, **kw), 1), "tp1 (1 thread)": (None, 1)}
        configs["tp1 (1 thread)"] = (configs["tp1 (2 threads)"][0], 1)
        outputs = {}
        wall: dict[str, list[float]] = {n: [] for n in configs}
        cpu: dict[str, list[float]] = {n: [] for n in configs}
        tokens: dict[str, int] = {}
        for name, (llm, threads) in configs.items():  # warm-up
            torch.set_num_threads(threads)
            warm_up(llm, prompts)
        for _ in tqdm(range(args.repeats), desc="rounds"):
            for name, (llm, threads) in configs.items():
                torch.set_num_threads(threads)
                runner = llm.engine.runner
                pids = [os.getpid()] + [p.pid for p in getattr(runner, "procs", [])]
                c0, t0 = cpu_seconds(pids), time.perf_counter()
                outs = llm.generate(prompts, sp, use_tqdm=False)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(cpu_seconds(pids) - c0)
                tokens[name] = sum(len(o.outputs[0].token_ids) for o in outs)
                outputs[name] = [o.outputs[0].token_ids for o in outs]
        same = all(outputs[n] == outputs["tp1 (2 threads)"] for n in outputs)
        configs["tp2 (2 ranks x 1 thread)"][0].shutdown()
    runs = {n: {"output_tokens": tokens[n], "tokens_per_s": tokens[n] / min(wall[n]),
                "cpu_ms_per_token": 1000 * min(cpu[n]) / tokens[n], "wall_seconds": wall[n], "cpu_seconds": cpu[n]}
            for n in configs}
    result = result_header("parallel", args)
    result["timing"] = "wall"
    result["runs"] = runs
    base = runs["tp1 (2 threads)"]["tokens_per_s"]
    result["ratio_to_tp1"] = {n: r["tokens_per_s"] / base for n, r in runs.items()}
    result["greedy_outputs_identical"] = same
    for n, r in runs.items():
        print(f"{n:>26}: {r['tokens_per_s']:8.1f} output tokens/s ({result['ratio_to_tp1'][n]:.2f}x), "
              f"{r['cpu_ms_per_token']:.2f} CPU-ms per token (all processes)")
    path = save_result(result, args.out, "parallel", args.device, lambda png: plot(result, png))
    print(f"greedy outputs identical across runs: {same}; wrote {path} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
