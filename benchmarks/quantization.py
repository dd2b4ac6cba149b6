"""Quantized checkpoints vs float: weight memory and output tokens/s of every supported format.

Builds one random Llama (hidden 512, 4 layers, MLP 1408 by default) in float32 and quantizes it
to each format (the test helpers of ``pageant.engine.layers.quantization.checkpoints``: the
compressed-tensors library itself for its formats):

- ``float32``: the dense checkpoint;
- compressed-tensors: ``int8-channel`` (W8A16), ``int4-g128-sym`` and ``int4-g32-asym`` (W4A16),
  ``fp8-channel`` (FP8 weights), ``w8a8-int8`` (int8 weights, int8 dynamic per-token activations);
- ``fp8-block``: ``quant_method: fp8`` with 128x128 block scales (DeepSeek-V3 / Qwen3-FP8 style);
- ``gptq-int4-g128``, ``awq-int4-g128``;
- ``fp8-online``: the float checkpoint with ``quantization="fp8"``.

Weight memory is measured on the loaded engines: the bytes of every tensor the linear layers hold
(packed weights, scales, zero points, group tables; embeddings and the LM head stay float and are
left out). Throughput: the same prompts, greedy, ``ignore_eos``, every format once per round,
interleaved, the best of ``--repeats`` rounds. On the CPU (1 torch thread by default) it is output
tokens per CPU-second of this process. The CPU path dequantizes each layer's weight on every
forward, so quantized formats are *slower* than float there: the memory is what they buy; fused
dequant GEMMs are the GPU's business.

Writes ``benchmarks/results/quantization-<device>-<utc time>.json`` and a PNG beside it.

    python benchmarks/quantization.py            # CPU, a few minutes on 2 cores
    python benchmarks/quantization.py --quick    # hidden 256, 2 layers, 8 prompts
    python benchmarks/quantization.py --formats float32,int4-g128-sym,fp8-block
"""

from __future__ import annotations

import pathlib
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
INT8_CHANNEL = dict(num_bits=8, type="int", strategy="channel", symmetric=True)
FORMATS = {  # name: (how it is made, its settings)
    "float32": ("float", {}),
    "int8-channel": ("ct", dict(weights=INT8_CHANNEL)),
    "int4-g128-sym": ("ct", dict(weights=dict(num_bits=4, type="int", strategy="group", group_size=128,
                                              symmetric=True))),
    "int4-g32-asym": ("ct", dict(weights=dict(num_bits=4, type="int", strategy="group", group_size=32,
                                              symmetric=False))),
    "fp8-channel": ("ct", dict(weights=dict(num_bits=8, type="float", strategy="channel", symmetric=True))),
    "fp8-block": ("fp8", {}),
    "w8a8-int8": ("ct", dict(weights=INT8_CHANNEL, input_activations=dict(
        num_bits=8, type="int", strategy="token", dynamic=True, symmetric=True))),
    "gptq-int4-g128": ("gptq", {}),
    "awq-int4-g128": ("awq", {}),
    "fp8-online": ("online", {}),
}


def parse_args(argv=None):
    from pageant.engine.bench.scripts import add_workload_args, base_parser

    p = base_parser(__doc__, hidden=512, layers=4, out_default=ROOT / "benchmarks" / "results")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 11/4 of hidden)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, from: " + ", ".join(FORMATS))
    add_workload_args(p, num_prompts=16)
    p.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, MLP 512, 8 prompts, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.num_prompts, args.repeats = 256, 2, 512, 8, 2
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown or "float32" not in args.formats:
        p.error(f"--formats must include float32 and name only {', '.join(FORMATS)}; got unknown {unknown}")
    return args


