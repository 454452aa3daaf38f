"""Do always-scored ids chosen from calibration text raise FlashHead's top-1 agreement?

    python -m benchmarks.always_lists --model PATH --assets DIR [DIR ...] --calib DIR \
        [--lists none eos freq:32 freq:64 miss:64:128] [--probes 64 128 256 512] [--out FILE]

The op scores up to 64 always ids exactly at every step (flashhead::topk's always_ids), whatever
the probes.  This benchmark builds candidate lists from the CALIBRATION positions only (the dense
top-1 ids of the hidden states in --calib, e.g. Python stdlib docstrings from
fh_compile.calibration) and measures teacher-forced top-1 agreement on the fidelity data sets
(benchmarks.fidelity's cached hidden states; they are not used to build the lists):

  none        no always ids
  eos         the model's end-of-turn / eos ids (what compile_model adds today)
  freq:N      eos ids + the most frequent calibration top-1 ids, N ids in all
  miss:N:P    eos ids + the calibration top-1 ids most often MISSED at P probes (frequency x miss
              rate, with each asset's own centroids; in-sample for centroids fitted to --calib)

Agreement with an always list = (the dense argmax's cluster ranks < P) OR (the argmax is listed):
exact, since FlashHead's candidate logits equal the dense ones (benchmarks.fidelity_metrics).
Cost: one dense [chunk, V] fp32 product per chunk of calibration and evaluation positions.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.fidelity import FidelityConfig, hidden_sets
from benchmarks.fidelity_metrics import HeadClusters
from fh_compile.centroid_fit import argmax_cluster_rank

MAX_ALWAYS = 64       # the op's limit on always-scored ids


@dataclass
class AlwaysListsConfig:
    model: str
    assets: tuple[str, ...]
    calib: str
    lists: tuple[str, ...] = ("none", "eos", "freq:32", "freq:64", "miss:64:128")
    probes: tuple[int, ...] = (64, 128, 256, 512)
    tokens: int = 4000
    per_item: int | None = 64
    cache_dir: str = "results/fidelity_cache"
    out: str = "results/always_lists.json"
    threads: int = 2

    def __post_init__(self) -> None:
        if not self.assets:
            raise ValueError("pass at least one --assets folder")
        if not self.probes or min(self.probes) < 1:
            raise ValueError(f"--probes must be positive integers, got {self.probes}")
        for spec in self.lists:
            parse_list(spec)


def parse_list(spec: str) -> tuple[str, int, int]:
    """(kind, N, P) of a list spec: none, eos, freq:N or miss:N:P (N <= 64)."""
    parts = spec.split(":")
    kind, nums = parts[0], parts[1:]
    ok = ((kind in ("none", "eos") and not nums) or (kind == "freq" and len(nums) == 1)
          or (kind == "miss" and len(nums) == 2))
    if not ok or not all(n.isdigit() and int(n) > 0 for n in nums):
        raise ValueError(f"list specs are none, eos, freq:N or miss:N:P, got {spec!r}")
    n = int(nums[0]) if nums else 0
    if n > MAX_ALWAYS:
        raise ValueError(f"{spec!r}: the op scores at most {MAX_ALWAYS} always ids")
    return kind, n, int(nums[1]) if len(nums) == 2 else 0


def dense_top1(h: torch.Tensor, weight: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """[N] int64 argmax of h [N, D] @ weight [V, D]^T in fp32 (vocabulary order)."""
    W = weight.float().t()                                             # [D, V] fp32
    return torch.cat([(h[s:s + chunk].float() @ W).argmax(1) for s in range(0, h.shape[0], chunk)])


def frequent_ids(top1: torch.Tensor, n: int, keep: list[int] = (),
                 count: torch.Tensor | None = None) -> list[int]:
    """`keep` (e.g. eos ids, never dropped) + the ids of top1 [N] int64 seen most often, n in all.
    count [N] bool: count only those positions (e.g. the missed ones).  Ties: smaller id first."""
    keep = list(dict.fromkeys(int(i) for i in keep))
    if len(keep) > n:
        raise ValueError(f"{len(keep)} ids to keep but a list of {n}: raise n")
    seen = top1 if count is None else top1[count]
    freq = collections.Counter(seen.tolist())
    ranked = sorted(freq, key=lambda t: (-freq[t], t))
    return keep + [t for t in ranked if t not in keep][: n - len(keep)]


def agreement(rank: torch.Tensor, top1: torch.Tensor, always: list[int], P: int) -> float:
    """Top-1 agreement at P probes: rank [N] of the argmax's cluster < P, or top1 [N] listed."""
    hit = rank < P
    if always:
        hit = hit | torch.isin(top1, torch.tensor(always, dtype=top1.dtype))
    return float(hit.float().mean())


