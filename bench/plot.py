"""Draw one run of the shared benchmark (peers.py) as a PNG, for docs/performance.md.

    .bench-venv/bin/python bench/plot.py         # newest full run -> docs/performance.png
    .bench-venv/bin/python bench/plot.py bench-results/peers-2026-11-25-021007.json
    .bench-venv/bin/python bench/plot.py RUN.json --out /tmp/run.png

Run from the project root. Without a path it takes the newest
``bench-results/peers-*.json`` that is not a ``-quick`` run. matplotlib comes from
the bench venv only (``.bench-venv/bin/pip install matplotlib``); it is not a
dependency of brokerq.

The figure has one panel per workload, one horizontal bar per peer in the run
(brokerq in orange, the others grey; the same order in every panel):

* a: one-way put->get latency, p50 and p99 in µs (shorter is better);
* b: msgs/s, 1 producer + 1 consumer; c: msgs/s, 4P+4C; d: msgs/s, batched
  put_many/get_many; e: MB/s (10^6 B) with 64 KiB messages (longer is better).

Every figure is the run's ``summary``, the median of its repetitions, read as
``compare.py`` reads it; a peer without a figure (n/a, not run) shows "n/a".
A panel's title gives brokerq / redis when the run has both (latency: below 1x
means brokerq is faster; throughput: above 1x). Figures that were capped, had
errors, duplicates or missing messages carry a mark after their value. An axis
is logarithmic when its figures span more than 20x. The footer gives the run's
date and mode, the machine's state (steal, calibration loop, load) and
brokerq's version and git commit as the JSON records them.

Ratios are only meaningful within one run: do not set this figure beside one
drawn from another run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter

Row = dict[str, Any]

BROKERQ = "brokerq"
BASE = "redis"
BQ_COLOR = "#e8710a"
BQ_COLOR_LIGHT = "#f6b26b"
PEER_COLOR = "#7f8c99"
PEER_COLOR_LIGHT = "#c3cbd3"
LOG_SPAN = 20.0  # max/min above this: logarithmic axis
TIMES = "\u00d7"  # multiplication sign
NDASH = "\u2013"

THROUGHPUT = {
    "b": ("b: 1 producer + 1 consumer", "msgs/s"),
    "c": ("c: 4 producers + 4 consumers", "msgs/s"),
    "d": ("d: batched, 1P+1C", "msgs/s"),
    "e": ("e: large messages, 1P+1C", "MB/s"),
}


def newest_full(folder: Path) -> Path | None:
    """The newest peers-*.json in folder that is not a quick run (by the stamp in its name)."""
    files = [p for p in folder.glob("peers-*.json") if p.is_file() and "-quick" not in p.name]
    return max(files, key=lambda p: (p.name, p.stat().st_mtime)) if files else None


def figure_of(row: Row | None) -> dict[str, Any] | None:
    """The summary (median of reps) of a row, or None when it has no figure (as compare.py)."""
    if not row or row.get("status") not in ("ok", "error") or not row.get("summary"):
        return None
    summary: dict[str, Any] = row["summary"]
    return summary


def flaws(row: Row | None, params: dict[str, Any]) -> list[str]:
    """What makes a figure less than clean: errors, losses, duplicates, caps (as compare.py)."""
    if not row:
        return []
    s = row.get("summary") or {}
    out = []
    if row.get("status") == "error":
        out.append("errors")
    if s.get("duplicates"):
        out.append(f"{s['duplicates']:,} dup")
    if s.get("missing"):
        out.append(f"{s['missing']:,} missing")
    if s.get("capped"):
        w = row.get("workload")
        if w == "a":
            out.append(f"capped: {s.get('n', 0):,} of {params.get('n_lat', 0):,} samples")
        else:
            planned = params.get("n_large" if w == "e" else "n", 0)
            out.append(f"capped: {s.get('put', 0):,} of {planned:,} msgs put")
    return out


def fmt_value(v: float, unit: str) -> str:
    if unit == "msgs/s":
        if v >= 1e6:
            return f"{v / 1e6:.2f}M"
        if v >= 1e3:
            return f"{v / 1e3:.1f}k"
        return f"{v:.0f}"
    if unit == "MB/s":
        return f"{v:,.0f}" if v >= 10 else f"{v:.2f}"
    return f"{v:,.0f}" if v >= 10 else f"{v:.1f}"  # µs


def fmt_tick(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:g}M"
    if x >= 1e3:
        return f"{x / 1e3:g}k"
    return f"{x:g}"


def fmt_ratio(r: float) -> str:
    if r >= 100:
        return f"{r:,.0f}{TIMES}"
    if r >= 10:
        return f"{r:.1f}{TIMES}"
    return f"{r:.2f}{TIMES}" if r >= 0.1 else f"{r:.3f}{TIMES}"


def reason_of(rows: dict[str, Row], w: str) -> str:
    row = rows.get(w) or rows.get("*")
    return str(row.get("reason", "n/a")) if row else "not run"


class Footnotes:
    """Numbered notes for flagged figures, shown in the notes panel."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.items: list[str] = []

    def mark(self, peer: str, w: str, row: Row | None) -> str:
        fl = flaws(row, self.params)
        if not fl:
            return ""
        self.items.append(f"{peer} {w}: {', '.join(fl)}")
        return f" [{len(self.items)}]"


