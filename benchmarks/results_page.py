"""Render benchmarks/RESULTS.md from whatever result JSON files exist.

  python -m benchmarks.results_page [--results results/] [--out benchmarks/RESULTS.md]

Sections: fidelity.json (agreement with the dense head vs probes), tasks.json (dense vs FlashHead
accuracy, 95% CI, flips), head_latency.json, head_latency_real.json (--real-inputs) and
tpot.json (ms and speedups), export_times.json
(export and AOTInductor compile times, the package's ms per token).  A missing file gives
a "not run yet" section.  Every number is shown with the device, date and command of the run that
produced it.  Plots (when matplotlib is installed) are written to figures/ next to the page, so the
page reads on GitHub; results/ itself is not committed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from benchmarks import results_plots

DEVICE_KEYS = ("gpu", "device", "card", "cpu")
PROVENANCE_KEYS = (*DEVICE_KEYS, "date", "command", "torch", "triton", "transformers")
SECTIONS = (("fidelity.json", "Fidelity: agreement with the dense head"),
            ("tasks.json", "Task quality: dense head vs FlashHead"),
            ("head_latency.json", "LM-head latency"),
            ("head_latency_real.json",
             "LM-head latency with a real model's centroids and hidden states"),
            ("tpot.json", "Time per output token"),
            ("tpot_gemma.json", "Time per output token: Gemma-3-270M architecture"),
            ("attention_latency.json", "Decode attention"),
            ("gemv_sweep.json", "Fused decode linears (GEMV sweep)"),
            ("pdl_chain.json", "Programmatic dependent launch: the body's kernels in one graph"),
            ("export_times.json", "Export and AOTInductor"))


def load_rows(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(file-level metadata, rows) of a results file: {"rows": [...], ...} or a bare list."""
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return {}, [r for r in data if isinstance(r, dict)]
    meta = {k: v for k, v in data.items() if k != "rows" and not k.startswith("_")}
    for nested in ("config", "meta"):  # {"meta": {"gpu": ...}, "rows": [...]}: lift it up
        if isinstance(meta.get(nested), dict):
            meta = {**meta, **meta.pop(nested)}
    return meta, [r for r in data.get("rows", []) if isinstance(r, dict)]


def provenance(row: dict[str, Any], meta: dict[str, Any]) -> tuple[str, str, str]:
    """(device, date, command) of a row, falling back to the file's metadata."""
    def first(keys: tuple[str, ...]) -> str:
        for src in (row, meta):
            for k in keys:
                if src.get(k) not in (None, ""):
                    return str(src[k])
        return "?"
    return first(DEVICE_KEYS), first(("date",)), first(("command", "cmd"))


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v).replace("|", "\\|")


def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]) + "\n"


def runs_block(rows: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[list[int], str]:
    """Run number of each row, and the list of runs (device, date, command)."""
    runs: list[tuple[str, str, str]] = []
    index = []
    for r in rows:
        p = provenance(r, meta)
        if p not in runs:
            runs.append(p)
        index.append(runs.index(p) + 1)
    text = "".join(f"- run {i}: **{d}**, {date}, `{cmd}`\n" for i, (d, date, cmd)
                   in enumerate(runs, 1))
    return index, text


def generic_table(rows: list[dict[str, Any]], meta: dict[str, Any],
                  prefer: tuple[str, ...] = ()) -> str:
    """Every scalar column that varies (preferred ones first); constant ones as a note."""
    keys: list[str] = [k for k in prefer if any(k in r for r in rows)]
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (dict, list))]
    keys = [k for k in keys if k not in PROVENANCE_KEYS]
    varying = [k for k in keys if len({json.dumps(r.get(k)) for r in rows}) > 1]
    constant = [k for k in keys if k not in varying and rows[0].get(k) is not None]
    index, runs = runs_block(rows, meta)
    header = varying + (["run"] if len(set(index)) > 1 else [])
    body = [[fmt(r.get(k)) for k in varying] + ([str(i)] if len(set(index)) > 1 else [])
            for r, i in zip(rows, index)]
    note = ", ".join(f"{k} = {fmt(rows[0][k])}" for k in constant)
    return md_table(header, body) + (f"\nSame in every row: {note}.\n" if note else "") + \
        "\n" + runs


