"""PNG plots for the benchmark results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_serve(results_by_label: dict[str, list], path: Path, bin_s: float | None = None) -> Path:
    """Latency CDFs (TTFT, TPOT, ITL, E2E) and output tokens/s over time, one line per run."""
    import numpy as np

    plt = _plt()
    if bin_s is None:  # about 30 bins over the longest run, at least 100 ms each
        ends = [t for results in results_by_label.values() for r in results for t in r.chunk_times[-1:]]
        bin_s = max(max(ends, default=1.0) / 30, 0.1)
    fig, axes = plt.subplots(1, 5, figsize=(24, 4.2))
    for label, results in results_by_label.items():
        ok = [r for r in results if r.success]
        series = {
            "TTFT (ms)": [r.ttft * 1000 for r in ok],
            "TPOT (ms)": [(r.latency - r.ttft) / (r.output_tokens - 1) * 1000 for r in ok if r.output_tokens > 1],
            "ITL (ms)": [x * 1000 for r in ok for x in r.itl],
            "E2E latency (s)": [r.latency for r in ok],
        }
        for ax, (name, values) in zip(axes[:4], series.items()):
            if values:
                v = np.sort(np.asarray(values))
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
            ax.set_xlabel(name)
            ax.set_ylabel("fraction of requests" if name != "ITL (ms)" else "fraction of tokens")
            ax.grid(alpha=0.3)
        times = [t for r in ok for t in r.chunk_times]
        if times:
            edges = np.arange(0.0, max(times) + 2 * bin_s, bin_s)
            counts, _ = np.histogram(times, bins=edges)
            axes[4].step(edges[:-1], counts / bin_s, where="post", label=label)
    axes[4].set_xlabel("time since start (s)")
    axes[4].set_ylabel("streamed output chunks/s (≈ tokens/s)")
    axes[4].grid(alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("pageant bench serve: latency CDFs and throughput over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

