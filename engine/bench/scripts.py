"""What the standalone benchmark scripts in ``benchmarks/`` share: the small random Llama they
build, their flags, prompts and timed rounds, the CPU/GPU setup, the header of their result, saving
it as JSON with a PNG beside it, and the pieces of their charts.

The scripts run as ``python benchmarks/X.py`` and import this module from the installed package.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import pathlib
import platform
from typing import Any, Callable, Iterator, Sequence


def small_llama(path: pathlib.Path, hidden: int, layers: int, **overrides: Any) -> str:
    """A random Llama checkpoint at ``path``: ``hidden`` wide (MLP 11/4 of it, heads of 64 but at
    least 4, half as many KV heads), ``layers`` deep; ``overrides`` go to the config."""
    from pageant.engine.testing import build_checkpoint

    heads = max(4, hidden // 64)
    return str(build_checkpoint(path, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=heads // 2, **overrides))


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def setup_device(device: str, threads: int) -> None:
    """On the CPU, torch runs ``threads`` intra-op threads (the scripts time CPU runs in CPU
    seconds of this process, so other processes on a shared machine skew them less)."""
    import torch

    if not is_cuda(device):
        torch.set_num_threads(threads)


def device_label(device: str) -> str:
    """The GPU's name, or ``cpu (<processor>, <n> threads)``."""
    import torch

    if is_cuda(device):
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def result_header(benchmark: str, args: Any) -> dict[str, Any]:
    """The fields every script's result starts with; ``settings`` are the arguments but ``--out``,
    ``timing`` says whether throughputs are per CPU-second (``cpu``) or per second (``wall``)."""
    import torch

    return {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_label(args.device),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "timing": "wall" if is_cuda(args.device) else "cpu",
    }


def save_result(result: dict[str, Any], out_dir: str | pathlib.Path, prefix: str, device: str,
                plot: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Write ``<out_dir>/<prefix>-<cpu|cuda>-<UTC time>.json`` and ``plot(<same>.png)``; returns
    the JSON's path."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}-{'cuda' if is_cuda(device) else 'cpu'}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1))
    plot(path.with_suffix(".png"))
    return path


def base_parser(doc: str, *, hidden: int, layers: int, out_default: pathlib.Path):
    """The flags every model benchmark script has: --device, --hidden, --layers, --threads, --out."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs are timed in CPU seconds)")
    p.add_argument("--out", default=str(out_default))
    return p


def add_workload_args(p, *, num_prompts: int, prompt_len: int = 64, output_len: int = 32, repeats: int = 3) -> None:
    """The flags of a batch of random prompts timed over rounds: --num-prompts, --prompt-len,
    --output-len, --repeats."""
    p.add_argument("--num-prompts", type=int, default=num_prompts)
    p.add_argument("--prompt-len", type=int, default=prompt_len)
    p.add_argument("--output-len", type=int, default=output_len)
    p.add_argument("--repeats", type=int, default=repeats)


def random_token_prompts(num_prompts: int, prompt_len: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """``num_prompts`` token-id prompts of ``prompt_len`` tokens: BOS (1), then ids drawn from
    ``[3, 500)`` by a torch generator seeded with ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": [1] + torch.randint(3, 500, (prompt_len - 1,), generator=g).tolist()}
            for _ in range(num_prompts)]


def greedy_workload(args) -> tuple[list[dict[str, list[int]]], Any]:
    """The work ``add_workload_args``' flags describe: ``--num-prompts`` random prompts of
    ``--prompt-len`` tokens (``random_token_prompts``, seed 0) and greedy ``SamplingParams`` of
    ``--output-len`` tokens, ``ignore_eos``."""
    from pageant.engine import SamplingParams

    return (random_token_prompts(args.num_prompts, args.prompt_len),
            SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True))


def warm_up(llm, prompts: list, num_prompts: int = 2, max_tokens: int = 2) -> None:
    """A greedy untimed run of an ``LLM`` on the first ``num_prompts`` prompts."""
    from pageant.engine import SamplingParams

    llm.generate(prompts[:num_prompts], SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)


def output_tokens(llm, prompts: list, sampling_params) -> int:
    """Run ``prompts`` through an ``LLM``; the number of output tokens (what a timed run returns)."""
    return sum(len(o.outputs[0].token_ids) for o in llm.generate(prompts, sampling_params, use_tqdm=False))


def interleaved_rounds(runs: dict[str, Callable[[], int]], repeats: int, device: str) -> dict[str, dict[str, Any]]:
    """Call every run once per round, ``repeats`` rounds, runs interleaved in each round (load drift
    on a shared machine hits all alike). A run returns its output token count. Per name: the token
    count, throughput at the best round (per CPU-second of this process on the CPU, per second on a
    GPU), the wall-clock throughput, and every round's times."""
    import time

    from tqdm.auto import tqdm

    cpu: dict[str, list[float]] = {n: [] for n in runs}
    wall: dict[str, list[float]] = {n: [] for n in runs}
    tokens: dict[str, int] = {}
    for _ in tqdm(range(repeats), desc="rounds"):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            tokens[name] = run()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    best = {n: min(wall[n]) if is_cuda(device) else min(cpu[n]) for n in runs}
    return {n: {"output_tokens": tokens[n], "tokens_per_s": tokens[n] / best[n],
                "wall_tokens_per_s": tokens[n] / min(wall[n]), "cpu_seconds": cpu[n], "wall_seconds": wall[n]}
            for n in runs}


def peak_blocks_in_use(llm, run: Callable[[], Any]) -> int:
    """The most KV blocks held by sequences while any forward ran during ``run()`` (an ``LLM``'s)."""
    engine, peak = llm.engine, [0]
    execute = engine.runner.execute

    def recording(so, inp):
        bm = engine.block_manager
        peak[0] = max(peak[0], bm.num_blocks - bm.num_free_blocks)
        return execute(so, inp)

    engine.runner.execute = recording
    try:
        run()
    finally:
        engine.runner.execute = execute
    return peak[0]


def throughput_label(timing: str, what: str = "output tokens") -> str:
    """A throughput axis label: ``<what> / CPU-second`` for CPU timing, ``<what> / s`` otherwise."""
    return f"{what} / {'CPU-second' if timing == 'cpu' else 's'}"


@contextlib.contextmanager
def figure(path: str | pathlib.Path, *subplots_args: Any, **subplots_kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``(fig, axes)`` of headless ``plt.subplots(...)``; on exit the figure is laid out tight and
    saved to ``path`` at 120 dpi."""
    from pageant.engine.bench.plots import _plt

    fig, axes = _plt().subplots(*subplots_args, **subplots_kwargs)
    yield fig, axes
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def annotated_bars(ax, x: Sequence, heights: Sequence[float], notes: Sequence[str], color: Any,
                   fontsize: float | None = None, **bar_kwargs: Any):
    """``ax.bar(x, heights, color=color, **bar_kwargs)`` with ``notes[i]`` centred above bar ``i``;
    returns the bars."""
    bars = ax.bar(x, heights, color=color, **bar_kwargs)
    text = {} if fontsize is None else {"fontsize": fontsize}
    for bar, note in zip(bars, notes):
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", **text)
    return bars
