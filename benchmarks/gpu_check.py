"""The Python half of ``benchmarks/gpu_check.sh``: one subcommand per step, each writing its JSON.

    python benchmarks/gpu_check.py STEP --result-dir DIR [--dry-run] [--time-limit SECONDS]

- ``tests --report FILE``: step 1's report (``gpu_check_summary.py``): pytest's per-test JSON lines
  (tests/gpu/conftest.py writes them while the run goes) -> ``step1_tests.json``.
- ``decode``: step 2, decode step time of the Llama-3.1-8B shape (random bf16 weights,
  ``load_format="dummy"``) at batch 1/8/64/256 x context 128/1024/4096 against the roofline
  ``(weight bytes + batch * context * KV bytes per token) / copy bandwidth`` -> ``step2_decode.json``.
- ``throughput --side pageant|hf|hf_cb``: step 3, output tokens/s on ShareGPT-like lengths (mean
  ~200 in / ~180 out, ignore_eos): Pageant on every request and on the first ``hf_num_requests``;
  transformers ``generate`` in static left-padded batches (random weights made in memory: with
  ignore_eos the work does not depend on them); transformers' continuous batching (the manager
  behind ``generate_batch``, one ``max_new_tokens`` per request); both HF sides come from
  ``pageant.engine.bench.hf_baselines``, shared with ``pageant bench throughput`` -> ``step3_throughput.json``.
- ``serve``: step 4 (``gpu_check_serve.py``); ``summary``: goals, PNG, text (``gpu_check_summary.py``);
  ``wheels DIR``: the carried wheels this machine lacks (absent, or older than the wheel).

Every file starts with the same header (``header()``) and is rewritten after each measurement, so a
step stopped by its time limit keeps what it measured (``"complete": false``). ``--dry-run`` runs the
same code on the CPU with the tiny shape (``settings``). Uses only torch 2.11 / triton 3.6 /
transformers 5.17-era APIs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import platform
import random
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# batches in order of value (the goals are at batch 1 and 64), so a step out of time loses the others
GPU = dict(shape="llama3.1-8b", device="cuda", dtype="bfloat16", batches=(1, 64, 8, 256), contexts=(128, 1024, 4096),
           decode_steps=20, engine=dict(max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=4096 + 256,
                                        gpu_memory_utilization=0.9),
           num_requests=1000, hf_num_requests=128, hf_batch_sizes=(128, 64, 32), hf_cb={},  # {}: sized by transformers
           lengths=dict(mean_in=200, mean_out=180, max_len=1024), serve_rates="8,32,inf", serve_prompts=64)
DRY = dict(shape="tiny", device="cpu", dtype="bfloat16", batches=(1, 4), contexts=(16, 48), decode_steps=3,
           engine=dict(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=256, num_kv_blocks=128),
           num_requests=12, hf_num_requests=6, hf_batch_sizes=(4, 2), lengths=dict(mean_in=20, mean_out=8, max_len=40),
           hf_cb=dict(block_size=16, num_blocks=64, max_batch_tokens=256),
           serve_rates="20,50,inf", serve_prompts=5)
HEADER_FIELDS = ("date", "git_commit", "device", "driver", "cuda", "torch", "triton", "transformers", "python",
                 "host", "dry_run")


def settings(dry_run: bool) -> dict:
    return dict(DRY if dry_run else GPU)


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def header(dry_run: bool) -> dict:
    """Where and with what a result was measured (the same fields in every result file)."""
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": os.environ.get("PAGEANT_COMMIT") or "unknown",
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
            "driver": _driver() if cuda else None, "cuda": torch.version.cuda, "torch": torch.__version__,
            "triton": triton_version, "transformers": transformers.__version__,
            "python": platform.python_version(), "host": platform.node(), "dry_run": dry_run}


class ResultFile(dict):
    """A step's JSON: the header, then its figures; ``save()`` rewrites it (atomically). Written at
    once, so a step that fails early still leaves its header and, through ``main``, its error."""

    current: "ResultFile | None" = None

    def __init__(self, path: pathlib.Path, dry_run: bool, step: str, merge: bool = False):
        old = json.loads(path.read_text()) if merge and path.exists() else {}
        super().__init__(old or {**header(dry_run), "step": step, "complete": False})
        self.path = path
        ResultFile.current = self
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        tmp.replace(self.path)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy (read + write); e2e_gpu's on CUDA, 64 MiB timed on the CPU."""
    import e2e_gpu
    import torch

    if device.startswith("cuda"):
        return e2e_gpu.copy_bandwidth(device)
    src = torch.randn(2**24)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 2 * src.numel() * 4 * 5 / (time.perf_counter() - start)