def build(tmp: pathlib.Path, args) -> dict[str, tuple[str, str | None]]:
    """{format: (checkpoint path, EngineConfig.quantization)}."""
    from tqdm.auto import tqdm

    from pageant.engine.layers.quantization import checkpoints as ck
    from pageant.engine.testing import build_checkpoint

    heads = max(4, args.hidden // 64)  # small_llama's shape, with the MLP size settable
    dense = str(build_checkpoint(tmp / "float32", hidden_size=args.hidden, num_hidden_layers=args.layers,
                                 intermediate_size=args.intermediate or args.hidden * 11 // 4,
                                 num_attention_heads=heads, num_key_value_heads=heads // 2,
                                 max_position_embeddings=1024))
    paths: dict[str, tuple[str, str | None]] = {}
    for name in tqdm(args.formats, desc="quantizing"):
        kind, kw = FORMATS[name]
        out = tmp / name
        if kind == "float":
            paths[name] = (dense, None)
        elif kind == "online":
            paths[name] = (dense, "fp8")
        elif kind == "ct":
            paths[name] = (ck.compressed_tensors_checkpoint(dense, out, kw["weights"], kw.get("input_activations")),
                           None)
        elif kind == "fp8":
            paths[name] = (ck.fp8_checkpoint(dense, out, block=(128, 128)), None)
        elif kind == "gptq":
            paths[name] = (ck.gptq_checkpoint(dense, out, group_size=128), None)
        else:
            paths[name] = (ck.awq_checkpoint(dense, out, group_size=128), None)
    return paths


def linear_bytes(llm) -> tuple[int, int]:
    """(bytes of every tensor the linear layers hold, their number of weights) in an engine's model."""
    from pageant.engine.layers.linear import LinearBase

    total = weights = 0
    for m in llm.engine.runner.model.modules():
        if isinstance(m, LinearBase):
            tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            total += sum(t.numel() * t.element_size() for t in tensors)
            weights += m.input_size_per_partition * m.output_size_per_partition
    return total, weights


def plot(result: dict, path: pathlib.Path) -> None:
    from pageant.engine.bench.scripts import annotated_bars, figure, throughput_label

    names = list(result["runs"])
    runs = result["runs"]
    with figure(path, 1, 2, figsize=(11, 4.2)) as (fig, (a, b)):
        annotated_bars(a, names, [runs[n]["weight_bytes"] / 2**20 for n in names],
                       [f"{runs[n]['bytes_per_weight']:.2f} B/w" for n in names],
                       ["#777"] + ["#3a7"] * (len(names) - 1), fontsize=7)
        a.set_ylabel("linear-layer weight memory (MiB)")
        annotated_bars(b, names, [runs[n]["tokens_per_s"] for n in names],
                       [f"{result['ratio_to_float'][n]:.2f}x" for n in names],
                       ["#777"] + ["#37a"] * (len(names) - 1), fontsize=7)
        b.set_ylabel(throughput_label(result["timing"]))
        for ax in (a, b):
            ax.tick_params(axis="x", rotation=60, labelsize=7)
            ax.set_ylim(0, max(ax.get_ylim()[1], 1) * 1.1)
        s = result["settings"]
        fig.suptitle(f"quantized formats vs float32: {result['device']}, hidden {s['hidden']}, {s['layers']} layers, "
                     f"{s['num_prompts']} prompts x {s['output_len']} tokens", fontsize=9)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pageant.engine import LLM
    from pageant.engine.bench.scripts import (greedy_workload, interleaved_rounds, output_tokens, result_header,
                                              save_result, setup_device, warm_up)

    setup_device(args.device, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(pathlib.Path(tmp), args)
        prompts, sp = greedy_workload(args)
        blocks = -(-args.num_prompts * (args.prompt_len + args.output_len) // 16) + args.num_prompts
        engines, memory = {}, {}
        for name, (path, quantization) in paths.items():
            llm = LLM(model=path, quantization=quantization, device=args.device, max_num_seqs=args.num_prompts,
                      max_model_len=1024, num_kv_blocks=blocks, block_size=16,
                      max_num_batched_tokens=max(2048, args.num_prompts * args.prompt_len))
            warm_up(llm, prompts)
            engines[name], memory[name] = llm, linear_bytes(llm)
        runs = interleaved_rounds({n: (lambda llm=llm: output_tokens(llm, prompts, sp)) for n, llm in engines.items()},
                                  args.repeats, args.device)
        del engines
    float_bytes, float_tps = memory["float32"][0], runs["float32"]["tokens_per_s"]
    for name, (nbytes, weights) in memory.items():
        runs[name].update(weight_bytes=nbytes, num_weights=weights, bytes_per_weight=nbytes / weights,
                          weight_ratio_to_float=nbytes / float_bytes)
        print(f"{name:>15}: {nbytes / 2**20:7.2f} MiB ({nbytes / weights:.3f} B/weight, "
              f"{nbytes / float_bytes:.3f}x float32), {runs[name]['tokens_per_s']:7.1f} output tokens/s "
              f"({runs[name]['tokens_per_s'] / float_tps:.2f}x)")
    result = result_header("quantization", args)
    result["runs"] = runs
    result["ratio_to_float"] = {n: r["tokens_per_s"] / float_tps for n, r in runs.items()}
    path = save_result(result, args.out, "quantization", args.device, lambda png: plot(result, png))
    print(f"wrote {path} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
