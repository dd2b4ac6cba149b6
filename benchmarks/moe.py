"""Sparse MoE vs dense: a Mixtral-shaped model against a Llama with the same *active* parameters.

Both models have the same attention, width and depth. The MoE layer has ``--experts`` SwiGLU
experts of intermediate size ``I`` and routes each token to ``--top-k`` of them; the dense model's
MLP has intermediate size ``top_k * I``, so every token multiplies by the same number of weights.
The MoE model holds ``experts / top_k`` times the MLP weights. Greedy, ``ignore_eos``, the same
prompts; the two models interleaved in every round, the best of ``--repeats`` rounds kept.

On the CPU (1 torch thread by default) throughput is output tokens per CPU-second of this
process (other processes on a shared machine skew it less); wall-clock figures are kept too. On
the CPU the experts run the PyTorch reference (``pageant.kernels.moe_reference``), on CUDA the
Triton grouped GEMM (``pageant.kernels.moe``).

Writes ``benchmarks/results/moe-<device>-<utc time>.json`` and a PNG bar chart beside it.

    python benchmarks/moe.py              # CPU, a few minutes on 2 cores
    python benchmarks/moe.py --quick      # smaller model and batch
    python benchmarks/moe.py --device cuda --hidden 2048 --layers 8 --num-prompts 128
"""

from __future__ import annotations

import pathlib
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    from pageant.engine.bench.scripts import add_workload_args, base_parser

    p = base_parser(__doc__, hidden=512, layers=4, out_default=ROOT / "benchmarks" / "results")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-intermediate", type=int, default=704, help="each expert's intermediate size I")
    add_workload_args(p, num_prompts=32)
    p.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, 16 prompts, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.num_prompts, args.repeats, args.expert_intermediate = 256, 2, 16, 2, 352
    return args


def build(tmp: pathlib.Path, args) -> dict[str, str]:
    """The MoE checkpoint and its dense twin (same attention, MLP of top_k * I)."""
    from pageant.engine.testing import build_checkpoint

    heads = max(4, args.hidden // 64)
    common = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
                  num_key_value_heads=heads // 2, max_position_embeddings=1024)
    return {
        "moe": str(build_checkpoint(tmp / "moe", arch="mixtral", intermediate_size=args.expert_intermediate,
                                    num_local_experts=args.experts, num_experts_per_tok=args.top_k, **common)),
        "dense": str(build_checkpoint(tmp / "dense", arch="llama", intermediate_size=args.top_k * args.expert_intermediate,
                                      **common)),
    }


def count_params(llm) -> tuple[int, int]:
    """(all parameters, parameters one token multiplies by) of an engine's model."""
    model = llm.engine.runner.model
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    if not cfg.num_experts:
        return total, total
    expert = 3 * cfg.hidden_size * cfg.intermediate_size * cfg.num_layers
    return total, total - (cfg.num_experts - cfg.num_experts_per_tok) * expert


def plot(result: dict, path: pathlib.Path) -> None:
    from pageant.engine.bench.scripts import annotated_bars, figure, throughput_label

    names = list(result["runs"])
    runs = result["runs"]
    tps = [runs[n]["tokens_per_s"] for n in names]
    with figure(path, figsize=(6, 4)) as (fig, ax):
        annotated_bars(ax, names, tps, [f"{result['ratio_to_dense'][n]:.2f}x\n{runs[n]['active_params'] / 1e6:.1f}M "
                                        f"active / {runs[n]['total_params'] / 1e6:.1f}M" for n in names],
                       ["#777", "#3a7"], fontsize=8)
        s = result["settings"]
        ax.set_ylabel(throughput_label(result["timing"]))
        ax.set_title(f"MoE ({s['experts']} experts, top {s['top_k']}) vs dense of equal active params\n"
                     f"{result['device']}, hidden {s['hidden']}, {s['layers']} layers, {s['num_prompts']} prompts",
                     fontsize=9)
        ax.set_ylim(0, max(tps) * 1.3)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pageant.engine import LLM
    from pageant.engine.bench.scripts import (greedy_workload, interleaved_rounds, output_tokens, result_header,
                                              save_result, setup_device, warm_up)

    setup_device(args.device, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(pathlib.Path(tmp), args)
        prompts, sp = greedy_workload(args)
        engines = {}
        for name, path in paths.items():
            llm = LLM(model=path, device=args.device, max_num_seqs=args.num_prompts, max_model_len=1024,
                      max_num_batched_tokens=max(2048, args.num_prompts * args.prompt_len))
            warm_up(llm, prompts)
            engines[name] = llm
        runs = interleaved_rounds({n: (lambda llm=llm: output_tokens(llm, prompts, sp)) for n, llm in engines.items()},
                                  args.repeats, args.device)
        for name, llm in engines.items():
            total, active = count_params(llm)
            runs[name].update(total_params=total, active_params=active)
            print(f"{name:>6}: {runs[name]['tokens_per_s']:8.1f} output tokens/s, {active / 1e6:.1f}M active of "
                  f"{total / 1e6:.1f}M parameters")
        del engines
    result = result_header("moe", args)
    result["runs"] = runs
    result["ratio_to_dense"] = {n: r["tokens_per_s"] / runs["dense"]["tokens_per_s"] for n, r in runs.items()}
    path = save_result(result, args.out, "moe", args.device, lambda png: plot(result, png))
    print(f"MoE / dense throughput: {result['ratio_to_dense']['moe']:.3f}; wrote {path} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
