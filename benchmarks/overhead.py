"""Host overhead per decode step: a near-zero model, so the step is almost all host work.

A random Llama of hidden 64 and 1 layer (``--hidden``, ``--layers``) makes the forward cost
next to nothing; what a decode step then costs is the engine's host work: scheduling, building the
model's inputs and the sampling batch, sampling's read-back, output processing and incremental
detokenization. For each batch size (``--batch-sizes``, default 1/16/64/256) the script queues that
many greedy ``ignore_eos`` requests with ``--prompt-len``-token prompts, runs their prefill, then
times ``--steps`` decode-only steps of ``LLMEngine.step()``; the forward is timed by wrapping
``engine.runner.execute`` (as ``pageant.engine.bench.scripts.peak_blocks_in_use`` does), so the
fraction of the step spent outside the forward is measured in the same steps. Per batch size: the
median step over ``--steps``, the best median over ``--repeats`` rounds (batch sizes interleaved
in every round, so load drift on a shared machine hits all alike). Wall-clock times (the step is
single-threaded host work; torch runs ``--threads`` threads).

Writes ``benchmarks/results/overhead-<device>-<utc time>.json`` and a PNG beside it.

    python benchmarks/overhead.py                 # CPU, about a minute on 2 cores
    python benchmarks/overhead.py --quick         # batch 1 and 16, few steps (the smoke test)
    python benchmarks/overhead.py --device cuda
"""

from __future__ import annotations

import pathlib
import statistics
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    from pageant.engine.bench.scripts import base_parser

    p = base_parser(__doc__, hidden=64, layers=1, out_default=ROOT / "benchmarks" / "results")
    p.add_argument("--batch-sizes", default="1,16,64,256", help="comma-separated decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per batch size and round")
    p.add_argument("--warmup-steps", type=int, default=8, help="decode steps run before timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="batch sizes 1 and 16, 8 steps, 1 round")
    p.add_argument("--output-kind", default="cumulative", choices=["cumulative", "delta", "final_only"],
                   help="the requests' SamplingParams.output_kind (cumulative: a full RequestOutput per "
                        "request per step, as a streaming client of LLMEngine gets; final_only: as LLM.generate)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.steps, args.warmup_steps, args.repeats = "1,16", 8, 2, 1
    try:
        args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise SystemExit("--batch-sizes needs at least one size, each >= 1")
    if args.steps < 1 or args.prompt_len < 1 or args.repeats < 1 or args.warmup_steps < 0:
        raise SystemExit("--steps, --prompt-len and --repeats must be >= 1, --warmup-steps >= 0")
    return args


class ForwardTimer:
    """Wraps ``engine.runner.execute``: the time of each forward and whether its step was decode-only."""

    def __init__(self, engine, device: str):
        self.engine, self.execute = engine, engine.runner.execute
        self.sync = device.startswith("cuda")
        self.last: tuple[float, bool] | None = None  # (seconds, decode only) of the latest forward

    def __enter__(self) -> "ForwardTimer":
        import torch

        def timed(so, inp):
            t0 = time.perf_counter()
            out = self.execute(so, inp)
            if self.sync:  # the forward's own time, not just its launch
                torch.cuda.synchronize()
            self.last = (time.perf_counter() - t0, so.num_decode_seqs == len(so.scheduled))
            return out

        self.engine.runner.execute = timed
        return self

    def __exit__(self, *exc) -> None:
        self.engine.runner.execute = self.execute


def measure(llm, batch: int, args, round_index: int) -> dict[str, float]:
    """Median step and forward time (seconds) of ``args.steps`` decode-only steps at ``batch``."""
    import torch

    from pageant.engine import RequestOutputKind, SamplingParams

    engine = llm.engine
    g = torch.Generator().manual_seed(round_index * 1000 + batch)
    sp = SamplingParams(temperature=0, max_tokens=args.warmup_steps + args.steps + 2, ignore_eos=True,
                        output_kind=RequestOutputKind[args.output_kind.upper()])
    for i in range(batch):
        prompt = [1] + torch.randint(3, 500, (args.prompt_len - 1,), generator=g).tolist()
        engine.add_request(f"r{round_index}-{batch}-{i}", prompt, sp)
    steps, forwards, warm = [], [], 0
    with ForwardTimer(engine, args.device) as timer:
        while engine.has_unfinished_requests() and len(steps) < args.steps:
            timer.last = None
            t0 = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - t0
            if timer.last is None or not timer.last[1]:
                continue  # a prefill (or empty) step: not timed
            warm += 1
            if warm <= args.warmup_steps:
                continue
            steps.append(elapsed)
            forwards.append(timer.last[0])
    engine.abort_request(list(engine.requests))
    if len(steps) < args.steps:
        raise RuntimeError(f"batch {batch}: only {len(steps)} decode-only steps ran")
    step, forward = statistics.median(steps), statistics.median(forwards)
    return {"step_s": step, "forward_s": forward}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["batches"]
    labels = [str(r["batch_size"]) for r in rows]
    fwd = [r["forward_ms"] for r in rows]
    host = [r["step_ms"] - r["forward_ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(labels, fwd, color="#3a7", label="forward (runner.execute)")
    bars = ax.bar(labels, host, bottom=fwd, color="#c84", label="host, outside the forward")
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['step_ms']:.2f} ms\n{100 * r['host_fraction']:.0f}% host",
                    (bar.get_x() + bar.get_width() / 2, r["step_ms"]), ha="center", va="bottom", fontsize=8)
    s = result["settings"]
    ax.set_xlabel("decode batch size")
    ax.set_ylabel("ms per decode step (median)")
    ax.set_title(f"Host time per decode step, hidden {s['hidden']}, {s['layers']} layer(s)\n{result['device']}",
                 fontsize=9)
    ax.set_ylim(0, max(r["step_ms"] for r in rows) * 1.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pageant.engine import LLM
    from pageant.engine.bench.scripts import result_header, save_result, setup_device, small_llama

    setup_device(args.device, args.threads)
    max_batch = max(args.batch_sizes)
    with tempfile.TemporaryDirectory() as tmp:
        path = small_llama(pathlib.Path(tmp) / "tiny", args.hidden, args.layers, max_position_embeddings=1024)
        llm = LLM(model=path, device=args.device, max_num_seqs=max_batch, max_model_len=1024,
                  max_num_batched_tokens=max(2048, max_batch * args.prompt_len))
        best: dict[int, dict[str, float]] = {}
        for r in range(args.repeats):
            for batch in args.batch_sizes:
                m = measure(llm, batch, args, r)
                if batch not in best or m["step_s"] < best[batch]["step_s"]:
                    best[batch] = m
        del llm
    result = result_header("overhead", args)
    result["timing"] = "wall"  # median wall-clock step times (the header's default is CPU-seconds on a CPU)
    result["batches"] = []
    for batch in args.batch_sizes:
        step, fwd = best[batch]["step_s"], best[batch]["forward_s"]
        row = {"batch_size": batch, "step_ms": 1e3 * step, "forward_ms": 1e3 * fwd,
               "host_ms": 1e3 * (step - fwd), "host_fraction": (step - fwd) / step,
               "host_us_per_seq": 1e6 * (step - fwd) / batch}
        result["batches"].append(row)
        print(f"batch {batch:>4}: {row['step_ms']:7.3f} ms/step, forward {row['forward_ms']:6.3f} ms, "
              f"{100 * row['host_fraction']:4.1f}% outside the forward ({row['host_us_per_seq']:.1f} us/seq)")
    out = save_result(result, args.out, "overhead", args.device, lambda png: plot(result, png))
    print(f"wrote {out} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
