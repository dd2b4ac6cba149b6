"""Online vs offline throughput: ``/v1/completions`` under load against ``LLM.generate`` on the same requests.

A random Llama or ``--model``. ``--build-size custom`` (the default) is ``--hidden`` wide (512) and
``--layers`` deep (8), about 24M parameters, with the vocabulary of its tokenizer (512 ids), so that
every generated token has text and a stream sends a chunk per token, as a real model's does; the
sizes of ``pageant bench throughput`` (``tiny``, ``24m``, ``30m``: ``build_bench_checkpoint``) have 1024
or 8192 ids over that 512-id tokenizer, so most of their tokens decode to nothing and their streams
send little more than the final chunk (a lighter load than real). ``--num-prompts`` requests with
token-id prompts of ``--input-len`` tokens and fixed output lengths of ``--output-len`` (ranges MIN:MAX,
drawn with ``--seed``), greedy, ``ignore_eos``. Each round runs, in this order, the same requests:

* ``offline``: one ``LLM.generate`` call in this process;
* ``online stream``: ``pageant serve`` in a subprocess with the same engine arguments and torch threads
  (``OMP_NUM_THREADS``), every request sent at once (request rate inf) to ``/v1/completions`` with
  ``stream: true`` (``pageant.engine.bench.serve.run_serve_benchmark``, as ``pageant bench serve``);
* ``online plain``: the same with ``stream: false`` (one JSON body per request).

Every output, offline and online, must have exactly its requested token count (the script fails
otherwise); how many online texts equal the offline ones is reported (greedy: all, unless batch
composition changes float rounding). Figures are wall-clock output tokens per second, the best of
``--repeats`` rounds, with the server's CPU seconds in each online run (user + system, all threads) and
the client's (this process). The issue's target: online (rate inf) within 15% of offline, a ratio >= 0.85.

Writes ``benchmarks/results/online-offline-<device>-<utc time>.json`` and a PNG beside it.

    python benchmarks/online_offline.py                  # 24M model, 48 requests, about 3 min on 2 cores
    python benchmarks/online_offline.py --quick          # hidden 64, 2 layers, 8 short requests (smoke test)
    python benchmarks/online_offline.py --device cuda --threads 4
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.85
MODES = ("stream", "plain")


def parse_args(argv=None):
    from pageant.engine.bench.scripts import base_parser

    p = base_parser(__doc__, hidden=512, layers=8, out_default=ROOT / "benchmarks" / "results")
    p.add_argument("--model", default=None, help="a checkpoint directory (default: build --build-size)")
    p.add_argument("--build-size", default="custom",
                   help="random Llama to build: custom (--hidden, --layers, the tokenizer's vocabulary) or a "
                        "size of pageant.engine.bench.cli.build_bench_checkpoint (tiny, 24m, 30m)")
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--input-len", default="16:256", help="prompt length range MIN:MAX (tokens)")
    p.add_argument("--output-len", default="16:128", help="output length range MIN:MAX (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                   help="on a GPU, each engine's share (the in-process LLM and the server's use one GPU together)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of offline, online stream, online plain")
    p.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for the server's /ready")
    p.add_argument("--quick", action="store_true",
                   help="custom model of hidden 64 and 2 layers, 8 requests of 8..32 + 4..16 tokens, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.build_size, args.hidden, args.layers = "custom", 64, 2
        args.num_prompts, args.input_len, args.output_len, args.repeats = 8, "8:32", "4:16", 1
    from pageant.engine.bench.datasets import parse_range

    try:
        args.input_range, args.output_range = parse_range(args.input_len), parse_range(args.output_len)
    except ValueError as exc:
        raise SystemExit(f"--input-len/--output-len: {exc}") from None
    if args.num_prompts < 1 or args.repeats < 1 or args.threads < 1:
        raise SystemExit("--num-prompts, --repeats and --threads must be >= 1")
    if args.input_range[1] + args.output_range[1] > args.max_model_len:
        raise SystemExit(f"--max-model-len {args.max_model_len} must hold the longest prompt plus output "
                         f"({args.input_range[1]} + {args.output_range[1]})")
    return args


def build_model(args, tmp: pathlib.Path) -> str:
    """``--model``, or a random checkpoint of ``--build-size`` in ``tmp``."""
    if args.model:
        return args.model
    if args.build_size == "custom":
        from pageant.engine.bench.scripts import small_llama

        return small_llama(tmp / "ckpt", args.hidden, args.layers, max_position_embeddings=2048)
    from pageant.engine.bench.cli import build_bench_checkpoint

    try:
        return str(build_bench_checkpoint(tmp / "ckpt", args.build_size))
    except (KeyError, ValueError) as exc:  # an unknown size
        raise SystemExit(f"--build-size {args.build_size!r}: neither custom nor a size of build_bench_checkpoint "
                         f"({exc})") from None


def make_workload(args, vocab_size: int):
    """The requests as ``BenchRequest``s (token-id prompts, exact output lengths)."""
    from pageant.engine.bench.datasets import BenchRequest
    from pageant.engine.bench.throughput import make_requests

    reqs = make_requests(args.num_prompts, args.input_range, args.output_range, vocab_size, args.seed)
    return [BenchRequest(ids, len(ids), n) for ids, n in reqs]


def engine_args(args) -> dict:
    """What both sides are started with (``LLM(**)`` keywords; the same flags for ``pageant serve``)."""
    kwargs = {"dtype": args.dtype, "device": args.device, "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens, "max_model_len": args.max_model_len,
              "seed": args.seed}
    if args.device.startswith("cuda"):
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    return kwargs


# ---------------------------------------------------------------------- offline
def run_offline(llm, requests) -> tuple[float, list[str]]:
    """One ``LLM.generate`` over every request: (seconds, texts); raises if a length is off."""
    from pageant.engine import SamplingParams

    prompts = [{"prompt_token_ids": list(r.prompt)} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    for i, (r, out) in enumerate(zip(requests, outs)):
        got = len(out.outputs[0].token_ids)
        if got != r.output_len:
            raise RuntimeError(f"offline request {i}: {got} output tokens, {r.output_len} asked for")
    return seconds, [out.outputs[0].text for out in outs]


# ---------------------------------------------------------------------- online
class Server:
    """``pageant serve`` in a subprocess on a free 127.0.0.1 port (log in ``log_path``)."""

    def __init__(self, model: str, kwargs: dict, threads: int, log_path: pathlib.Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
        cmd = [sys.executable, "-m", "pageant.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), *flags, "--served-model-name", "bench", "--disable-log-requests",
               "--uvicorn-log-level", "warning", "--generation-config", "vllm"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        env.pop("PAGEANT_API_KEY", None)
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pageant serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"pageant serve not ready after {timeout:.0f}s:\n{self.output()}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process so far (all its threads)."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_online(server: Server, requests, stream: bool) -> dict:
    """Every request at once to ``/v1/completions``: the summary, the texts, the server's and the
    client's CPU seconds; raises if a request failed or a length is off."""
    from pageant.engine.bench.serve import run_serve_benchmark, summarize

    cpu0, client0 = server.cpu_seconds(), time.process_time()
    results, duration = asyncio.run(run_serve_benchmark(server.base_url, "bench", requests, stream=stream,
                                                        progress=False))
    cpu, client = server.cpu_seconds() - cpu0, time.process_time() - client0
    for i, (r, res) in enumerate(zip(requests, results)):
        if not res.success:
            raise RuntimeError(f"online request {i} ({'stream' if stream else 'plain'}) failed: {res.error}")
        if res.output_tokens != r.output_len:
            raise RuntimeError(f"online request {i}: {res.output_tokens} output tokens, {r.output_len} asked for")
    return {"summary": summarize(results, duration), "texts": [res.text for res in results],
            "server_cpu_s": cpu, "client_cpu_s": client}


