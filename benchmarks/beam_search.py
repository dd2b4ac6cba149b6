"""Beam search KV sharing: blocks held with prefix caching vs beam_width independent copies.

For each beam width, runs ``LLM.beam_search`` on the same prompts twice — prefix caching on (the
beams of a prompt hold their common full blocks once) and off (every beam re-prefills its whole
context each step) — and records the most KV blocks held by sequences during any forward, and the
wall time of both; checks that both return the same beams. "Independent" is what ``beam_width``
private copies of every prompt's full context would hold:
``num_prompts * beam_width * ceil((prompt_len + output_len) / block_size)`` (the run without
caching is throttled by the token budget, so its measured peak is reported but not compared).

Writes ``benchmarks/results/beam-search-<device>-<utc time>.json`` and a PNG beside it.

    python benchmarks/beam_search.py           # CPU, about a minute
    python benchmarks/beam_search.py --quick
"""

from __future__ import annotations

import pathlib
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    from pageant.engine.bench.scripts import base_parser

    p = base_parser(__doc__, hidden=256, layers=2, out_default=ROOT / "benchmarks" / "results")
    p.add_argument("--beam-widths", default="1,2,4,8")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="beam widths 1,4; 2 prompts; 8 output tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.beam_widths, args.num_prompts, args.output_len = "1,4", 2, 8
    return args


def plot(result: dict, path: pathlib.Path) -> None:
    from pageant.engine.bench.scripts import figure

    rows = result["rows"]
    widths = [r["beam_width"] for r in rows]
    with figure(path, figsize=(6, 4)) as (fig, ax):
        ax.plot(widths, [r["blocks_shared"] for r in rows], "o-", label="prefix caching (shared prefix)")
        ax.plot(widths, [r["blocks_independent"] for r in rows], "s--", label="beam_width independent copies")
        ax.set_xlabel("beam width")
        ax.set_ylabel("peak KV blocks held")
        s = result["settings"]
        ax.set_title(f"beam search KV blocks, {s['num_prompts']} prompts x {s['prompt_len']} tokens, "
                     f"{s['output_len']} new, block {s['block_size']}", fontsize=9)
        ax.legend()


def main(argv=None) -> int:
    args = parse_args(argv)
    from pageant.engine import LLM, BeamSearchParams
    from pageant.engine.bench.scripts import (peak_blocks_in_use, random_token_prompts, result_header, save_result,
                                              setup_device, small_llama)

    setup_device(args.device, args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = small_llama(pathlib.Path(tmp) / "m", args.hidden, args.layers, max_position_embeddings=1024)
        prompts = random_token_prompts(args.num_prompts, args.prompt_len)
        llms = {c: LLM(model=path, device=args.device, enable_prefix_caching=c, block_size=args.block_size,
                       max_model_len=1024, max_num_seqs=256) for c in (True, False)}
        for width in (int(w) for w in args.beam_widths.split(",")):
            params = BeamSearchParams(beam_width=width, max_tokens=args.output_len, ignore_eos=True)
            row, beams = {"beam_width": width}, {}
            for caching, llm in llms.items():
                key = "shared" if caching else "no_cache"
                t0 = time.perf_counter()
                out = []
                row[f"blocks_{key}"] = peak_blocks_in_use(llm, lambda: out.extend(llm.beam_search(prompts, params)))
                row[f"seconds_{key}"] = time.perf_counter() - t0
                beams[key] = [[s.tokens for s in o.sequences] for o in out]
            if beams["shared"] != beams["no_cache"]:
                raise AssertionError(f"beam width {width}: the beams differ with and without prefix caching")
            row["blocks_independent"] = args.num_prompts * width * -(-(args.prompt_len + args.output_len) // args.block_size)
            row["ratio"] = row["blocks_shared"] / row["blocks_independent"]
            rows.append(row)
            print(f"beam width {width}: peak {row['blocks_shared']} blocks shared vs {row['blocks_independent']} for "
                  f"independent copies ({row['ratio']:.2f}x); {row['seconds_shared']:.1f} s with caching, "
                  f"{row['seconds_no_cache']:.1f} s without")
    result = result_header("beam-search", args)
    result["rows"] = rows
    out = save_result(result, args.out, "beam-search", args.device, lambda png: plot(result, png))
    print(f"wrote {out} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
