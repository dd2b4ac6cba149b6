"""Speculative decoding: tokens/s with and without proposals, acceptance rate, mean acceptance length.

The target is the demo checkpoint (``engine/demo/checkpoint``, a 3.8M-parameter Llama trained on
Python's help topics). Two proposers: n-gram prompt lookup on a repetitive workload (a help-topic
passage, then its beginning again: the natural continuation copies the prompt, as in code editing
or summaries that quote), and a draft model trained like the demo model (``engine/demo/train.py``,
same corpus, tokenizer and recipe) but much smaller, on the same workload. Each at batch 1 and
``--batch``; greedy, ``ignore_eos``; every configuration interleaved in each round, the best of
``--repeats`` rounds kept. Outputs are checked equal to the non-speculative run's.

On the CPU (1 torch thread by default) throughput is output tokens per CPU-second of this process;
wall-clock figures are kept too. Writes ``benchmarks/results/spec_decode-<device>-<utc>.json`` and
a PNG beside it.

    python benchmarks/spec_decode.py                    # trains the draft first (a few minutes)
    python benchmarks/spec_decode.py --draft DIR        # reuse a trained draft
    python benchmarks/spec_decode.py --quick            # tiny settings (the test)
"""

from __future__ import annotations

import pathlib
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "engine" / "demo" / "checkpoint"
DRAFT_CONFIG = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1)


def parse_args(argv=None):
    from pageant.engine.bench.scripts import base_parser

    p = base_parser(__doc__, hidden=256, layers=4, out_default=ROOT / "benchmarks" / "results")
    p.add_argument("--target", default=str(DEMO), help="the target checkpoint (default: the demo model)")
    p.add_argument("--draft", default=None, help="a trained draft checkpoint (default: train one now)")
    p.add_argument("--draft-steps", type=int, default=600, help="training steps of the draft")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--prompt-len", type=int, default=96, help="tokens of passage before it is repeated")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="draft of 20 steps, 16 new tokens, batch 2, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.draft_steps, args.output_len, args.batch, args.repeats, args.prompt_len = 20, 16, 2, 1, 32
    return args


def train_draft(out: pathlib.Path, steps: int) -> str:
    """The demo recipe (engine/demo/train.py: corpus, tokenizer, optimiser) with a smaller model."""
    from pageant.engine.demo import train

    saved = dict(train.MODEL_CONFIG)
    train.MODEL_CONFIG.update(DRAFT_CONFIG)
    try:
        train.main(["--out", str(out), "--steps", str(steps)])
    finally:
        train.MODEL_CONFIG.clear()
        train.MODEL_CONFIG.update(saved)
    return str(out)


def workload(target: str, n: int, prompt_len: int) -> list[dict]:
    """A help-topic passage followed by its first half again (the continuation copies the prompt)."""
    from pydoc_data import topics
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    texts = [t for t in topics.topics.values() if len(t) > 2000]
    prompts = []
    for i in range(n):
        ids = tok(texts[(7 * i) % len(texts)]).input_ids[: prompt_len + 1]
        prompts.append({"prompt_token_ids": ids + ids[1 : 1 + prompt_len // 2]})
    return prompts


def plot(result: dict, path: pathlib.Path) -> None:
    from pageant.engine.bench.scripts import annotated_bars, figure, throughput_label

    batches = sorted({r["batch"] for r in result["runs"].values()})
    methods = ["none", "ngram", "draft_model"]
    width = 0.27
    with figure(path, figsize=(7, 4)) as (fig, ax):
        for m, method in enumerate(methods):  # one bar per method in each batch's group
            runs = [result["runs"][f"{method}-b{batch}"] for batch in batches]
            notes = [f"{run['speedup']:.2f}x" + ("" if method == "none" else f"\nacc {run['acceptance_rate']:.2f}"
                                                 f"\nlen {run['mean_acceptance_length']:.2f}") for run in runs]
            annotated_bars(ax, [b + (m - 1) * width for b in range(len(batches))], [r["tokens_per_s"] for r in runs],
                           notes, ["#777", "#3a7", "#37a"][m], fontsize=7, width=width, label=method)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel(throughput_label(result["timing"]))
        ax.set_title(f"Speculative decoding, k={result['settings']['k']}, {result['device']}\n"
                     "speed-up vs no speculation, acceptance rate, mean acceptance length", fontsize=9)
        ax.legend(fontsize=8)
        ax.set_ylim(0, max(r["tokens_per_s"] for r in result["runs"].values()) * 1.35)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pageant.engine import LLM, SamplingParams
    from pageant.engine.bench.scripts import interleaved_rounds, output_tokens, result_header, save_result, setup_device

    setup_device(args.device, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        draft = args.draft or train_draft(pathlib.Path(tmp) / "draft", args.draft_steps)
        prompts = workload(args.target, args.batch, args.prompt_len)
        sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        specs = {"none": None,
                 "ngram": {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2,
                           "prompt_lookup_max": 4},
                 "draft_model": {"model": draft, "num_speculative_tokens": args.k}}
        engines, reference = {}, {}
        for method, spec in specs.items():
            engines[method] = LLM(model=args.target, device=args.device, max_num_seqs=args.batch,
                                  speculative_config=spec)
        for method, llm in engines.items():  # warm-up, and the outputs every run must reproduce
            for batch in (1, args.batch):
                outs = [o.outputs[0].token_ids for o in llm.generate(prompts[:batch], sp, use_tqdm=False)]
                if reference.setdefault(batch, outs) != outs:
                    raise RuntimeError(f"{method} at batch {batch}: outputs differ from decoding without speculation")

        names = {f"{m}-b{b}": (m, b) for b in (1, args.batch) for m in specs}
        stats_at = {}

        def counted(name):
            method, batch = names[name]
            s0 = dict(engines[method].stats())
            n = output_tokens(engines[method], prompts[:batch], sp)
            s1 = engines[method].stats()
            acc = stats_at.setdefault(name, [0, 0, 0])
            for i, key in enumerate(("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                                     "spec_decode_num_accepted_tokens")):
                acc[i] += s1.get(key, 0) - s0.get(key, 0)
            return n

        runs = interleaved_rounds({n: (lambda n=n: counted(n)) for n in names}, args.repeats, args.device)
        for name, (method, batch) in names.items():
            drafts, drafted, accepted = stats_at[name]
            base = runs[f"none-b{batch}"]["tokens_per_s"]
            runs[name].update(method=method, batch=batch, speedup=runs[name]["tokens_per_s"] / base,
                              num_drafts=drafts, num_draft_tokens=drafted, num_accepted_tokens=accepted,
                              acceptance_rate=accepted / drafted if drafted else 0.0,
                              mean_acceptance_length=1 + accepted / drafts if drafts else 0.0)
            r = runs[name]
            print(f"{name:>15}: {r['tokens_per_s']:8.1f} tokens/s ({r['speedup']:.2f}x), acceptance rate "
                  f"{r['acceptance_rate']:.2f}, mean acceptance length {r['mean_acceptance_length']:.2f}")
        draft_params = sum(p.numel() for p in engines["draft_model"].engine.spec_decode.draft_proposer.runner
                           .model.parameters())
        target_params = sum(p.numel() for p in engines["none"].engine.runner.model.parameters())
        engines.clear()
    result = result_header("spec_decode", args)
    result["settings"].update(draft_config=DRAFT_CONFIG, draft_params=draft_params, target_params=target_params,
                              draft_trained_steps=None if args.draft else args.draft_steps)
    result["runs"] = runs
    path = save_result(result, args.out, "spec_decode", args.device, lambda png: plot(result, png))
    print(f"wrote {path} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