# ---------------------------------------------------------------------- report
def plot(result: dict, path: pathlib.Path) -> None:
    from pageant.engine.bench.scripts import annotated_bars, figure

    names = ["offline\nLLM.generate"] + [f"online {m}\n/v1/completions" for m in MODES]
    values = [result["offline"]["output_tokens_per_s"]] + [result["online"][m]["output_tokens_per_s"] for m in MODES]
    notes = [f"{values[0]:.0f}"] + [f"{v:.0f}\n{result['ratio'][m]:.2f}x" for v, m in zip(values[1:], MODES)]
    with figure(path, figsize=(6, 4)) as (_, ax):
        annotated_bars(ax, names, values, notes, ["#3a7", "#c84", "#48c"], fontsize=8)
        ax.axhline(TARGET_RATIO * values[0], color="#888", linestyle="--", linewidth=1,
                   label=f"target: {TARGET_RATIO:.2f}x offline")
        ax.set_ylabel("output tokens / s (wall, best round)")
        w = result["workload"]
        ax.set_title(f"Online (rate inf) vs offline, {w['num_requests']} requests, {w['output_tokens']} output "
                     f"tokens\n{result['model']}, {result['device']}", fontsize=9)
        ax.set_ylim(0, max(values) * 1.3)
        ax.legend(fontsize=8, loc="upper right")


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoConfig

    from pageant.engine import LLM
    from pageant.engine.bench.scripts import result_header, save_result, setup_device, warm_up

    setup_device(args.device, args.threads)
    kwargs = engine_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args, pathlib.Path(tmp))
        requests = make_workload(args, AutoConfig.from_pretrained(model).vocab_size)
        server = Server(model, kwargs, args.threads, pathlib.Path(tmp) / "server.log")
        try:
            llm = LLM(model=model, **kwargs)  # loads while the server starts
            warm_up(llm, [{"prompt_token_ids": list(r.prompt)} for r in requests])
            server.wait_ready(args.server_timeout)
            run_online(server, requests[:2], stream=True)  # warm-up
            offline, online = [], {m: [] for m in MODES}
            for _ in range(args.repeats):
                offline.append(run_offline(llm, requests))
                for mode in MODES:
                    online[mode].append(run_online(server, requests, stream=mode == "stream"))
        except BaseException:
            print(server.output(), file=sys.stderr)
            raise
        finally:
            server.stop()
    num_tokens = sum(r.output_len for r in requests)
    best_offline = min(s for s, _ in offline)
    offline_texts = offline[0][1]
    result = result_header("online-offline", args)
    result["timing"] = "wall"
    for key in ("input_range", "output_range"):
        result["settings"].pop(key, None)
    result["model"] = args.model or (f"random llama, hidden {args.hidden}, {args.layers} layers"
                                     if args.build_size == "custom" else f"random llama {args.build_size}")
    result["workload"] = {"num_requests": len(requests), "prompt_tokens": sum(r.prompt_len for r in requests),
                          "output_tokens": num_tokens}
    result["offline"] = {"seconds": [s for s, _ in offline], "output_tokens_per_s": num_tokens / best_offline}
    result["online"], result["ratio"] = {}, {}
    for mode in MODES:
        runs = online[mode]
        best = min(runs, key=lambda r: r["summary"]["duration_s"])
        s = best["summary"]
        result["online"][mode] = {
            "seconds": [r["summary"]["duration_s"] for r in runs], "output_tokens_per_s": s["output_throughput"],
            "server_cpu_s": best["server_cpu_s"], "client_cpu_s": best["client_cpu_s"],
            "ttft_ms": s["ttft_ms"], "tpot_ms": s["tpot_ms"], "e2e_ms": s["e2e_ms"],
            "texts_equal_offline": sum(a == b for a, b in zip(best["texts"], offline_texts)),
        }
        result["ratio"][mode] = s["output_throughput"] / result["offline"]["output_tokens_per_s"]
    result["target_ratio"] = TARGET_RATIO
    result["meets_target"] = {m: result["ratio"][m] >= TARGET_RATIO for m in MODES}
    print(f"offline LLM.generate: {result['offline']['output_tokens_per_s']:8.1f} output tok/s "
          f"({best_offline:.2f} s, {num_tokens} tokens)")
    for mode in MODES:
        o = result["online"][mode]
        print(f"online {mode:>6}:        {o['output_tokens_per_s']:8.1f} output tok/s, "
              f"ratio {result['ratio'][mode]:.3f} "
              f"(server {o['server_cpu_s']:.2f} CPU-s, client {o['client_cpu_s']:.2f} CPU-s, "
              f"{o['texts_equal_offline']}/{len(requests)} texts equal offline)")
    out = save_result(result, args.out, "online-offline", args.device, lambda png: plot(result, png))
    print(f"wrote {out} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
