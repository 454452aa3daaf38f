"""Small PNG plots for RESULTS.md (only when matplotlib is installed; None otherwise).

Each plot reads the rows of one results file; a file without the columns a plot needs gets no
plot (the page still has its table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIGSIZE, DPI = (6.0, 3.4), 100   # about 30 KB per PNG: fine to commit next to RESULTS.md


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(name: str, meta: dict[str, Any], rows: list[dict[str, Any]], folder: Path) -> Path | None:
    """Write folder/<stem>.png for results file `name`; the path, or None when not plotted."""
    plt = _pyplot()
    draw = {"fidelity.json": _fidelity, "tasks.json": _tasks,
            "head_latency.json": _speedup, "tpot.json": _tpot, "tpot_gemma.json": _tpot}.get(name)
    if plt is None or draw is None:
        return None
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    try:
        if not draw(ax, rows):
            return None
        folder.mkdir(parents=True, exist_ok=True)
        png = folder / (Path(name).stem + ".png")
        fig.tight_layout()
        fig.savefig(png)
        return png
    finally:
        plt.close(fig)


def _series_plot(ax: Any, points: list[tuple[str, float, float]], xlabel: str, ylabel: str,
                 max_legend: int) -> bool:
    """One line per label through its (x, y) points, x on a log2 axis; legend if few lines."""
    series: dict[str, list[tuple[float, float]]] = {}
    for label, x, y in points:
        series.setdefault(label, []).append((x, y))
    for label, pts in series.items():
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) <= max_legend:
        ax.legend(fontsize=7)
    return True


def _fidelity(ax: Any, rows: list[dict[str, Any]]) -> bool:
    rows = [r for r in rows if r.get("positions_subset", "all") == "all"
            and isinstance(r.get("probes"), int) and r.get("top1_agreement") is not None]
    if not rows:
        return False
    groups = [k for k in ("dataset", "clustering", "centroid_mode") if k in rows[0]]
    return _series_plot(ax, [(" ".join(str(r[g]) for g in groups), r["probes"],
                              r["top1_agreement"]) for r in rows],
                        "probes (clusters scored)", "top-1 agreement with dense", 8)


def _tasks(ax: Any, rows: list[dict[str, Any]]) -> bool:
    rows = [r for r in rows if r.get("headline") and r.get("dense")]
    if not rows:
        return False
    labels = [f"{r['task']}\n{r.get('model_name', '')[:24]}" for r in rows]
    x = list(range(len(rows)))
    for shift, head, color in ((-0.2, "dense", "tab:gray"), (0.2, "flashhead", "tab:blue")):
        pts = [(i + shift, r[head]) for i, r in zip(x, rows) if r.get(head)]
        if not pts:
            continue
        acc = [100 * a["acc"] for _, a in pts]
        err = [[100 * (a["acc"] - a["ci95"][0]) for _, a in pts],
               [100 * (a["ci95"][1] - a["acc"]) for _, a in pts]]
        ax.bar([p for p, _ in pts], acc, width=0.4, yerr=err, capsize=3, color=color,
               label="FlashHead" if head == "flashhead" else "dense")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("accuracy % (95% CI)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return True


def _speedup(ax: Any, rows: list[dict[str, Any]]) -> bool:
    bkey = next((k for k in ("B", "batch", "batch_size") if k in rows[0]), None)
    rows = [r for r in rows if r.get("speedup") is not None and r.get("method", "x") != "dense"]
    if bkey is None or not rows:
        return False
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    points = [(" ".join(f"{k}={r[k]}" for k in ("method", "probes") if r.get(k) is not None)
               or "FlashHead", r[bkey], r["speedup"]) for r in rows]
    return _series_plot(ax, points, "batch size", "speedup over dense (x)", 10)


def _tpot(ax: Any, rows: list[dict[str, Any]]) -> bool:
    if any("variant" in r for r in rows):
        return _tpot_bars(ax, [r for r in rows if r.get("tpot_ms") is not None])
    rows = [r for r in rows if not r.get("skipped") and r.get("tpot_ms") is not None
            and r.get("B") is not None and r.get("head")]
    if not rows:
        return False
    points = [(f"{r.get('exec', '')} {r['head']}".strip(), r["B"], r["tpot_ms"]) for r in rows]
    return _series_plot(ax, points, "batch size", "ms per output token", 10)


def _tpot_bars(ax: Any, rows: list[dict[str, Any]]) -> bool:
    """Grouped bars: ms per token of each variant, one group per (B, cache length)."""
    if not rows:
        return False
    groups = sorted({(r["B"], r["cache_len"]) for r in rows}, key=lambda g: (g[0], -g[1]))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    ms = {(r["B"], r["cache_len"], r["variant"]): r["tpot_ms"] for r in rows}
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        xs = [i + j * width for i, g in enumerate(groups) if (*g, v) in ms]
        ys = [ms[(*g, v)] for g in groups if (*g, v) in ms]
        ax.bar(xs, ys, width, label=v)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"B={b}, L={L}" for b, L in groups], fontsize=8)
    ax.set_ylabel("ms per output token")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return True
