"""``pageant bench serve`` and ``pageant bench throughput``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import platform
import sys
from pathlib import Path

from pageant.engine.bench import datasets


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="load an OpenAI-compatible server (ours or anyone's)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=_rates, default=[float("inf")],
                   help="requests per second (Poisson arrivals); inf sends all at once; a comma-separated "
                        "list runs one benchmark per rate and plots them together")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival process: 1 = Poisson, <1 burstier, >1 smoother")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--dataset", default="random", choices=["random", "sharegpt", "prefix"])
    p.add_argument("--dataset-path", default=None, help="a local ShareGPT JSON file (dataset sharegpt)")
    p.add_argument("--input-len", default="128:512", help="random: prompt length range MIN:MAX")
    p.add_argument("--output-len", default="32:128", help="output length range MIN:MAX")
    p.add_argument("--prefix-len", type=int, default=256, help="prefix: shared system prompt length")
    p.add_argument("--num-prefixes", type=int, default=4, help="prefix: how many distinct shared prompts")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer dir or hub id, to build prompts of exact token lengths (token ids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", action="store_true", help="write JSON and PNG plots to --result-dir")
    p.add_argument("--result-dir", default="benchmarks/results")
    p.add_argument("--label", default=None, help="a name for this run in the saved files")
    p.add_argument("--no-progress", action="store_true")


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad request rate list {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("request rates must be > 0 (inf sends all at once)")
    return rates


def _baselines(text: str) -> list[str]:
    from pageant.engine.bench.throughput import BASELINES

    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [n for n in names if n not in BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown baseline {', '.join(unknown) or repr(text)}: choose from "
                                         f"{', '.join(BASELINES)} (comma-separated)")
    if "none" in names and len(names) > 1:
        raise argparse.ArgumentTypeError("baseline none runs Pageant only: it cannot be combined with others")
    return [] if names == ["none"] else names


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad batch size list {text!r}") from None
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be integers >= 1, got {text!r}")
    return sizes


def _throughput_parser(sub) -> None:
    p = sub.add_parser("throughput", help="offline: Pageant LLM.generate vs Hugging Face generate")
    p.add_argument("--model", default=None, help="checkpoint dir; default: build a random Llama of --build-size")
    p.add_argument("--build-size", default="30m", choices=["tiny", "24m", "30m"],
                   help="random Llama-shaped checkpoint to build when --model is not given")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--input-len", default="16:512")
    p.add_argument("--output-len", default="16:256")
    p.add_argument("--baseline", type=_baselines, default=["hf"],
                   help="comma-separated baselines: hf (generate, static left-padded batches of "
                        "--hf-batch-sizes), hf-cb (transformers' continuous batching, paged), none (Pageant only)")
    p.add_argument("--hf-batch-sizes", type=_batch_sizes, default=[8, 16, 32, 64],
                   help="static batch sizes to try for HF")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both sides (default: every CPU core)")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-dir", default="benchmarks/results")
    p.add_argument("--label", default=None)
    p.add_argument("--no-progress", action="store_true")


def _meta(device: str = "cpu") -> dict:
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    except ImportError:
        pass
    return meta


def _first_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def run_serve(args) -> int:
    from pageant.engine.bench.serve import format_summary, results_as_dict, run_serve_benchmark, summarize

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    out_range = datasets.parse_range(args.output_len)
    if args.dataset == "random":
        reqs = datasets.random_requests(args.num_prompts, datasets.parse_range(args.input_len), out_range,
                                        seed=args.seed, tokenizer=tokenizer)
    elif args.dataset == "prefix":
        reqs = datasets.prefix_requests(args.num_prompts, args.prefix_len, args.num_prefixes,
                                        datasets.parse_range(args.input_len), out_range, seed=args.seed,
                                        tokenizer=tokenizer)
    else:
        if not args.dataset_path:
            print("pageant bench serve: --dataset sharegpt needs --dataset-path FILE", file=sys.stderr)
            return 2
        reqs = datasets.sharegpt_requests(args.dataset_path, args.num_prompts, seed=args.seed,
                                          tokenizer=tokenizer, max_output_len=out_range[1])
    model = args.model or _first_model(args.base_url, args.api_key)
    runs: dict[str, tuple[list, dict]] = {}
    for rate in args.request_rate:
        results, duration = asyncio.run(run_serve_benchmark(
            args.base_url, model, reqs, request_rate=rate, burstiness=args.burstiness,
            max_concurrency=args.max_concurrency, api_key=args.api_key, endpoint=args.endpoint,
            seed=args.seed, progress=not args.no_progress,
        ))
        summary = summarize(results, duration)
        print(format_summary(summary, title=f"Serving Benchmark Result (rate {rate:g} req/s)"))
        runs[f"rate {rate:g}"] = (results, summary)
    if args.save_result:
        from pageant.engine.bench.plots import plot_serve

        rates = "_".join(f"{r:g}" for r in args.request_rate)
        label = args.label or f"serve_{args.dataset}_rate{rates}"
        out_dir = Path(args.result_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("api_key", "func")}
        config["request_rate"] = [str(r) for r in args.request_rate]
        doc = {"meta": _meta(), "config": config, "model": model,
               "runs": [{"request_rate": str(r), "summary": summary, "requests": results_as_dict(results)}
                        for r, (results, summary) in zip(args.request_rate, runs.values())]}
        (out_dir / f"{label}.json").write_text(json.dumps(doc, indent=1))
        plot_serve({name: results for name, (results, _) in runs.items()}, out_dir / f"{label}.png")
        print(f"saved {out_dir / (label + '.json')} and {out_dir / (label + '.png')}")
    return 0 if all(summary["completed"] for _, summary in runs.values()) else 1


def build_bench_checkpoint(path: Path, size: str) -> Path:
    """A random Llama-shaped checkpoint: ``24m`` is ~24M parameters (hidden 512, 5 layers), ``30m``
    ~34M (hidden 512, 8 layers); both 8 heads, 4 KV heads, vocab 8192."""
    from pageant.engine.testing import build_checkpoint

    shapes = {
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048),
        "24m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=5, num_attention_heads=8,
                    num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048),
        "30m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048),
    }
    if size not in shapes:
        raise ValueError(f"unknown --build-size {size!r}: choose from {', '.join(shapes)}")
    return Path(build_checkpoint(path, arch="llama", seed=0, **shapes[size]))


def run_throughput(args) -> int:
    import math
    import os
    import tempfile

    import torch
    from transformers import AutoConfig

    from pageant.engine.bench import throughput as tp

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # the same for Pageant and every Hugging Face side (CB's thread inherits it)
    print(f"torch threads: {threads}")
    baselines = args.baseline
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_bench_checkpoint(Path(tmp) / "ckpt", args.build_size)
        num_parameters = tp.count_parameters(model)
        print(f"model: {model if args.model else 'random Llama ' + args.build_size}, "
              f"{num_parameters:,} parameters ({num_parameters / 1e6:.1f}M)")
        config = AutoConfig.from_pretrained(model)
        reqs = tp.make_requests(args.num_prompts, datasets.parse_range(args.input_len),
                                datasets.parse_range(args.output_len), config.vocab_size, args.seed)
        progress = not args.no_progress
        pageant = tp.run_pageant(str(model), reqs, dtype=args.dtype, device=args.device,
                                 max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                 max_model_len=args.max_model_len, progress=progress)
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        hf = [tp.run_hf(str(model), reqs, b, dtype=args.dtype, device=args.device, pad_token_id=pad,
                        progress=progress) for b in args.hf_batch_sizes] if "hf" in baselines else []
        hf_cb = None
        if "hf-cb" in baselines:
            # the same scheduler budget as Pageant, and at most its KV pool (no more than all requests need)
            bs = pageant.extra["block_size"]
            need = sum(math.ceil((len(ids) + n) / bs) for ids, n in reqs) + 1
            hf_cb = tp.run_hf_cb(str(model), reqs, dtype=args.dtype, device=args.device, progress=progress,
                                 block_size=bs, num_blocks=min(pageant.extra["num_kv_blocks"], need),
                                 max_batch_tokens=args.max_num_batched_tokens,
                                 max_requests_per_batch=args.max_num_seqs)
    report = tp.build_report(pageant, hf, hf_cb, config=config, max_model_len=args.max_model_len,
                             num_parameters=num_parameters, baselines=baselines, meta=_meta(args.device),
                             run_config={k: v for k, v in vars(args).items() if k != "func"})
    print(tp.format_report(report))
    rc = 0
    if hf_cb is not None and not hf_cb.extra["exact_lengths"]:
        print(f"HF continuous batching did not generate exactly the requested tokens "
              f"({hf_cb.output_tokens} of {hf_cb.extra['expected_tokens']}; first mismatches "
              f"{hf_cb.extra['length_mismatches']}, errors {hf_cb.extra['errors']}): its figure is not "
              f"like for like", file=sys.stderr)
        rc = 1
    if args.save_result:
        out_dir = Path(args.result_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        label = args.label or f"throughput_{args.device}"
        (out_dir / f"{label}.json").write_text(json.dumps(report, indent=1))
        tp.plot_report(report, out_dir / f"{label}.png")
        print(f"saved {out_dir / (label + '.json')} and {out_dir / (label + '.png')}")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pageant bench", description=__doc__)
    sub = parser.add_subparsers(dest="which", required=True)
    _serve_parser(sub)
    _throughput_parser(sub)
    args = parser.parse_args(argv)
    if args.which == "serve":
        return run_serve(args)
    return run_throughput(args)