def sharegpt_requests(n: int, vocab: int, lengths: dict, seed: int = 0) -> list[tuple[list[int], int]]:
    from pageant.engine.bench.datasets import sharegpt_like_lengths

    rng = random.Random(seed)
    return [([rng.randrange(16, vocab) for _ in range(i)], o) for i, o in sharegpt_like_lengths(n, seed=seed, **lengths)]


# ----------------------------------------------------------------------------------------- step 2
def _engine(cfg: dict, model_dir: pathlib.Path):
    import e2e_gpu

    return e2e_gpu.build_engine(model_dir, device=cfg["device"], dtype=cfg["dtype"], **cfg["engine"])


def run_decode(args) -> int:
    import e2e_gpu

    cfg, limit = settings(args.dry_run), Deadline(args.time_limit)
    out = ResultFile(args.result_dir / "step2_decode.json", args.dry_run, "decode")
    out.update(shape=cfg["shape"], dtype=cfg["dtype"], points=[], skipped=[])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = e2e_gpu.write_model_dir(pathlib.Path(tmp) / "model", cfg["shape"])
        bandwidth = copy_bandwidth(cfg["device"])
        start = time.perf_counter()
        engine = _engine(cfg, model_dir)
        w_bytes = e2e_gpu.weight_bytes(engine)
        mc = engine.model_config
        kv_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * engine.runner.kv_cache.element_size()
        pool = engine.config.num_kv_blocks * engine.config.block_size
        out.update(copy_bandwidth_gb_s=bandwidth / 1e9, weight_bytes=w_bytes, kv_bytes_per_token=kv_per_token,
                   pool_tokens=pool, cuda_graphs=engine.runner.graphs is not None,
                   engine_build_s=time.perf_counter() - start)
        out.save()
        for batch in cfg["batches"]:
            for context in cfg["contexts"]:
                longest = context + e2e_gpu.decode_max_tokens(engine, batch, context, cfg["decode_steps"])
                why = ("time limit" if limit.left() < 5
                       else "larger than max_num_seqs" if batch > cfg["engine"]["max_num_seqs"]
                       else "KV does not fit the pool" if batch * longest > pool
                       else "longer than max_model_len" if longest > engine.config.max_model_len else None)
                if why:
                    out["skipped"].append({"batch": batch, "context": context, "why": why})
                    continue
                step = e2e_gpu.decode_step_time(engine, batch, context, cfg["decode_steps"])
                roof = (w_bytes + batch * context * kv_per_token) / bandwidth
                out["points"].append({"batch": batch, "context": context, "step_ms": step * 1e3, "roofline_ms": roof * 1e3,
                                      "x_roofline": step / roof, "bandwidth_fraction": roof / step,
                                      "tokens_per_s": batch / step})
                print(f"decode batch {batch:4d} context {context:5d}: {step * 1e3:8.2f} ms/step "
                      f"(roofline {roof * 1e3:.2f} ms, {roof / step:.0%} of the bandwidth)", flush=True)
                out.save()
    out["complete"] = True
    out.save()
    return 0


