"""Structured outputs: constrained vs free decoding throughput, and grammar compile time.

Throughput: the same 32 prompts decoded free, under a regex (too long to end before
``--output-len`` tokens, so both decode exactly as many tokens) and under a JSON schema, on one engine, settings interleaved in every round, the best of
``--repeats`` kept; output tokens per CPU-second on the CPU (1 torch thread), per second on a GPU.
Compile time: a large JSON schema (``--schema-properties`` properties of nested objects, arrays and
enums) compiled cold (a fresh manager, so nothing is cached) and again from the cache.

Writes ``benchmarks/results/structured-outputs-<device>-<utc time>.json`` and a PNG beside it.

    python benchmarks/structured_outputs.py           # CPU, about a minute
    python benchmarks/structured_outputs.py --quick
"""

from __future__ import annotations

import pathlib
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    from pageant.engine.bench.scripts import base_parser

    p = base_parser(__doc__, hidden=256, layers=2, out_default=ROOT / "benchmarks" / "results")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--schema-properties", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="batch 8, 16 tokens, 1 round, 40 schema properties")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.output_len, args.repeats, args.schema_properties = 8, 16, 1, 40
    return args


def large_schema(n: int) -> dict:
    props = {}
    for i in range(n):
        kind = i % 4
        if kind == 0:
            props[f"p{i}"] = {"type": "string", "maxLength": 32}
        elif kind == 1:
            props[f"p{i}"] = {"type": "integer", "minimum": -1000, "maximum": 1000}
        elif kind == 2:
            props[f"p{i}"] = {"enum": [f"v{j}" for j in range(20)]}
        else:
            props[f"p{i}"] = {"type": "array", "maxItems": 5, "items": {"type": "object", "properties": {
                "x": {"type": "number"}, "y": {"type": "boolean"}}, "required": ["x"]}}
    return {"type": "object", "properties": props, "required": list(props)[: n // 2]}


def plot(result: dict, path: pathlib.Path) -> None:
    from pageant.engine.bench.scripts import annotated_bars, figure, throughput_label

    with figure(path, 1, 2, figsize=(9, 4)) as (fig, (a, b)):
        names = list(result["runs"])
        annotated_bars(a, names, [result["runs"][n]["tokens_per_s"] for n in names],
                       [f"{result['ratio_to_free'][n]:.2f}x" for n in names], ["#777", "#3a7", "#37a"])
        a.set_ylabel(throughput_label(result["timing"]))
        a.set_title(f"batch {result['settings']['batch']}, {result['device']}", fontsize=9)
        c = result["compile"]
        b.bar(["cold", "cached"], [c["cold_seconds"] * 1e3, c["cached_seconds"] * 1e3], color=["#a73", "#3a7"])
        b.set_ylabel("ms")
        b.set_title(f"compile a {c['schema_properties']}-property JSON schema", fontsize=9)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pageant.engine import LLM, SamplingParams, StructuredOutputsParams
    from pageant.engine.bench.scripts import (interleaved_rounds, output_tokens, result_header, save_result,
                                              setup_device, small_llama)
    from pageant.engine.structured_outputs.manager import StructuredOutputManager

    setup_device(args.device, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = small_llama(pathlib.Path(tmp) / "m", args.hidden, args.layers)
        llm = LLM(model=path, device=args.device, max_num_seqs=args.batch)
        prompts = [f"Request {i}: describe the item." for i in range(args.batch)]
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                            "maxItems": 4}}, "required": ["name", "tags"]}
        settings = {
            "free": SamplingParams(temperature=1.0, seed=0, max_tokens=args.output_len, ignore_eos=True),
            "regex": SamplingParams(temperature=1.0, seed=0, max_tokens=args.output_len, ignore_eos=True,
                                    structured_outputs=StructuredOutputsParams(regex=f"[a-z ]{{{16 * args.output_len}}}")),
            "json_schema": SamplingParams(temperature=1.0, seed=0, max_tokens=args.output_len, ignore_eos=True,
                                          structured_outputs=StructuredOutputsParams(json=schema,
                                                                                     disable_any_whitespace=True)),
        }
        for sp in settings.values():  # warm-up (and the grammars compiled)
            llm.generate(prompts[:2], sp, use_tqdm=False)
        runs = interleaved_rounds({n: (lambda sp=sp: output_tokens(llm, prompts, sp)) for n, sp in settings.items()},
                                  args.repeats, args.device)
        tok = llm.engine.tokenizer
        fresh = StructuredOutputManager(tok.hf_tokenizer, llm.engine.vocab_size, sorted(tok.eos_token_ids))
        big = StructuredOutputsParams(json=large_schema(args.schema_properties))
        fresh.submit(StructuredOutputsParams(regex="a")).result()  # the backend itself built first
        t0 = time.perf_counter()
        fresh.submit(big).result()
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        fresh.submit(StructuredOutputsParams(json=large_schema(args.schema_properties))).result()
        cached = time.perf_counter() - t0
        fresh.shutdown()
    result = result_header("structured-outputs", args)
    result["runs"] = runs
    result["ratio_to_free"] = {n: r["tokens_per_s"] / runs["free"]["tokens_per_s"] for n, r in runs.items()}
    result["compile"] = {"schema_properties": args.schema_properties, "cold_seconds": cold, "cached_seconds": cached}
    out = save_result(result, args.out, "structured-outputs", args.device, lambda png: plot(result, png))
    for n, r in runs.items():
        print(f"{n:>12}: {r['tokens_per_s']:8.1f} tokens/s ({result['ratio_to_free'][n]:.2f}x free)")
    print(f"compile {args.schema_properties}-property schema: cold {cold * 1e3:.1f} ms, cached {cached * 1e3:.3f} ms")
    print(f"wrote {out} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