def set_scale(ax: Axes, values: list[float]) -> bool:
    """Linear axis, or logarithmic when the figures span more than LOG_SPAN; room for labels."""
    pos = [v for v in values if v > 0]
    if not pos:
        return False
    lo, hi = min(pos), max(pos)
    log = hi / lo > LOG_SPAN
    if log:
        ax.set_xscale("log")
        ax.set_xlim(10 ** math.floor(math.log10(lo) - 0.3), hi * 6)
    else:
        ax.set_xlim(0, hi * 1.45)
    return log


def style_axis(ax: Axes, peers: list[str], unit: str, log: bool) -> None:
    ax.set_yticks(range(len(peers)), peers)
    ax.set_ylim(len(peers) - 0.5, -0.5)  # first peer on top; rows without a bar still shown
    for label in ax.get_yticklabels():
        if label.get_text() == BROKERQ:
            label.set_fontweight("bold")
            label.set_color(BQ_COLOR)
    ax.set_xlabel(unit + (" (log scale)" if log else ""), fontsize=9)
    if not log:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: fmt_tick(x)))
    ax.grid(axis="x", which="major", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="x", labelsize=8)


def label_bar(ax: Axes, x: float, y: float, text: str, *, log: bool, bold: bool) -> None:
    xt = x * 1.08 if log else x + ax.get_xlim()[1] * 0.01
    weight = "bold" if bold else "normal"
    ax.text(xt, y, text, va="center", ha="left", fontsize=8, fontweight=weight)


def na_label(ax: Axes, y: float, text: str) -> None:
    x0 = ax.get_xlim()[0]
    xt = x0 * 1.15 if ax.get_xscale() == "log" else ax.get_xlim()[1] * 0.01
    ax.text(xt, y, text, va="center", ha="left", fontsize=7.5, color="#888888", style="italic")


def short_reason(reason: str, width: int = 38) -> str:
    return reason if len(reason) <= width else reason[: width - 1] + "…"


def throughput_panel(
    ax: Axes, w: str, peers: list[str], rows: dict[str, dict[str, Row]], notes: Footnotes
) -> None:
    title, unit = THROUGHPUT[w]
    key = "MB_per_s" if unit == "MB/s" else "msgs_per_s"
    vals: dict[str, float] = {}
    for p in peers:
        s = figure_of(rows[p].get(w))
        if s is not None:
            vals[p] = float(s[key])
    log = set_scale(ax, list(vals.values()))
    for i, p in enumerate(peers):
        if p not in vals:
            na_label(ax, i, "n/a: " + short_reason(reason_of(rows[p], w)))
            continue
        bq = p == BROKERQ
        ax.barh(i, vals[p], color=BQ_COLOR if bq else PEER_COLOR, height=0.65)
        text = fmt_value(vals[p], unit) + notes.mark(p, w, rows[p].get(w))
        label_bar(ax, vals[p], i, text, log=log, bold=bq)
    if BROKERQ in vals and vals.get(BASE):
        title += f"\nbrokerq = {fmt_ratio(vals[BROKERQ] / vals[BASE])} {BASE} (higher is better)"
    ax.set_title(title, fontsize=10, loc="left")
    style_axis(ax, peers, unit, log)


def latency_panel(
    ax: Axes, peers: list[str], rows: dict[str, dict[str, Row]], notes: Footnotes
) -> None:
    vals: dict[str, tuple[float, float]] = {}
    for p in peers:
        s = figure_of(rows[p].get("a"))
        if s is not None:
            vals[p] = (float(s["p50_us"]), float(s["p99_us"]))
    log = set_scale(ax, [v for pair in vals.values() for v in pair])
    h = 0.36
    for i, p in enumerate(peers):
        if p not in vals:
            na_label(ax, i, "n/a: " + short_reason(reason_of(rows[p], "a")))
            continue
        bq = p == BROKERQ
        p50, p99 = vals[p]
        ax.barh(i - h / 2, p50, height=h, color=BQ_COLOR if bq else PEER_COLOR)
        ax.barh(i + h / 2, p99, height=h, color=BQ_COLOR_LIGHT if bq else PEER_COLOR_LIGHT)
        mark = notes.mark(p, "a", rows[p].get("a"))
        label_bar(ax, p50, i - h / 2, "p50 " + fmt_value(p50, "µs"), log=log, bold=bq)
        label_bar(ax, p99, i + h / 2, "p99 " + fmt_value(p99, "µs") + mark, log=log, bold=bq)
    title = "a: one-way put→get latency, p50 / p99"
    if BROKERQ in vals and BASE in vals and all(vals[BASE]):
        (m50, m99), (t50, t99) = vals[BROKERQ], vals[BASE]
        title += (
            f"\nbrokerq = {fmt_ratio(m50 / t50)} / {fmt_ratio(m99 / t99)} {BASE} (lower is better)"
        )
    ax.set_title(title, fontsize=10, loc="left")
    style_axis(ax, peers, "µs", log)


