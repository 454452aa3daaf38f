"""Scoring saved generations into result rows, the raw-generation JSONL files, and the table.

A generations file (one per task) starts with {"header": {...}} (how the run was made) followed
by one row per (head, item): {"head", "id", "item", "generation", "n_prompt_tokens",
"n_new_tokens", "hit_max", "n_shots"}.  The item is stored whole, so scoring needs nothing else.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from benchmarks.eval import make_task
from benchmarks.eval.data import iter_jsonl
from benchmarks.eval.stats import accuracy, paired

HEADS = ("dense", "flashhead")


def read_generations(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = list(iter_jsonl(path))
    if not rows or "header" not in rows[0]:
        raise ValueError(f"{path} is not a generations file (its first line must be a header)")
    return rows[0]["header"], rows[1:]


def score_rows(header: dict[str, Any], gens: list[dict[str, Any]],
               data_dir: str | None = None) -> list[dict[str, Any]]:
    """One result row per metric of the task: accuracy per head, CI, and the paired comparison."""
    task = make_task(header["task"], data_dir)
    by_head: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for g in gens:
        by_head[g["head"]][g["id"]] = g
    heads = [h for h in HEADS if by_head.get(h)]
    if not heads:
        return []
    ids = list(by_head[heads[0]])
    ids = [i for i in ids if all(i in by_head[h] for h in heads)]  # items every head finished
    scores = {h: [task.score(by_head[h][i]["item"], by_head[h][i]["generation"]) for i in ids]
              for h in heads}
    out = []
    for metric in task.metrics:
        per_item = not ids or isinstance(scores[heads[0]][0][metric], bool)
        flat = {h: _flatten(s[metric] for s in scores[h]) for h in heads}
        row: dict[str, Any] = {
            "task": task.name, "metric": metric, "headline": metric == task.metrics[0],
            "unit": "items" if per_item else "instructions", "n_items": len(ids),
            **{h: accuracy(flat[h]).to_json() for h in heads},
            "paired": paired(flat["dense"], flat["flashhead"]).to_json()
            if len(heads) == 2 else None,
            "hit_max_new_tokens": {h: sum(by_head[h][i]["hit_max"] for i in ids) for h in heads},
            "mean_new_tokens": {h: round(sum(by_head[h][i]["n_new_tokens"] for i in ids)
                                         / max(len(ids), 1), 1) for h in heads},
        }
        row.update({k: v for k, v in header.items() if k != "task"})
        out.append(row)
    return out


def _flatten(values: Iterable[Any]) -> list[bool]:
    flat: list[bool] = []
    for v in values:
        flat.extend(v if isinstance(v, list) else [v])
    return flat


def row_key(row: dict[str, Any]) -> tuple:
    fh = row.get("flashhead_config") or {}
    return (row.get("model"), row.get("task"), row.get("metric"), fh.get("probes"), fh.get("k"))


def merge_results(path: str | os.PathLike, new_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write new_rows into the JSON file at `path`, replacing rows with the same key (model, task,
    metric, probes, k) and keeping the others, so tasks can be run one call at a time."""
    path = Path(path)
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    keys = {row_key(r) for r in new_rows}
    rows = [r for r in old if row_key(r) not in keys] + new_rows
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    os.replace(tmp, path)
    return rows


def _pct(acc: dict[str, Any] | None) -> str:
    if not acc:
        return "-"
    lo, hi = acc["ci95"]
    return f"{100 * acc['acc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table: accuracy (95% CI) per head, paired difference, flips, p-value."""
    head = ("task", "metric", "n", "dense % [95% CI]", "FlashHead % [95% CI]", "diff pp",
            "D+F-", "D-F+", "p")
    lines = [head]
    for r in rows:
        p = r.get("paired")
        n = r["dense"]["n"] if r.get("dense") else r.get("n_items")
        lines.append((r["task"], r["metric"], str(n), _pct(r.get("dense")),
                      _pct(r.get("flashhead")),
                      f"{100 * p['diff']:+.1f}" if p else "-", str(p["a_only"]) if p else "-",
                      str(p["b_only"]) if p else "-", f"{p['p_value']:.3g}" if p else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text) + "\n(D+F-: dense right, FlashHead wrong; D-F+: the reverse; " \
                             "p: exact McNemar)"
