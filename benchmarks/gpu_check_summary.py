"""The GPU check's reports: step 1's (``run_tests_report``) and the last step, ``run_summary``: the
goals, ``gpu_check.json``, ``summary.txt`` and ``gpu_check.png``.

Reads the step files (``step1_tests.json`` ... ``step4_serve.json``, whichever exist) and the shell's
status lines (``name rc seconds limit`` per step), and judges the issue's goals:

- step 1: every selected ``gpu`` test passed (none failed or errored);
- step 2: decode at batch 1 within 1.3x of the roofline, and >= 70% of the copy bandwidth at batch 64,
  at every context measured;
- step 3: Pageant >= 10x the best static-batch ``generate`` on the same request set;
- step 4: every request of every rate completed (TTFT/TPOT percentiles are reported, no goal).

The summary fits one screen; it is printed and written to ``summary.txt``.
"""

from __future__ import annotations

import json
import pathlib

from gpu_check import HEADER_FIELDS, ResultFile, header

STEPS = [("tests", "step1_tests.json"), ("decode", "step2_decode.json"), ("throughput", "step3_throughput.json"),
         ("serve", "step4_serve.json")]
BATCH1_X_ROOFLINE, BATCH64_BANDWIDTH, HF_RATIO = 1.3, 0.7, 10.0


def run_tests_report(args) -> int:
    """pytest's JSON lines -> counts by outcome, the failures with their messages, the slowest tests."""
    out = ResultFile(args.result_dir / "step1_tests.json", args.dry_run, "tests")
    lines = []
    if args.report.exists():
        lines = [json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]
    tests = [r for r in lines if "nodeid" in r]
    counts: dict[str, int] = {}
    for r in tests:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    finish = [r for r in lines if "exitstatus" in r]
    out.update(collected=next((r["collected"] for r in lines if "collected" in r), None), counts=counts,
               failures=[r for r in tests if r["outcome"] in ("failed", "error")],
               skipped=[{"nodeid": r["nodeid"], "message": r.get("message", "")}
                        for r in tests if r["outcome"] == "skipped"],
               slowest=sorted(({"nodeid": r["nodeid"], "seconds": round(r["duration"], 2)} for r in tests),
                              key=lambda r: -r["seconds"])[:10],
               exitstatus=finish[-1]["exitstatus"] if finish else None, pytest_rc=args.rc, complete=bool(finish))
    out.save()
    return 0