def run(cfg: AlwaysListsConfig) -> dict:
    from fh_compile.assets import FlashHeadAssets, weight_fingerprint
    from fh_compile.calibration import load_hidden
    from fh_compile.loading import load_lm_head_weight

    torch.set_num_threads(cfg.threads)
    weight = load_lm_head_weight(cfg.model, dtype=torch.float32)      # [V, D] fp32
    fcfg = FidelityConfig(model=cfg.model, assets=cfg.assets, tokens=cfg.tokens,
                          per_item=cfg.per_item, cache_dir=cfg.cache_dir)
    sets = hidden_sets(fcfg, weight_fingerprint(weight))
    hc, meta = load_hidden(cfg.calib)                                  # [Nc, D]
    calib_top = dense_top1(hc, weight)
    eos = sorted({int(i) for hs in sets.values() for i in hs.always_ids.tolist()})
    tops = {name: dense_top1(hs.h, weight) for name, hs in sets.items()}
    rows = []
    for folder in cfg.assets:
        assets = FlashHeadAssets.load(folder)
        assets.check_matches(weight.to(assets.weight.dtype))
        hcl = HeadClusters.from_assets(assets)
        calib_rank = argmax_cluster_rank(hc, hcl.centroids, hcl.token_cluster[calib_top])
        ranks = {name: argmax_cluster_rank(hs.h, hcl.centroids, hcl.token_cluster[tops[name]])
                 for name, hs in sets.items()}
        for spec in cfg.lists:
            kind, n, P_miss = parse_list(spec)
            ids = {"none": lambda: [], "eos": lambda: eos,
                   "freq": lambda: frequent_ids(calib_top, n, eos),
                   "miss": lambda: frequent_ids(calib_top, n, eos, calib_rank >= P_miss)}[kind]()
            for name in sets:
                for P in cfg.probes:
                    rows.append({"assets": Path(folder).name, "list": spec, "list_size": len(ids),
                                 "dataset": name, "probes": P, "positions": int(tops[name].numel()),
                                 "top1_agreement": agreement(ranks[name], tops[name], ids, P),
                                 "always_ids": ids})
    return {"model": cfg.model, "config": asdict(cfg), "calibration_source": meta.get("source"),
            "calibration_positions": int(hc.shape[0]), "eos_ids": eos, "rows": rows,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def table(result: dict) -> str:
    """Markdown: one line per (data set, assets, list), one column per probe count."""
    probes = result["config"]["probes"]
    lines = ["| dataset | assets | always list | " + " | ".join(f"P={p}" for p in probes) + " |",
             "|---|---|---|" + "---|" * len(probes)]
    cells: dict[tuple, dict] = {}
    for r in result["rows"]:
        cells.setdefault((r["dataset"], r["assets"], r["list"]), {})[r["probes"]] = r
    for (ds, a, lst), by_p in sorted(cells.items(), key=lambda kv: kv[0][0]):
        lines.append(f"| {ds} | {a} | {lst} ({next(iter(by_p.values()))['list_size']} ids) | "
                     + " | ".join(f"{by_p[p]['top1_agreement']:.4f}" for p in probes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.always_lists", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--assets", nargs="+", required=True)
    p.add_argument("--calib", required=True, help="calibration folder (fh_compile.calibration)")
    p.add_argument("--lists", nargs="+", default=list(AlwaysListsConfig.lists))
    p.add_argument("--probes", nargs="+", type=int, default=list(AlwaysListsConfig.probes))
    p.add_argument("--tokens", type=int, default=AlwaysListsConfig.tokens)
    p.add_argument("--per-item", type=int, default=AlwaysListsConfig.per_item)
    p.add_argument("--cache-dir", default=AlwaysListsConfig.cache_dir)
    p.add_argument("--out", default=AlwaysListsConfig.out)
    p.add_argument("--threads", type=int, default=AlwaysListsConfig.threads)
    a = p.parse_args(argv)
    cfg = AlwaysListsConfig(model=a.model, assets=tuple(a.assets), calib=a.calib,
                            lists=tuple(a.lists), probes=tuple(a.probes), tokens=a.tokens,
                            per_item=a.per_item, cache_dir=a.cache_dir, out=a.out,
                            threads=a.threads)
    result = run(cfg)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=1))
    print(f"calibration: {result['calibration_positions']} positions, "
          f"{result['calibration_source']}\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
