"""Step 4 of the GPU check: ``pageant serve`` on the Llama-3.1-8B shape, ``pageant bench serve`` at 3 rates.

The model folder holds the shape's ``config.json`` and a word-level tokenizer with one token per
vocabulary id (``w<id>``, split on whitespace), so that prompts of N words are N tokens and every
generated id of the 128,256 decodes to a non-empty word (a small BPE tokenizer would decode most
random ids to nothing, and a stream of empty deltas has no TTFT or TPOT). Prompt and output lengths
come from a synthetic ShareGPT file with ``sharegpt_like_lengths`` (``--dataset sharegpt``; lengths
are counted in words, here exactly the tokens).

``pageant serve`` has no ``--load-format`` flag, and writing 16 GB of random weights would take much
of the time limit, so the server is started through its own ``main`` with ``load_format="dummy"``
added to the engine's arguments (``SHIM``); everything else is the real command line. One
``pageant bench serve`` process per rate (``--save-result``), so a rate that runs out of time loses
only itself; the per-rate summaries (TTFT/TPOT/ITL/E2E percentiles, throughput) go to
``step4_serve.json``.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

from gpu_check import Deadline, ResultFile, settings

SHIM = ("import sys; import pageant.engine.server.cli as c; f = c.engine_kwargs; "
        "c.engine_kwargs = lambda *a, **k: {**f(*a, **k), 'load_format': 'dummy'}; sys.exit(c.main(sys.argv[1:]))")


def write_word_model_dir(path: pathlib.Path, shape: str) -> pathlib.Path:
    """``config.json`` of ``shape`` and a word-level tokenizer covering its whole vocabulary."""
    import e2e_gpu
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = e2e_gpu.SHAPES[shape]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, config["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def write_sharegpt_file(path: pathlib.Path, n: int, vocab: int, lengths: dict, seed: int = 0) -> pathlib.Path:
    """A ShareGPT-layout JSON whose turns have ``sharegpt_like_lengths`` words."""
    from pageant.engine.bench.datasets import sharegpt_like_lengths

    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(16, vocab)}" for _ in range(k))  # noqa: E731
    data = [{"conversations": [{"from": "human", "value": words(i)}, {"from": "gpt", "value": words(o)}]}
            for i, o in sharegpt_like_lengths(n, seed=seed, **lengths)]
    path.write_text(json.dumps(data))
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: pathlib.Path, cfg: dict, log: pathlib.Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    e = cfg["engine"]
    args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", cfg["device"],
            "--dtype", cfg["dtype"], "--max-num-seqs", str(e["max_num_seqs"]),
            "--max-num-batched-tokens", str(e["max_num_batched_tokens"]), "--max-model-len", str(e["max_model_len"])]
    args += (["--num-kv-blocks", str(e["num_kv_blocks"])] if "num_kv_blocks" in e
             else ["--gpu-memory-utilization", str(e["gpu_memory_utilization"])])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PAGEANT_API_KEY", None)
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", SHIM, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, limit: Deadline) -> float:
    import httpx

    start = time.perf_counter()
    while limit.left() > 0:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server was not ready within the time limit")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _summary(doc: dict) -> dict:
    s = doc["runs"][0]["summary"]
    keep = ("completed", "failed", "errors", "duration_s", "total_input_tokens", "total_output_tokens",
            "request_throughput", "output_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
    return {k: s[k] for k in keep if k in s}


def run_serve(args) -> int:
    import e2e_gpu

    cfg, limit = settings(args.dry_run), Deadline(args.time_limit)
    out = ResultFile(args.result_dir / "step4_serve.json", args.dry_run, "serve")
    rates = cfg["serve_rates"].split(",")
    out.update(shape=cfg["shape"], dtype=cfg["dtype"], num_prompts=cfg["serve_prompts"], lengths=cfg["lengths"],
               rates=rates, runs=[], note="server started through SHIM: pageant serve with load_format=dummy")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model_dir = write_word_model_dir(tmp / "model", cfg["shape"])
        dataset = write_sharegpt_file(tmp / "sharegpt.json", cfg["serve_prompts"],
                                      e2e_gpu.SHAPES[cfg["shape"]]["vocab_size"], cfg["lengths"])
        log = tmp / "server.log"
        proc, url = start_server(model_dir, cfg, log)
        try:
            out["server_ready_s"] = wait_ready(proc, url, limit)
            out.save()
            for rate in rates:
                if limit.left() < 5:
                    out["runs"].append({"request_rate": rate, "skipped": "time limit"})
                    continue
                cmd = [sys.executable, "-m", "pageant.cli", "bench", "serve", "--base-url", url, "--dataset", "sharegpt",
                       "--dataset-path", str(dataset), "--num-prompts", str(cfg["serve_prompts"]), "--request-rate",
                       rate, "--output-len", f"1:{cfg['lengths']['max_len']}", "--save-result", "--result-dir",
                       str(tmp), "--label", f"rate{rate}", "--no-progress"]
                try:
                    bench = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, limit.left()))
                except subprocess.TimeoutExpired:
                    out["runs"].append({"request_rate": rate, "error": "time limit"})
                    continue
                saved = tmp / f"rate{rate}.json"
                if bench.returncode not in (0, 1) or not saved.exists():
                    out["runs"].append({"request_rate": rate, "error": (bench.stdout + bench.stderr)[-1500:]})
                else:
                    out["runs"].append({"request_rate": rate, **_summary(json.loads(saved.read_text()))})
                    r = out["runs"][-1]
                    print(f"serve rate {rate}: {r['output_throughput']:.0f} output tok/s, TTFT p50 "
                          f"{r['ttft_ms']['median']:.0f} ms p99 {r['ttft_ms']['p99']:.0f} ms, TPOT p50 "
                          f"{r['tpot_ms']['median']:.1f} ms p99 {r['tpot_ms']['p99']:.1f} ms", flush=True)
                out.save()
            out["complete"] = all("ttft_ms" in r for r in out["runs"])
        except Exception as exc:  # noqa: BLE001 - recorded, and the step fails
            out["error"] = f"{type(exc).__name__}: {exc}"[:1500]
        finally:
            stop_server(proc)
            out["server_log_tail"] = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            out.save()
    return 0 if out["complete"] else 1