def read_status(path: pathlib.Path | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if path and path.exists():
        for line in path.read_text().splitlines():
            name, rc, seconds, limit = line.split()
            out[name] = {"rc": int(rc), "seconds": float(seconds), "limit": float(limit),
                         "status": "ok" if rc == "0" else "timed out" if rc in ("124", "137") else f"failed (rc {rc})"}
    return out


def _goal(name: str, met: bool | None, detail: str) -> dict:
    return {"goal": name, "met": met, "detail": detail}


def judge(results: dict[str, dict]) -> list[dict]:
    goals = []
    t = results.get("tests")
    if t:
        c = t.get("counts", {})
        bad = c.get("failed", 0) + c.get("error", 0)
        goals.append(_goal("every gpu test passes", t.get("complete") and bad == 0 and c.get("passed", 0) > 0,
                           f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('error', 0)} errors, "
                           f"{c.get('skipped', 0)} skipped of {t.get('collected')}"))
    d = results.get("decode")
    if d:
        for batch, key, bound, text in ((1, "x_roofline", BATCH1_X_ROOFLINE, "batch 1 within 1.3x of the roofline"),
                                        (64, "bandwidth_fraction", BATCH64_BANDWIDTH, ">= 70% of the bandwidth at batch 64")):
            pts = [p for p in d.get("points", []) if p["batch"] == batch]
            if not pts:
                goals.append(_goal(text, None, "not measured"))
                continue
            ok = all(p[key] <= bound for p in pts) if key == "x_roofline" else all(p[key] >= bound for p in pts)
            vals = ", ".join(f"ctx {p['context']}: " + (f"{p[key]:.2f}x" if key == "x_roofline" else f"{p[key]:.0%}")
                             for p in pts)
            goals.append(_goal(text, ok, vals))
    th = results.get("throughput") or {}
    hf = [r for r in th.get("hf_generate", []) if "output_tokens_per_s" in r]
    ours = th.get("pageant_hf_set")
    if ours and hf:
        best = max(hf, key=lambda r: r["output_tokens_per_s"])
        ratio = ours["output_tokens_per_s"] / best["output_tokens_per_s"]
        cb = th.get("hf_continuous_batching") or {}
        cb_text = ""
        if cb.get("output_tokens_per_s"):
            cb_text = (f"; HF continuous batching {cb['output_tokens_per_s']:.0f} tok/s "
                       f"({ours['output_tokens_per_s'] / cb['output_tokens_per_s']:.1f}x)")
        goals.append(_goal(">= 10x HF generate", ratio >= HF_RATIO and ours["complete"],
                           f"{ratio:.1f}x: pageant {ours['output_tokens_per_s']:.0f} vs HF batch {best['batch_size']} "
                           f"{best['output_tokens_per_s']:.0f} tok/s on {ours['num_requests']} requests{cb_text}"))
    elif th:
        goals.append(_goal(">= 10x HF generate", None, "not measured (a side is missing)"))
    s = results.get("serve")
    if s:
        runs = [r for r in s.get("runs", []) if "ttft_ms" in r]
        goals.append(_goal("serve: every request completes", bool(runs) and len(runs) == len(s.get("rates", []))
                           and all(r["failed"] == 0 for r in runs),
                           f"{len(runs)}/{len(s.get('rates', []))} rates measured"
                           + (f"; {s['error']}" if s.get("error") else "")))
    return goals