def brokerq_build(meta: dict[str, Any]) -> str:
    """'brokerq 0.1.0, commit abc1234' (+ env) as peers.py recorded it, or why it is absent."""
    text = str(meta.get("versions", {}).get(BROKERQ, "")).strip()
    if not text:
        return "brokerq: not in this run"
    if not re.search(r"commit \S+", text):
        text += " (no commit recorded)"
    return text


def machine_line(meta: dict[str, Any]) -> str:
    cal = [float(x) for x in meta.get("calibration_ms", [])]
    if "calibration_ms_end" in meta:
        cal.append(float(meta["calibration_ms_end"]))
    cal_txt = f"calibration loop {min(cal):.1f}{NDASH}{max(cal):.1f} ms, " if cal else ""
    load0 = str(meta.get("loadavg_start", "?")).split(" ")[0]
    load1 = str(meta.get("loadavg_end", "?")).split(" ")[0]
    return (
        f"{meta.get('platform', '?')}, {meta.get('cpus', '?')} CPUs, "
        f"Python {meta.get('python', '?')}; steal {float(meta.get('steal_pct', 0)):.1f}%, "
        f"{cal_txt}load {load0} → {load1}"
    )


def notes_panel(ax: Axes, report: dict[str, Any], notes: Footnotes) -> None:
    ax.axis("off")
    params = report.get("meta", {}).get("params", {})
    lines = [
        "How to read",
        f"• {params.get('size', '?')} B messages; e: {params.get('large_size', 0) // 1024} KiB.",
        f"• Median of up to {params.get('reps', '?')} rep(s) (a run over "
        f"{params.get('cheap_s', '?')} s is not repeated).",
        "• Ratios hold within this run only: the",
        f"  machine (2-vCPU VM) moves 2{TIMES} between runs.",
        f"• MB = 10^6 B. Axes span >{LOG_SPAN:.0f}{TIMES}: log scale.",
    ]
    if notes.items:
        lines.append("")
        lines.append("Marks")
        lines += [f"[{i}] {n}" for i, n in enumerate(notes.items, 1)]
        lines.append("capped: the run hit the time cap; the figure")
        lines.append("  is still valid, from fewer messages / samples.")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=8.5, linespacing=1.45)


def draw(report: dict[str, Any], source: Path, out: Path) -> list[str]:
    """Draw the figure into out; returns warnings (workloads missing from the run)."""
    rows: dict[str, dict[str, Row]] = {}
    for r in report["results"]:
        rows.setdefault(r["peer"], {})[r["workload"]] = r
    peers = list(rows)
    if BROKERQ in peers:  # brokerq on top, the others in the run's order
        peers.remove(BROKERQ)
        peers.insert(0, BROKERQ)
    present = {r["workload"] for r in report["results"]}
    warnings = [f"workload {w} is not in this run" for w in "abcde" if w not in present]

    meta = report.get("meta", {})
    notes = Footnotes(meta.get("params", {}))
    height = 6.2 + 0.45 * max(len(peers) - 2, 0) * 2
    fig, axes = plt.subplots(2, 3, figsize=(16, height))
    flat = list(axes.flat)
    latency_panel(flat[0], peers, rows, notes)
    for ax, w in zip(flat[1:5], "bcde", strict=True):
        throughput_panel(ax, w, peers, rows, notes)
    notes_panel(flat[5], report, notes)

    mode = meta.get("mode", "?")
    fig.suptitle(
        f"brokerq beside other local queues — one {mode} run of peers.py",
        fontsize=13,
        x=0.01,
        ha="left",
    )
    footer = (
        f"Run {meta.get('date', '?')} ({mode}), {source.name}; {brokerq_build(meta)}\n"
        f"Machine: {machine_line(meta)}"
    )
    if mode == "quick":
        footer += "\nQuick run (small counts, 1 rep): a smoke check, not figures to cite."
    fig.text(0.01, 0.01, footer, fontsize=8.5, ha="left", va="bottom", color="#333333")
    fig.tight_layout(rect=(0, 0.06 if mode != "quick" else 0.08, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return warnings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "json", nargs="?", type=Path, help="a results JSON of peers.py (default: newest full run)"
    )
    ap.add_argument("--out", type=Path, default=Path("docs/performance.png"), help="PNG to write")
    ap.add_argument(
        "--results", type=Path, default=Path("bench-results"), help="folder searched by default"
    )
    a = ap.parse_args(argv)

    path = a.json or newest_full(a.results)
    if path is None:
        ap.error(f"no JSON given and no full peers-*.json in {a.results}/")
    report = json.loads(path.read_text())
    if not report.get("results"):
        print(f"{path}: no results", file=sys.stderr)
        return 1
    for warning in draw(report, path, a.out):
        print(f"note: {warning} ({path.name})", file=sys.stderr)
    print(f"{a.out}  (from {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
