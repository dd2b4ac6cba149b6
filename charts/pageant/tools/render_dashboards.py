"""Render the chart's Grafana dashboards to PNG from a live Prometheus (matplotlib), so the README
shows what users will see in Grafana.

    python charts/pageant/tools/render_dashboards.py --prometheus http://127.0.0.1:9090 \
        --last 600 --out charts/pageant/docs

Each panel's queries run through Prometheus' /api/v1/query_range with Grafana's variables replaced
(``$__rate_interval`` by ``--rate-interval``, ``$var`` by ``--var var=REGEX`` or ``.*``); the
panels keep the dashboard's grid layout, titles, units and legends.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

DASHBOARDS = pathlib.Path(__file__).resolve().parents[1] / "files" / "dashboards"
ROW_UNITS = 0.35  # height of a grid unit, in inches


@dataclass
class Series:
    """One result series of a range query: its labels and (timestamp, value) points."""

    labels: dict[str, str]
    points: list[tuple[float, float]]


def substitute(expr: str, rate_interval: str, variables: dict[str, str]) -> str:
    """Replace Grafana's variables: $__rate_interval, and every $var by its regex (default `.*`)."""
    expr = expr.replace("$__rate_interval", rate_interval)
    return re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), ".*"), expr)


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' label value."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or json.dumps(labels)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[Series]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return [Series(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in body["data"]["result"]]


def _format_axis(ax, unit: str) -> None:
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    if unit == "percentunit":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    elif unit == "s":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 1000:.0f} ms" if abs(v) < 1 else f"{v:g} s"))
    elif unit in ("reqps", "ops"):
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}/s"))


def render_dashboard(dash: dict, prometheus: str, start: float, end: float, step: float, out: pathlib.Path,
                     rate_interval: str = "1m", variables: dict[str, str] | None = None) -> pathlib.Path:
    """Draw every panel of ``dash`` over [start, end]; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from datetime import datetime

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(it, **_):
            return it

    variables = variables or {}
    panels = dash["panels"]
    height_units = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width_in, height_in = 20.0, height_units * ROW_UNITS + 0.8
    fig = plt.figure(figsize=(width_in, height_in), dpi=80)
    fig.suptitle(dash["title"], fontsize=16, x=0.01, ha="left")
    top = 1 - 0.8 / height_in

    def box(grid, pad_top=0.45, pad_bottom=0.55):
        x0 = grid["x"] / 24 + 0.035
        w = grid["w"] / 24 - 0.05
        y_top = top - grid["y"] * ROW_UNITS / height_in
        h = grid["h"] * ROW_UNITS / height_in
        return [x0, y_top - h + pad_bottom / height_in, w, h - (pad_top + pad_bottom) / height_in]

    for panel in tqdm(panels, desc=dash["title"], unit="panel"):
        grid = panel["gridPos"]
        if panel["type"] == "row":
            fig.text(0.01, top - grid["y"] * ROW_UNITS / height_in - 0.2 / height_in, panel["title"],
                     fontsize=13, weight="bold", va="top")
            continue
        ax = fig.add_axes(box(grid))
        ax.set_title(panel["title"], fontsize=11, loc="left")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        rows = []
        for target in panel["targets"]:
            expr = substitute(target["expr"], rate_interval, variables)
            for s in query_range(prometheus, expr, start, end, step):
                name = legend(target.get("legendFormat", ""), s.labels)
                if panel["type"] == "table":
                    rows.append((name, s.points[-1][1] if s.points else math.nan))
                    continue
                points = [(t, v) for t, v in s.points if math.isfinite(v)]  # NaN: 0/0, no samples
                if points:
                    ax.plot([datetime.fromtimestamp(t) for t, _ in points], [v for _, v in points], lw=1.4, label=name)
        if panel["type"] == "table":
            ax.axis("off")
            cells = [[n, datetime.fromtimestamp(v).strftime("%H:%M:%S") if math.isfinite(v) else "-"] for n, v in rows]
            if cells:
                tbl = ax.table(cellText=cells, colLabels=["series", "last change"], cellLoc="left",
                               colWidths=[0.8, 0.2], bbox=[0, 1 - min(1.0, 0.15 * (len(cells) + 1)), 1,
                                                                  min(1.0, 0.15 * (len(cells) + 1))])
                tbl.auto_set_font_size(False)
                tbl.set_fontsize(9)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
            continue
        _format_axis(ax, unit)
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=max(3, grid["w"] // 2)))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
            if min(min(line.get_ydata()) for line in ax.lines) >= 0:
                ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1e-9))
            ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
        else:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    parser.add_argument("--last", type=float, default=900, help="seconds before --end to draw (default 900)")
    parser.add_argument("--end", type=float, default=None, help="unix time of the right edge (default: now)")
    parser.add_argument("--step", type=float, default=None, help="query step in seconds (default: range/200)")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes (default 1m)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=REGEX", help="a dashboard variable")
    parser.add_argument("--dashboard", action="append", default=[], help="only these dashboards (file stems)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."), help="output folder")
    args = parser.parse_args(argv)
    end = args.end or time.time()
    start = end - args.last
    step = args.step or max(1.0, args.last / 200)
    variables = dict(v.split("=", 1) for v in args.var)
    for path in sorted(DASHBOARDS.glob("*.json")):
        if args.dashboard and path.stem not in args.dashboard:
            continue
        out = render_dashboard(json.loads(path.read_text()), args.prometheus.rstrip("/"), start, end, step,
                               args.out / f"dashboard-{path.stem}.png", args.rate_interval, variables)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