def summary_text(head: dict, status: dict, results: dict, goals: list[dict]) -> str:
    lines = [f"GPU check{' (DRY RUN, CPU)' if head.get('dry_run') else ''}: {head['device']}, driver {head['driver']}, "
             f"torch {head['torch']}, triton {head['triton']}, transformers {head['transformers']}",
             f"commit {head['git_commit']}, {head['date']}", ""]
    for name, _ in STEPS:
        st = status.get(name) or status.get(f"{name}_pageant") or {}
        subs = [f"{k}: {v['status']} {v['seconds']:.0f}/{v['limit']:.0f}s" for k, v in status.items()
                if k == name or k.startswith(name + "_")]
        done = "complete" if (results.get(name) or {}).get("complete") else "partial" if name in results else "no result"
        lines.append(f"  {name:<10} {done:<9} " + ("; ".join(subs) if subs else st.get("status", "not run")))
    d = results.get("decode") or {}
    if d.get("points"):
        ctxs = sorted({p["context"] for p in d["points"]})
        lines += ["", f"decode ms/step (x roofline), copy bandwidth {d['copy_bandwidth_gb_s']:.0f} GB/s, "
                      f"CUDA graphs {d.get('cuda_graphs')}", "  batch " + "".join(f"{'ctx ' + str(c):>18}" for c in ctxs)]
        for b in sorted({p["batch"] for p in d["points"]}):
            row = {p["context"]: p for p in d["points"] if p["batch"] == b}
            lines.append(f"  {b:5d} " + "".join(f"{row[c]['step_ms']:9.2f} ({row[c]['x_roofline']:4.2f}x)" if c in row
                                              else f"{'-':>18}" for c in ctxs))
    th = results.get("throughput") or {}
    if th.get("pageant"):
        p = th["pageant"]
        lines += ["", f"throughput: pageant {p['output_tokens_per_s']:.0f} output tok/s on "
                      f"{p['finished']}/{p['num_requests']} requests"]
    for r in (results.get("serve") or {}).get("runs", []):
        if "ttft_ms" in r:
            lines.append(f"serve rate {r['request_rate']:>4}: {r['output_throughput']:7.0f} tok/s  TTFT p50/p99 "
                         f"{r['ttft_ms']['median']:.0f}/{r['ttft_ms']['p99']:.0f} ms  TPOT p50/p99 "
                         f"{r['tpot_ms']['median']:.1f}/{r['tpot_ms']['p99']:.1f} ms  failed {r['failed']}")
    mark = lambda g: "n/a" if g["met"] is None else "MET" if g["met"] else "MISSED"  # noqa: E731
    lines += ["", "goals:"] + [f"  [{mark(g)}] {g['goal']}: {g['detail']}" for g in goals]
    for f in ((results.get("tests") or {}).get("failures") or [])[:5]:
        lines.append(f"  failed: {f['nodeid']}")
    for name, r in results.items():
        errors = dict(r.get("errors") or {}, **({name: r["error"]} if r.get("error") else {}))
        lines += [f"  error in {k}: {v.splitlines()[0][:150] if v else ''}" for k, v in errors.items()]
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    d = results.get("decode") or {}
    for ctx in sorted({p["context"] for p in d.get("points", [])}):
        pts = sorted((p for p in d["points"] if p["context"] == ctx), key=lambda p: p["batch"])
        line, = axes[0, 0].plot([p["batch"] for p in pts], [p["step_ms"] for p in pts], "o-", label=f"ctx {ctx}")
        axes[0, 0].plot([p["batch"] for p in pts], [p["roofline_ms"] for p in pts], "--", color=line.get_color())
        axes[0, 1].plot([p["batch"] for p in pts], [p["bandwidth_fraction"] for p in pts], "o-", label=f"ctx {ctx}")
    axes[0, 0].set(xlabel="decode batch", ylabel="ms per step (dashed: roofline)", title="decode step")
    axes[0, 1].axhline(BATCH64_BANDWIDTH, color="grey", lw=0.8)
    axes[0, 1].set(xlabel="decode batch", ylabel="fraction of copy bandwidth", title="roofline / measured")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
    th = results.get("throughput") or {}
    bars = {}
    for key, name in (("pageant", "pageant (all)"), ("pageant_hf_set", "pageant (HF set)"),
                      ("hf_continuous_batching", "HF continuous")):
        if (th.get(key) or {}).get("output_tokens_per_s"):
            bars[name] = th[key]["output_tokens_per_s"]
    bars.update({f"HF generate b{r['batch_size']}": r["output_tokens_per_s"] for r in th.get("hf_generate", [])
                 if "output_tokens_per_s" in r})
    axes[1, 0].bar(list(bars), list(bars.values()))
    axes[1, 0].set(ylabel="output tokens/s", title="throughput, ShareGPT-like lengths")
    axes[1, 0].tick_params(axis="x", rotation=25)
    runs = [r for r in (results.get("serve") or {}).get("runs", []) if "ttft_ms" in r]
    for key, marker in (("ttft_ms", "o-"), ("tpot_ms", "s--")):
        for stat in ("median", "p99"):
            axes[1, 1].plot([r["request_rate"] for r in runs], [r[key][stat] for r in runs], marker,
                            label=f"{key[:4]} {stat}")
    axes[1, 1].set(yscale="log", xlabel="request rate (req/s)", ylabel="ms", title="serving latency")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_summary(args) -> int:
    folder = args.result_dir
    results = {name: json.loads((folder / f).read_text()) for name, f in STEPS if (folder / f).exists()}
    status = read_status(args.status)
    head = next((dict((k, r.get(k)) for k in HEADER_FIELDS) for r in results.values()), None) or header(args.dry_run)
    goals = judge(results)
    text = summary_text(head, status, results, goals)
    doc = {**head, "step": "summary", "complete": True, "steps": status, "goals": goals, "summary": text.splitlines(),
           "results": results}
    (folder / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str))
    (folder / "summary.txt").write_text(text + "\n")
    try:
        plot(results, folder / "gpu_check.png")
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not hide the summary
        print(f"gpu_check.png not written: {type(exc).__name__}: {exc}")
    print(text)
    return 0