# ----------------------------------------------------------------------------------------- step 3
def pageant_run(engine, requests, limit: Deadline, tag: str) -> dict:
    """Every request queued at once; output tokens/s of the finished ones (all, unless out of time)."""
    from pageant.engine import SamplingParams

    _sync(engine.config.device)
    start, tokens, done = time.perf_counter(), 0, 0
    for i, (ids, n) in enumerate(requests):
        engine.add_request(f"{tag}{i}", {"prompt_token_ids": ids},
                           SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    peak = 0
    while engine.has_unfinished_requests() and limit.left() > 0:
        for o in engine.step():
            if o.finished:
                tokens, done = tokens + len(o.outputs[0].token_ids), done + 1
        peak = max(peak, engine.stats()["num_requests_running"])
    seconds = time.perf_counter() - start
    if engine.has_unfinished_requests():
        engine.abort_request([f"{tag}{i}" for i in range(len(requests))])
    return {"num_requests": len(requests), "finished": done, "complete": done == len(requests), "seconds": seconds,
            "output_tokens": tokens, "output_tokens_per_s": tokens / seconds if seconds else 0.0,
            "prompt_tokens": sum(len(i) for i, _ in requests), "peak_running": peak}


def _hf_model(model_dir: pathlib.Path, cfg: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device(cfg["device"]):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=getattr(torch, cfg["dtype"]))
    return model.eval()


def run_throughput(args) -> int:
    import e2e_gpu

    from pageant.engine.bench.hf_baselines import hf_continuous, hf_static

    cfg, limit = settings(args.dry_run), Deadline(args.time_limit)
    out = ResultFile(args.result_dir / "step3_throughput.json", args.dry_run, "throughput", merge=True)
    out.update(shape=cfg["shape"], dtype=cfg["dtype"], lengths=cfg["lengths"])
    out.setdefault("sides_done", [])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = e2e_gpu.write_model_dir(pathlib.Path(tmp) / "model", cfg["shape"])
        vocab = e2e_gpu.SHAPES[cfg["shape"]]["vocab_size"]
        requests = sharegpt_requests(cfg["num_requests"], vocab, cfg["lengths"])
        subset = requests[:cfg["hf_num_requests"]]
        if args.side == "pageant":  # the like-for-like set first: the 10x goal needs it
            engine = _engine(cfg, model_dir)
            pageant_run(engine, sharegpt_requests(16, vocab, cfg["lengths"], seed=1), limit, "w")  # warm-up
            out["pageant_hf_set"] = pageant_run(engine, subset, limit, "h")
            out.save()
            out["pageant"] = pageant_run(engine, requests, limit, "t")
            print(f"pageant: {out['pageant']['output_tokens_per_s']:.0f} output tok/s ({len(requests)} requests), "
                  f"{out['pageant_hf_set']['output_tokens_per_s']:.0f} on the {len(subset)}-request set", flush=True)
        elif args.side == "hf":
            model = _hf_model(model_dir, cfg)
            hf_static(model, [(subset[0][0][:8], 2)], 1)  # warm-up
            out["hf_generate"], last = [], 0.0
            for b in cfg["hf_batch_sizes"]:
                if limit.left() < 1.3 * last:
                    out["hf_generate"].append({"batch_size": b, "skipped": "time limit"})
                    continue
                r = hf_static(model, subset, b)
                last = r["seconds"]
                out["hf_generate"].append(r)
                out.save()
                print(f"hf generate batch {b}: {r['output_tokens_per_s']:.0f} output tok/s ({r['seconds']:.1f} s)",
                      flush=True)
        else:
            model = _hf_model(model_dir, cfg)
            out["hf_continuous_batching"] = hf_continuous(model, subset, time_limit=limit.left(), **cfg["hf_cb"])
            print(f"hf continuous batching: {out['hf_continuous_batching']['output_tokens_per_s']:.0f} output tok/s",
                  flush=True)
    out["sides_done"] = sorted(set(out["sides_done"]) | {args.side})
    out["complete"] = set(out["sides_done"]) == {"pageant", "hf", "hf_cb"}
    out.save()
    return 0


# ----------------------------------------------------------------------------------------- wheels
def wheels_to_install(folder: pathlib.Path) -> list[pathlib.Path]:
    """The wheels in ``folder`` whose distribution is absent here or older than the wheel's."""
    import importlib.metadata as md

    try:
        from packaging.version import Version
    except ImportError:  # a bare interpreter: numeric parts are enough for these pins
        def Version(text: str) -> tuple:  # noqa: N802
            return tuple(int(p) for p in text.split(".") if p.isdigit())

    picked = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = None
        if have is None or Version(have) < Version(version):
            picked.append(wheel)
    return picked


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["header", "tests", "decode", "throughput", "serve", "summary", "wheels"])
    ap.add_argument("folder", nargs="?", type=pathlib.Path, help="wheels: the folder of wheels")
    ap.add_argument("--result-dir", type=pathlib.Path, default=pathlib.Path("."))
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds this step may take")
    ap.add_argument("--side", choices=["pageant", "hf", "hf_cb"], default="pageant")
    ap.add_argument("--report", type=pathlib.Path, help="tests: pytest's JSON lines")
    ap.add_argument("--rc", type=int, default=None, help="tests: pytest's exit status")
    ap.add_argument("--status", type=pathlib.Path, help="summary: the shell's step status lines")
    args = ap.parse_args(argv)
    if args.step == "wheels":
        print("\n".join(str(w) for w in wheels_to_install(args.folder)))
        return 0
    if args.step == "header":
        print(json.dumps(header(args.dry_run)))
        return 0
    args.result_dir.mkdir(parents=True, exist_ok=True)
    if args.step == "serve":
        import gpu_check_serve

        return gpu_check_serve.run_serve(args)
    if args.step in ("summary", "tests"):
        import gpu_check_summary

        return (gpu_check_summary.run_summary if args.step == "summary" else gpu_check_summary.run_tests_report)(args)
    try:
        return {"decode": run_decode, "throughput": run_throughput}[args.step](args)
    except Exception as exc:  # keep the error in the step's file, then fail the step
        out = ResultFile.current
        if out is not None:
            name = args.step + (f" {args.side}" if args.step == "throughput" else "")
            out.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:1500]
            out.save()
        raise


if __name__ == "__main__":
    sys.exit(main())