def fidelity_section(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    out = ""
    if all(k in rows[0] for k in ("probes", "top1_agreement")):
        sub = [r for r in rows if r.get("positions_subset", "all") == "all"]
        groups = [k for k in ("dataset", "clustering", "centroid_mode") if k in rows[0]]
        probes = sorted({r["probes"] for r in sub})
        table: dict[tuple, dict[int, Any]] = {}
        for r in sub:
            table.setdefault(tuple(r[g] for g in groups), {})[r["probes"]] = r["top1_agreement"]
        out += "Top-1 agreement with the dense head (all positions), by number of probes:\n\n"
        out += md_table(groups + [f"P={p}" for p in probes],
                        [list(map(fmt, g)) + [fmt(by.get(p)) for p in probes]
                         for g, by in table.items()]) + "\n"
        info = [f"{k} = {fmt(meta[k])}" for k in ("model", "vocab_size", "hidden_size",
                                                    "model_dtype") if k in meta]
        out += ("Model: " + ", ".join(info) + ".\n\n" if info else "")
    out += "<details><summary>All rows</summary>\n\n" + generic_table(
        rows, meta, ("dataset", "positions_subset", "probes", "top1_agreement", "top5_recall")) + \
        "\n</details>\n"
    return out


def _acc(a: dict[str, Any] | None) -> str:
    if not a:
        return "-"
    return f"{100 * a['acc']:.1f} [{100 * a['ci95'][0]:.1f}, {100 * a['ci95'][1]:.1f}]"


def _per_head(d: dict[str, Any] | None) -> str:
    return " / ".join(f"{h} {fmt(v)}" for h, v in (d or {}).items()) or "?"


def tasks_section(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    order = ["gsm8k", "ifeval", "mmlu_pro"]
    rows = sorted(rows, key=lambda r: order.index(r["task"]) if r["task"] in order else len(order))
    out = ("Accuracy in % with its 95% Wilson interval; diff = FlashHead - dense in points with a "
           "95% paired interval; D+F- = items dense got right and FlashHead wrong, D-F+ the "
           "reverse; p = exact McNemar test on those flips.\n\n")
    for model in dict.fromkeys(r.get("model_name") or r.get("model") for r in rows):
        mrows = [r for r in rows if (r.get("model_name") or r.get("model")) == model]
        index, runs = runs_block(mrows, meta)
        body = []
        for r, i in zip(mrows, index):
            p, fh = r.get("paired"), r.get("flashhead_config") or {}
            body.append([r["task"], r["metric"] + (" **(headline)**" if r.get("headline") else ""),
                         fmt((r.get("dense") or r.get("flashhead") or {}).get("n")),
                         _acc(r.get("dense")), _acc(r.get("flashhead")),
                         f"{100 * p['diff']:+.1f} [{100 * p['diff_ci95'][0]:+.1f}, "
                         f"{100 * p['diff_ci95'][1]:+.1f}]" if p else "-",
                         fmt(p and p["a_only"]), fmt(p and p["b_only"]),
                         f"{p['p_value']:.3g}" if p else "-", fmt(fh.get("probes")), str(i)])
        out += f"### {model}\n\n" + md_table(
            ["task", "metric", "n", "dense %", "FlashHead %", "diff (pp)", "D+F-", "D-F+", "p",
             "probes", "run"], body)
        out += "\nSubsets and settings:\n\n"
        for r in mrows:
            if r.get("headline"):
                out += (f"- **{r['task']}**: {r.get('subset', '?')}; {r.get('prompt_format', '')}; "
                        f"at most {r.get('max_new_tokens', '?')} new tokens (outputs that hit it: "
                        f"{_per_head(r.get('hit_max_new_tokens'))}; mean new tokens: "
                        f"{_per_head(r.get('mean_new_tokens'))})\n")
        fh = next((r["flashhead_config"] for r in mrows if r.get("flashhead_config")), None)
        if fh:
            out += "- FlashHead: " + ", ".join(f"{k} {fmt(v)}" for k, v in fh.items()) + "\n"
        dt = {r.get("dtype") for r in mrows} - {None}
        out += f"- decoding: greedy, dtype {', '.join(sorted(dt))}\n\nRuns:\n\n{runs}\n"
    return out


def latency_section(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    prefer = ("method", "B", "batch", "probes", "ms", "speedup", "gbps", "floor_ms",
              "tpot_ms", "tokens_per_s")
    return generic_table(rows, meta, prefer)


def tpot_section(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """ms per output token by variant, one table per (B, cache length) with kernels per step,
    byte floor and achieved bandwidth (benchmarks.tpot); older files: by head and exec."""
    rows = [r for r in rows if not r.get("skipped")]
    if rows and "variant" in rows[0]:
        return tpot_variants_section(meta, rows)
    if not rows or not all(k in rows[0] for k in ("head", "B", "tpot_ms")):
        return latency_section(meta, rows)
    heads = list(dict.fromkeys(r["head"] for r in rows))
    fh = [h for h in heads if h not in ("dense", "body")]
    grid: dict[tuple, dict[str, float]] = {}
    for r in rows:
        grid.setdefault((r.get("exec", "-"), r["B"]), {})[r["head"]] = r["tpot_ms"]
    body = []
    for (ex, B), by in grid.items():
        speed = [fmt(by["dense"] / by[h]) if "dense" in by and h in by else "-" for h in fh]
        body.append([ex, str(B), *(fmt(by.get(h)) for h in heads), *speed])
    out = "Milliseconds per output token (median), and dense / FlashHead speedup:\n\n"
    out += md_table(["exec", "B", *(f"{h} ms" for h in heads), *(f"x {h}" for h in fh)], body)
    _, runs = runs_block(rows, meta)
    model = meta.get("model")
    return out + (f"\nModel: {model}, dtype {meta.get('dtype', '?')}.\n" if model else "") + \
        "\n" + runs + "\n<details><summary>All rows</summary>\n\n" + \
        generic_table(rows, meta, ("exec", "head", "B", "tpot_ms")) + "\n</details>\n"


def tpot_variants_section(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    timed = [r for r in rows if r.get("tpot_ms") is not None]
    base = {(r["B"], r["cache_len"], r["position"]): r["tpot_ms"] for r in timed
            if r["variant"] == "hf-dense"}
    body = []
    for r in sorted(timed, key=lambda r: (r["B"], -r["cache_len"], r["position"], -r["tpot_ms"])):
        b = base.get((r["B"], r["cache_len"], r["position"]))
        body.append([r["variant"], str(r["B"]), str(r["cache_len"]), str(r["position"]),
                     r.get("attention", "-"), fmt(r["tpot_ms"]),
                     fmt(r.get("kernels_per_step")), fmt(r.get("floor_ms")),
                     fmt(r.get("gb_per_s")), fmt(100 * r["bw_fraction"]) if "bw_fraction" in r
                     else "-", fmt(b / r["tpot_ms"]) if b else "-"])
    out = ("Milliseconds per output token (median), kernels per step, the byte floor at the "
           f"measured copy bandwidth ({fmt(meta.get('copy_gb_per_s'))} GB/s) and the speedup "
           "over transformers' forward + torch.compile with the dense head (hf-dense):\n\n")
    out += md_table(["variant", "B", "cache", "pos", "attention", "ms/token", "kernels",
                     "floor ms", "GB/s", "% copy bw", "x hf-dense"], body)
    notes = {f"{r['variant']}: {r['mode_note']}" for r in timed if r.get("mode_note")}
    out += "".join(f"\n{n}.\n" for n in sorted(notes))
    bad = [r for r in rows if r.get("error")]
    if bad:
        out += "\nFailed: " + "; ".join(f"{r['variant']} B={r['B']}: {r['error']}" for r in bad)
    _, runs = runs_block(timed, meta)
    model = meta.get("model")
    return out + (f"\nModel: {model}, dtype {meta.get('dtype', '?')}.\n" if model else "") + \
        "\n" + runs


def export_section(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """benchmarks.export_times: what exporting costs, and the decode step's ms per token as
    eager PyTorch, AOTInductor package (plain and replayed in a CUDA graph) and torch.compile."""
    facts = [("torch.export prefill", meta.get("export_prefill_s"), "s"),
             ("torch.export decode", meta.get("export_decode_s"), "s"),
             ("AOTInductor compile of the decode step", meta.get("aoti_compile_decode_s"), "s"),
             ("package size", meta.get("aoti_package_gb"), "GB")]
    out = "".join(f"- {label}: {fmt(v)} {unit}\n" for label, v, unit in facts if v is not None)
    if meta.get("aoti_tokens"):
        out += f"- package vs eager greedy tokens: **{meta['aoti_tokens']}** " \
               f"({meta.get('aoti_tokens_detail', '')})\n"
    if meta.get("model"):
        out += f"- model: {meta['model']}\n"
    return out + "\nMilliseconds per output token of the decode step (median):\n\n" + \
        generic_table(rows, meta, ("row", "B", "tpot_ms", "tpot_ms_mean", "first_call_s"))


def attention_section(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """benchmarks.attention_latency: the decode-attention op vs SDPA over the whole cache."""
    out = ("Milliseconds per layer call (CUDA graphs, median); GB/s and floor over the filled "
           f"K/V only (copy bandwidth {fmt(meta.get('copy_bandwidth_gbps'))} GB/s):\n\n")
    return out + generic_table(rows, meta, ("model", "B", "capacity", "fill", "method", "ms",
                                            "floor_ms", "gbps", "x_sdpa_hf", "kernels"))


def pdl_section(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """benchmarks.pdl_chain: the body's kernels in one CUDA graph, plain launches vs PDL."""
    plain = {(r["arch"], r["B"]): r["us_per_chain"] for r in rows if r.get("launch") == "plain"}
    rows = [{**r, "x_plain": plain[(r["arch"], r["B"])] / r["us_per_chain"]} for r in rows
            if (r.get("arch"), r.get("B")) in plain]
    out = ("Microseconds per chain of every layer's five kernels (CUDA graph replays, median), "
           "the floor of weights and filled K/V at the copy bandwidth "
           f"({fmt(meta.get('copy_gb_per_s'))} GB/s), "
           "and the speedup of PDL launches over plain ones:\n\n")
    return out + generic_table(rows, meta, ("arch", "B", "launch", "us_per_chain", "kernels",
                                            "us_per_kernel", "floor_us", "bw_fraction",
                                            "x_plain", "same_output"))


def gemv_section(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """benchmarks.gemv_sweep: the best config per (shape, B) against cuBLAS."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r.get("ms") is None:
            continue
        key = (r["shape"], r["B"], r["method"] == "cublas")
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    body = []
    for (shape, B, is_cublas), r in sorted(best.items()):
        if is_cublas or (shape, B, True) not in best:
            continue
        ref = best[(shape, B, True)]
        body.append([shape, str(B), fmt(r["weight_bytes"] / 1e6), fmt(1e3 * ref["ms"]),
                     fmt(1e3 * r["ms"]), fmt(r["gbps"]), fmt(ref["ms"] / r["ms"]),
                     str(r.get("config"))])
    out = (f"Best Triton config per shape vs cuBLAS F.linear (us, CUDA graphs, rotating weights; "
           f"copy bandwidth {fmt(meta.get('copy_gbps'))} GB/s):\n\n")
    _, runs = runs_block(rows, meta)
    return out + md_table(["shape", "B", "MB", "cuBLAS us", "Triton us", "GB/s", "x cuBLAS",
                           "config"], body) + "\n" + runs


RENDER = {"fidelity.json": fidelity_section, "tasks.json": tasks_section,
          "head_latency.json": latency_section, "head_latency_real.json": latency_section,
          "tpot.json": tpot_section, "tpot_gemma.json": tpot_section,
          "attention_latency.json": attention_section, "gemv_sweep.json": gemv_section,
          "pdl_chain.json": pdl_section,
          "export_times.json": export_section}


def render(results: Path, out: Path) -> str:
    figures = out.parent / "figures"
    page = ["# Results\n",
            f"Generated by `python -m benchmarks.results_page --results {results} --out {out}` "
            "from the JSON files in results/ (raw rows there). Re-run it after any benchmark. "
            "What was measured and tried on the way, with the reasoning: "
            "[docs/history.md](../docs/history.md).\n"]
    for name, title in SECTIONS:
        page.append(f"## {title}\n")
        path = results / name
        if not path.is_file():
            page.append(f"Not run yet (no `{path}`).\n")
            continue
        meta, rows = load_rows(path)
        if not rows:
            page.append(f"`{path}` holds no rows.\n")
            continue
        png = results_plots.plot(name, meta, rows, figures)
        if png is not None:
            page.append(f"![{title}]({os.path.relpath(png, out.parent)})\n")
        page.append(RENDER[name](meta, rows))
    return "\n".join(page)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.results_page", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(args.results, args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
