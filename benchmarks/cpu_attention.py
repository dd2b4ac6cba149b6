"""CPU paged attention per layer call: the reference (gather pages, SDPA) vs the in-place kernels.

``pageant.kernels.reference`` gathers every sequence's KV pages into contiguous tensors each call
and runs SDPA over length groups; ``pageant.kernels.cpu_ops`` (``get_ops("torch")``) reads the
paged pool in place through the block tables (``pageant.kernels.cpu_attention``). Both run side by
side, interleaved in every round, on the same inputs:

* decode: batch sizes ``--batch-sizes`` (1/16/48/256) with contexts drawn uniformly from
  ``--min-context`` .. ``--max-context`` (16..384);
* prefill: fresh prompts, chunked prefill over a long cached prefix, and short extends (what a
  speculative-decoding verify step sends);

``--hidden`` / ``--head-dim`` heads (512 / 64: 8 heads, half as many KV heads, as the benchmarks'
``small_llama``), float32, block size ``--block-size``, each at 1 .. ``--threads`` torch threads.
Every timed call reads the next of ``--layers`` KV pools (as an engine's forward walks its layers:
a call does not find its pages in the cache because the previous call read them). Per case: the
mean call over ``--calls`` calls, best of ``--repeats`` rounds, in wall-clock and in CPU seconds of
this process (all threads), and the largest difference between the two outputs.

Also timed: building the C++ library from scratch (a subprocess with an empty
``TORCH_EXTENSIONS_DIR``) and loading the built one (a second subprocess).

Writes ``benchmarks/results/cpu-attention-cpu-<utc time>.json`` and a PNG beside it.

    python benchmarks/cpu_attention.py            # a few minutes on 2 cores
    python benchmarks/cpu_attention.py --quick    # small shapes, one round (the smoke test)
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name: (context lengths, query lengths): query j of a sequence sits at context - q_len + j
PREFILL_CASES = {
    "fresh 1x512": ([512], [512]),
    "fresh 4x128": ([128] * 4, [128] * 4),
    "chunk 1024+64": ([1088], [64]),
    "chunk 2048+16": ([2064], [16]),
    "extend 16x(300+4)": ([304] * 16, [4] * 16),
}
QUICK_PREFILL = {"fresh 2x40": ([40, 40], [40, 40]), "chunk 100+8": ([108], [8])}


def parse_args(argv=None):
    from pageant.engine.bench.scripts import base_parser

    p = base_parser(__doc__, hidden=512, layers=4, out_default=ROOT / "benchmarks" / "results")
    p.set_defaults(threads=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch-sizes", default="1,16,48,256", help="comma-separated decode batch sizes")
    p.add_argument("--min-context", type=int, default=16)
    p.add_argument("--max-context", type=int, default=384)
    p.add_argument("--calls", type=int, default=0, help="calls per round (0: about 1 s of reference time)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--quick", action="store_true", help="batch 1 and 4, small contexts, 1 round, no build timing")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.max_context, args.repeats, args.calls, args.layers = "1,4", 64, 1, 2, 2
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if args.device != "cpu":
        raise SystemExit("this benchmark times CPU kernels: --device must be cpu")
    if (not args.batch_sizes or min(args.batch_sizes) < 1 or args.hidden % args.head_dim or args.layers < 1
            or args.repeats < 1 or args.threads < 1 or not 1 <= args.min_context <= args.max_context):
        raise SystemExit("need batch sizes >= 1, --hidden a multiple of --head-dim, --layers/--repeats/--threads "
                         ">= 1 and 1 <= --min-context <= --max-context")
    return args


def paged_pools(torch, lens, args, seed):
    """``args.layers`` random pools holding sequences of ``lens`` tokens in shuffled blocks, and their
    block table and seq_lens (the same layout in every pool, as layers share the block tables)."""
    gen = torch.Generator().manual_seed(seed)
    bs, kvh = args.block_size, args.hidden // args.head_dim // 2
    per_seq = [(n + bs - 1) // bs for n in lens]
    num_blocks = sum(per_seq) + 1
    pools = [(torch.randn(num_blocks, bs, kvh, args.head_dim, generator=gen),
              torch.randn(num_blocks, bs, kvh, args.head_dim, generator=gen)) for _ in range(args.layers)]
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(lens), max(per_seq), dtype=torch.int32)  # padding -> block order[0]
    start = 0
    for i, nb in enumerate(per_seq):
        tables[i, :nb] = order[start : start + nb]
        start += nb
    return pools, tables, torch.tensor(lens, dtype=torch.int32)


def time_pair(torch, fns: dict, args, layers: int) -> dict:
    """Mean seconds per call (wall and CPU) of each function, best round, interleaved in every round.
    ``fns[name](layer)`` runs one call on that layer's pool."""
    calls = args.calls
    if not calls:  # about a second of the first (reference) function, at least one pass over the layers
        t0 = time.perf_counter()
        fns["reference"](0)
        calls = max(layers, min(2000, int(1.0 / max(time.perf_counter() - t0, 1e-6))))
    for fn in fns.values():  # warm up
        fn(0)
    wall = {name: float("inf") for name in fns}
    cpu = {name: float("inf") for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(calls):
                fn(i % layers)
            wall[name] = min(wall[name], (time.perf_counter() - t0) / calls)
            cpu[name] = min(cpu[name], (time.process_time() - c0) / calls)
    return {"calls": calls, "wall_us": {n: 1e6 * wall[n] for n in fns}, "cpu_us": {n: 1e6 * cpu[n] for n in fns},
            "ratio_wall": wall["reference"] / wall["in_place"], "ratio_cpu": cpu["reference"] / cpu["in_place"]}


def bench_decode(torch, reference, cpu_ops, args, batch: int, threads: int) -> dict:
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(args.min_context, args.max_context + 1, (batch,), generator=gen).tolist()
    pools, tables, seq_lens = paged_pools(torch, lens, args, seed=batch)
    query = torch.randn(batch, args.hidden // args.head_dim, args.head_dim, generator=gen)
    scale = args.head_dim ** -0.5
    fns = {name: (lambda layer, f=mod.paged_attention_decode: f(query, *pools[layer], tables, seq_lens, scale))
           for name, mod in (("reference", reference), ("in_place", cpu_ops))}
    torch.set_num_threads(threads)
    diff = float((fns["reference"](0) - fns["in_place"](0)).abs().max())
    row = {"batch_size": batch, "threads": threads, "mean_context": sum(lens) / batch, "max_abs_diff": diff}
    row.update(time_pair(torch, fns, args, len(pools)))
    return row


def bench_prefill(torch, reference, cpu_ops, args, name: str, lens, q_lens, threads: int) -> dict:
    pools, tables, seq_lens = paged_pools(torch, lens, args, seed=len(name))
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(sum(q_lens), args.hidden // args.head_dim, args.head_dim, generator=gen)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    scale = args.head_dim ** -0.5
    fns = {n: (lambda layer, f=mod.paged_attention_prefill: f(query, *pools[layer], tables, qsl, seq_lens, scale))
           for n, mod in (("reference", reference), ("in_place", cpu_ops))}
    torch.set_num_threads(threads)
    diff = float((fns["reference"](0) - fns["in_place"](0)).abs().max())
    row = {"case": name, "threads": threads, "contexts": lens[0], "query_lens": q_lens[0], "num_seqs": len(lens),
           "max_abs_diff": diff}
    row.update(time_pair(torch, fns, args, len(pools)))
    return row


BUILD_PROBE = "from pageant.kernels import cpu_attention; import json; print(json.dumps(cpu_attention.build_info()))"


def build_timing() -> dict:
    """Seconds of ``cpu_attention.load()``: compiling into an empty extensions folder, then loading it."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": tmp}
        runs = []
        for _ in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", BUILD_PROBE], env=env, capture_output=True, text=True,
                                 timeout=900, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    if not (cold["available"] and cold["compiled"] and warm["available"] and not warm["compiled"]):
        raise RuntimeError(f"unexpected build outcome: {runs}")
    return {"cold_build_s": cold["seconds"], "warm_load_s": warm["seconds"]}


def plot(result: dict, path: pathlib.Path) -> None:
    from pageant.engine.bench.scripts import figure

    decode, prefill = result["decode"], result["prefill"]
    threads = sorted({r["threads"] for r in decode})
    with figure(path, 1, 2 if prefill else 1, figsize=(11 if prefill else 6, 4), squeeze=False) as (fig, axes):
        for col, (rows, key, title) in enumerate(((decode, "batch_size", "decode, batch size"),
                                                  (prefill, "case", "prefill / extend"))):
            if not rows:
                continue
            ax = axes[0][col]
            labels = list(dict.fromkeys(str(r[key]) for r in rows))
            width = 0.8 / len(threads)
            for k, t in enumerate(threads):
                got = {str(r[key]): r["ratio_wall"] for r in rows if r["threads"] == t}
                xs = [i + (k - (len(threads) - 1) / 2) * width for i in range(len(labels))]
                bars = ax.bar(xs, [got.get(lab, 0) for lab in labels], width, label=f"{t} thread(s)")
                for bar, lab in zip(bars, labels):
                    ax.annotate(f"{got.get(lab, 0):.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=0 if col == 0 else 20)
            ax.set_ylabel("reference time / in-place time (wall)")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=8)
        s = result["settings"]
        fig.suptitle(f"CPU paged attention per layer call, {s['hidden'] // s['head_dim']} heads x {s['head_dim']}, "
                     f"float32, block {s['block_size']}\n{result['device']}", fontsize=9)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from pageant.engine.bench.scripts import result_header, save_result
    from pageant.kernels import cpu_attention, cpu_ops, reference

    if not cpu_attention.available():
        raise SystemExit(f"the in-place CPU attention did not build: {cpu_attention.build_info()['error']}")
    result = result_header("cpu_attention", args)
    thread_counts = list(range(1, args.threads + 1))
    result["decode"] = []
    for batch in args.batch_sizes:
        for threads in thread_counts:
            row = bench_decode(torch, reference, cpu_ops, args, batch, threads)
            result["decode"].append(row)
            print(f"decode batch {batch:4d} threads {threads}: reference {row['wall_us']['reference']:9.1f} us  "
                  f"in place {row['wall_us']['in_place']:9.1f} us  x{row['ratio_wall']:.2f} wall  "
                  f"x{row['ratio_cpu']:.2f} cpu  (max diff {row['max_abs_diff']:.1e})", flush=True)
    result["prefill"] = []
    cases = {} if args.no_prefill else (QUICK_PREFILL if args.quick else PREFILL_CASES)
    for name, (lens, q_lens) in cases.items():
        for threads in thread_counts:
            row = bench_prefill(torch, reference, cpu_ops, args, name, lens, q_lens, threads)
            result["prefill"].append(row)
            print(f"prefill {name:18s} threads {threads}: reference {row['wall_us']['reference']:9.1f} us  "
                  f"in place {row['wall_us']['in_place']:9.1f} us  x{row['ratio_wall']:.2f} wall  "
                  f"x{row['ratio_cpu']:.2f} cpu  (max diff {row['max_abs_diff']:.1e})", flush=True)
    result["build"] = None if args.quick else build_timing()
    if result["build"]:
        print(f"build: cold {result['build']['cold_build_s']:.1f} s, warm load {result['build']['warm_load_s']:.3f} s")
    path = save_result(result, args.out, "cpu-attention", args.device, lambda png: plot(result, png))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
