"""Multi-LoRA throughput: one batch spread over 4 adapters vs the same batch on the base model.

Builds a small random Llama checkpoint and four random PEFT-format adapters (rank 16 by default, on
all seven projections; different ranks per adapter), then times ``LLM.generate`` on the same
prompts in these settings (greedy, ``ignore_eos``, the best of ``--repeats`` rounds, settings
interleaved in every round):

- ``base``: LoRA disabled;
- ``base, lora on``: LoRA enabled, every request on the base model (the wrapper's overhead);
- ``1 adapter``: every request on one adapter;
- ``4 adapters``: requests spread round-robin over four adapters, all in one batch (``max_loras=4``);
- ``4 adapters, 2 slots``: the same with ``max_loras=2``, so batches split and slots swap.

On the CPU (1 torch thread by default) throughput is output tokens per CPU-second of this
process, so other processes on a shared machine skew it less; wall-clock figures are kept too.

Writes ``benchmarks/results/lora-<device>-<utc time>.json`` (settings, versions, every run, each
setting's throughput as a ratio to ``base``) and a PNG bar chart beside it. On the CPU the LoRA
math is the PyTorch reference; on CUDA the Triton kernels.

    python benchmarks/lora.py             # CPU, a few minutes on 2 cores
    python benchmarks/lora.py --quick     # smaller model and batch
    python benchmarks/lora.py --device cuda --hidden 2048 --layers 8 --num-prompts 128
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs are timed in CPU seconds)")
    p.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, 16 prompts, 2 rounds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.num_prompts, args.repeats = 256, 2, 16, 2
    return args


def timed(llm, prompts, sp, loras) -> tuple[float, float, int]:
    """(wall seconds, this process's CPU seconds, output tokens) of one generate call."""
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, sp, lora_request=loras, use_tqdm=False)
    return time.perf_counter() - t0, time.process_time() - c0, sum(len(o.outputs[0].token_ids) for o in outs)


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["runs"])
    tps = [result["runs"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, tps, color=["#777"] * 2 + ["#3a7"] * (len(names) - 2))
    for bar, n in zip(bars, names):
        ax.annotate(f"{result['ratio_to_base'][n]:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")
    s = result["settings"]
    ax.set_ylabel("output tokens / CPU-second" if result["timing"] == "cpu" else "output tokens / s")
    ax.set_title(f"multi-LoRA throughput, {result['device']}: hidden {s['hidden']}, {s['layers']} layers, "
                 f"rank {s['rank']}, {s['num_prompts']} prompts", fontsize=9)
    plt.setp(ax.get_xticklabels(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    from pageant.engine import LLM, LoRARequest, SamplingParams
    from pageant.engine.adapters.testing import build_lora_adapter
    from pageant.engine.bench.scripts import is_cuda, result_header, save_result, setup_device, small_llama

    cpu_only = not is_cuda(args.device)
    setup_device(args.device, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        base = small_llama(tmp / "base", args.hidden, args.layers)
        ranks = [args.rank, args.rank, max(1, args.rank // 2), max(1, args.rank // 4)]
        adapters = [LoRARequest(f"lora{i}", i + 1, str(build_lora_adapter(
                        base, tmp / f"lora{i}", r=r, lora_alpha=2 * r, seed=i, std=0.05)))
                    for i, r in enumerate(ranks)]
        g = torch.Generator().manual_seed(0)
        prompts = [{"prompt_token_ids": [1] + torch.randint(3, 500, (args.prompt_len - 1,), generator=g).tolist()}
                   for _ in range(args.num_prompts)]
        sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        common = dict(device=args.device, max_num_seqs=args.num_prompts, max_model_len=512,
                      max_num_batched_tokens=max(2048, args.num_prompts * args.prompt_len))
        spread = [adapters[i % 4] for i in range(args.num_prompts)]
        settings = [
            ("base", dict(), None),
            ("base, lora on", dict(enable_lora=True, max_loras=4, max_lora_rank=args.rank), None),
            ("1 adapter", dict(enable_lora=True, max_loras=4, max_lora_rank=args.rank), adapters[0]),
            ("4 adapters", dict(enable_lora=True, max_loras=4, max_lora_rank=args.rank), spread),
            ("4 adapters, 2 slots", dict(enable_lora=True, max_loras=2, max_lora_rank=args.rank), spread),
        ]
        engines = {}
        for name, kwargs, loras in settings:
            llm = LLM(model=base, **common, **kwargs)
            llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False,
                         lora_request=loras[:2] if isinstance(loras, list) else loras)  # warm-up
            engines[name] = (llm, loras)
        # settings interleaved in every round, so drift in a shared machine's load hits all alike
        seconds: dict[str, list[float]] = {name: [] for name in engines}
        cpu_seconds: dict[str, list[float]] = {name: [] for name in engines}
        tokens: dict[str, int] = {}
        for _ in tqdm(range(args.repeats), desc="rounds"):
            for name, (llm, loras) in engines.items():
                elapsed, cpu, tokens[name] = timed(llm, prompts, sp, loras)
                seconds[name].append(elapsed)
                cpu_seconds[name].append(cpu)
        runs = {}
        for name in engines:
            # on the CPU, throughput per CPU-second of this process (1 thread) is robust to other
            # processes sharing the machine; wall-clock throughput is kept beside it
            best = min(cpu_seconds[name]) if cpu_only else min(seconds[name])
            runs[name] = {"wall_seconds": seconds[name], "cpu_seconds": cpu_seconds[name],
                          "output_tokens": tokens[name], "tokens_per_s": tokens[name] / best,
                          "wall_tokens_per_s": tokens[name] / min(seconds[name])}
            print(f"{name:>22}: {runs[name]['tokens_per_s']:8.1f} output tokens/s (best of {args.repeats})")
        del engines
    base_tps = runs["base"]["tokens_per_s"]
    result = result_header("lora", args)
    result["settings"]["adapter_ranks"] = ranks
    result["runs"] = runs
    result["ratio_to_base"] = {n: r["tokens_per_s"] / base_tps for n, r in runs.items()}
    path = save_result(result, args.out, "lora", args.device, lambda png: plot(result, png))
    for n, r in result["ratio_to_base"].items():
        print(f"{n:>22}: {r:.3f} x base")
    print(f"wrote {path} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
