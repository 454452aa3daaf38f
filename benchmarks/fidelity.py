"""How closely does FlashHead follow the dense LM head on real text?  (top-1 agreement, top-5/10
recall, and total variation of the sampling distribution, per data set and probe count.)

    python -m benchmarks.fidelity --model PATH [--assets DIR [DIR ...]] [--tokens N]
        [--probes 32 64 128 256 512] [--out results/fidelity.json]

Hidden states are the LM head's inputs under teacher forcing (benchmarks.fidelity_data) and are
cached as safetensors under --cache-dir, so a re-run only redoes the metrics.  Without --assets the
benchmark builds one clustering per --clusterings entry (k-means iterations per level : flat
refinement iterations [: refinement metric]), caches the assets under --cache-dir, and scores each with every
--centroid-modes scoring vector (same clustering, centroids recomputed with centroids_for); with
--assets it scores the assets' own stored centroids unless --centroid-modes says otherwise (several
asset folders of one head, e.g. mean and fitted centroids, are scored in one pass over the dense
logits).
Metric definitions: benchmarks.fidelity_metrics.  The dense reference is h @ W^T in fp32 with W the
head weight from load_lm_head_weight (fp32 dequantized for a GGUF).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import fidelity_data as fd
from benchmarks.fidelity_metrics import (HeadClusters, PositionStats, position_stats,
                                         probes_for_agreement, summarize)
from fh_compile.assets import AssetError, FlashHeadAssets, weight_fingerprint
from fh_compile.build_assets import CENTROID_MODES, build_assets, centroids_for

TEMPERATURES = (0.6, 1.0)


@dataclass
class FidelityConfig:
    model: str
    assets: str | tuple[str, ...] | None = None     # one or more asset folders
    tokens: int = 2000                         # positions per data set
    per_item: int | None = 64                  # at most this many positions per conversation
    probes: tuple[int, ...] = (32, 64, 128, 256, 512)
    datasets: tuple[str, ...] = fd.DATASETS
    clusterings: tuple[str, ...] = ("12:6", "12:3")  # "iters:refine_iters[:metric]"
    # None: ("stored",) (the centroids saved in assets) with assets, else every CENTROID_MODES
    centroid_modes: tuple[str, ...] | None = None
    cluster_size: int = 16
    dtype: str = "bfloat16"                    # model dtype for the hidden states
    prompt_format: str = "chat"                # "plain" for base models without a chat template
    max_len: int = 1024
    seed: int = 0
    data_dir: str = "/work/shared/data"
    cache_dir: str = "results/fidelity_cache"
    out: str = "results/fidelity.json"
    threads: int = 2
    builds: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.assets, str):
            self.assets = (self.assets,)
        if self.centroid_modes is None:
            self.centroid_modes = ("stored",) if self.assets else CENTROID_MODES
        if self.per_item is not None and self.per_item < 1:
            raise ValueError(f"--per-item must be >= 1, got {self.per_item}")
        if self.tokens < 1:
            raise ValueError(f"--tokens must be >= 1, got {self.tokens}")
        if not self.probes or min(self.probes) < 1:
            raise ValueError(f"--probes must be positive integers, got {self.probes}")
        for d in self.datasets:
            if d not in fd.DATASETS:
                raise ValueError(f"unknown data set {d!r}; choose from {fd.DATASETS}")
        for m in self.centroid_modes:
            if m not in (*CENTROID_MODES, "stored"):
                raise ValueError(f"unknown centroid mode {m!r}; choose from {CENTROID_MODES} "
                                 f"or 'stored' (the centroids saved in --assets)")
            if m == "stored" and not self.assets:
                raise ValueError("centroid mode 'stored' scores the centroids saved in --assets; "
                                 "pass --assets DIR or choose from " + str(CENTROID_MODES))
        for c in self.clusterings:
            parts = c.split(":")
            if (len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[:2])
                    or int(parts[0]) < 1 or parts[2:] not in ([], ["euclidean"], ["cosine"])):
                raise ValueError(f"--clusterings entries are ITERS:REFINE[:euclidean|cosine] "
                                 f"(e.g. 12:3), got {c!r}")
        if self.prompt_format not in fd.PROMPT_FORMATS:
            raise ValueError(f"--prompt-format must be one of {fd.PROMPT_FORMATS}, got "
                             f"{self.prompt_format!r}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"--dtype must name a torch dtype (bfloat16, float32), got {self.dtype}")


def hidden_sets(cfg: FidelityConfig, head_fp: str) -> dict[str, fd.HiddenSet]:
    """Cached or freshly collected hidden states per data set (the model loads only on a miss)."""
    model = tok = None
    out = {}
    for name in cfg.datasets:
        meta = {"model": cfg.model, "head": head_fp, "dataset": name, "positions": cfg.tokens,
                "max_len": cfg.max_len, "seed": cfg.seed, "dtype": cfg.dtype,
                "per_item": cfg.per_item, "prompt_format": cfg.prompt_format, "version": 3}
        path = Path(cfg.cache_dir) / f"hidden-{name}-{fd.cache_key(meta)}.safetensors"
        hs = fd.load_hidden(path, meta)
        if hs is None:
            if model is None:
                from fh_compile.loading import load_model
                t0 = time.perf_counter()
                model, tok = load_model(cfg.model, dtype=getattr(torch, cfg.dtype))
                print(f"loaded {cfg.model} in {time.perf_counter() - t0:.0f} s")
            t0 = time.perf_counter()
            hs = fd.collect_hidden(model, tok, name, Path(cfg.data_dir), cfg.tokens,
                                   cfg.max_len, cfg.seed, per_item=cfg.per_item,
                                   prompt_format=cfg.prompt_format)
            fd.save_hidden(path, hs, meta)
            print(f"{name}: {hs.h.shape[0]} positions from {int(hs.item.max()) + 1} items in "
                  f"{time.perf_counter() - t0:.0f} s -> {path}")
        out[name] = hs
    return out


def clusterings(cfg: FidelityConfig, weight: torch.Tensor, fp: str
                ) -> list[tuple[str, FlashHeadAssets]]:
    """(label, assets) per clustering: the given --assets, or built (and cached) per entry."""
    if cfg.assets:
        found = []
        for folder in cfg.assets:
            assets = FlashHeadAssets.load(folder)
            assets.check_matches(weight.to(assets.weight.dtype))
            cfg.builds.append({"clustering": f"assets:{Path(folder).name}", "params": assets.params})
            found.append((f"assets:{Path(folder).name}", assets))
        return found
    found = []
    code = _clustering_code_hash()    # a cached clustering is stale once the algorithm changes
    for spec in cfg.clusterings:
        iters, refine, *metric = spec.split(":")
        iters, refine, metric = int(iters), int(refine), (metric or ["euclidean"])[0]
        label = f"i{iters}:r{refine}" + ("" if metric == "euclidean" else f":{metric}")
        folder = (Path(cfg.cache_dir) / f"assets-{fp[:12]}-C{cfg.cluster_size}-i{iters}-r{refine}"
                                        f"-{metric}-s{cfg.seed}-{code}")
        try:
            assets = FlashHeadAssets.load(folder)
            assets.check_matches(weight, fp)
            print(f"clustering {label}: cached in {folder}")
        except AssetError:
            t0 = time.perf_counter()
            assets = build_assets(weight, cluster_size=cfg.cluster_size, centroid_mode="mean",
                                  coarse_iters=iters, fine_iters=iters, refine_iters=refine,
                                  refine_metric=metric,
                                  seed=cfg.seed, fingerprint=fp)
            seconds = time.perf_counter() - t0
            assets.params["build_total_seconds"] = round(seconds, 1)
            assets.save(folder)
            print(f"clustering {label}: built in {seconds:.0f} s -> {folder}")
        cfg.builds.append({"clustering": label, "params": assets.params})
        found.append((label, assets))
    return found


def _clustering_code_hash() -> str:
    import hashlib
    import inspect

    from fh_compile import build_assets as ba, clustering
    src = inspect.getsource(clustering) + inspect.getsource(ba)
    return hashlib.sha256(src.encode()).hexdigest()[:8]


def run(cfg: FidelityConfig) -> dict:
    from fh_compile.loading import load_lm_head_weight

    torch.set_num_threads(cfg.threads)
    weight = load_lm_head_weight(cfg.model, dtype=torch.float32)       # [V, D] fp32
    V = weight.shape[0]
    fp = weight_fingerprint(weight)
    sets = hidden_sets(cfg, fp)
    variants: list[tuple[str, str, HeadClusters]] = []
    for label, assets in clusterings(cfg, weight, fp):
        for mode in cfg.centroid_modes:
            cent = (assets.centroids.float() if mode == "stored"
                    else centroids_for(assets.weight.float(), assets.offsets, mode))
            variants.append((label, mode, HeadClusters.from_assets(assets, cent)))
    rows, curves = [], []
    for name, hs in sets.items():
        t0 = time.perf_counter()
        all_stats = position_stats(hs.h, weight, [v[2] for v in variants], cfg.probes, TEMPERATURES)
        print(f"{name}: metrics for {len(variants)} variants in {time.perf_counter() - t0:.0f} s")
        everywhere = torch.ones_like(hs.is_answer)
        for (label, mode, _), stats in zip(variants, all_stats):
            for subset, mask in (("all", everywhere), ("answer", hs.is_answer)):
                if not bool(mask.any()):
                    continue
                st = stats.subset(mask)
                hit = (st.dense_top1 == hs.next_ids[mask]).float().mean()
                common = {"dataset": name, "positions_subset": subset, "clustering": label,
                          "centroid_mode": mode,
                          "probes_for_agreement_0.99": probes_for_agreement(st, 0.99),
                          "dense_next_token_accuracy": float(hit)}
                always = hs.always_ids if hs.always_ids.numel() else None
                rows += [{**common, **r} for r in summarize(st, V, cfg.cluster_size, always)]
                if subset == "all":
                    curves.append((name, label, mode, st))
    return {"model": cfg.model, "head_fingerprint": fp, "vocab_size": V,
            "hidden_size": weight.shape[1], "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.fidelity", *sys.argv[1:]]),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": cfg.threads, "model_dtype": cfg.dtype, "temperatures": list(TEMPERATURES),
            "builds": cfg.builds, "rows": rows, "_curves": curves}


def print_tables(result: dict) -> None:
    rows = result["rows"]
    first = (rows[0]["clustering"], rows[0]["centroid_mode"])
    print(f"\nFidelity vs the dense head: clustering {first[0]}, {first[1]} centroids "
          f"(all positions; answer = positions predicting assistant text)")
    print(f"{'dataset':<16}{'P':>5}{'%V':>7}{'top1':>8}{'top5':>8}{'top10':>8}{'TV0.6':>9}"
          f"{'TV1.0':>9}{'TV1 p99':>9}")
    for r in rows:
        if (r["clustering"], r["centroid_mode"]) != first:
            continue
        ds = r["dataset"] + ("" if r["positions_subset"] == "all" else "/answer")
        print(f"{ds:<16}{r['probes']:>5}{100 * r['vocab_fraction']:>6.2f}%{r['top1_agreement']:>8.4f}"
              f"{r['top5_recall']:>8.4f}{r['top10_recall']:>8.4f}{r['tv_t0.6']:>9.5f}"
              f"{r['tv_t1']:>9.5f}{r['tv_t1_p99']:>9.5f}")
    print("\ntop-1 agreement per variant (all positions); P99 = probes needed for 0.99")
    probes = sorted({r["probes"] for r in rows})
    w = max(12, *(len(r["clustering"]) + 2 for r in rows))
    print(f"{'dataset':<10}{'clustering':<{w}}{'centroids':<11}"
          + "".join(f"{'P=' + str(p):>8}" for p in probes) + f"{'P99':>6}")
    seen = {}
    for r in rows:
        if r["positions_subset"] == "all":
            seen.setdefault((r["dataset"], r["clustering"], r["centroid_mode"]), {})[r["probes"]] = r
    for (ds, cl, mode), by_p in seen.items():
        p99 = next(iter(by_p.values()))["probes_for_agreement_0.99"]
        print(f"{ds:<10}{cl:<{w}}{mode:<11}"
              + "".join(f"{by_p[p]['top1_agreement']:>8.4f}" for p in probes) + f"{p99:>6}")
    if not any("eos_positions" in r for r in rows):
        return
    print("\nend-of-turn/eos recall: positions whose dense argmax is an always-scored id (n), "
          "FlashHead top-1 agreement there without / with always-scored ids")
    print(f"{'dataset':<10}{'clustering':<{w}}{'centroids':<11}{'n':>5}"
          + "".join(f"{'P=' + str(p):>13}" for p in probes))
    for (ds, cl, mode), by_p in seen.items():
        n = next(iter(by_p.values())).get("eos_positions", 0)
        cells = "".join(f"{by_p[p]['eos_top1_recall']:>6.3f} /{by_p[p]['eos_top1_recall_always']:>5.3f}"
                        if n else f"{'-':>13}" for p in probes)
        print(f"{ds:<10}{cl:<{w}}{mode:<11}{n:>5}" + cells)


def plot(result: dict, png: Path, max_probes: int) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    curves = result["_curves"]
    names = list(dict.fromkeys(c[0] for c in curves))
    labels = list(dict.fromkeys(c[1] for c in curves))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), sharey=True, squeeze=False)
    xs = torch.arange(1, max_probes + 1)
    for ax, name in zip(axes[0], names):
        for _, label, mode, st in (c for c in curves if c[0] == name):
            ys = (st.topk_rank[:, 0].unsqueeze(0) < xs.unsqueeze(1)).float().mean(1)
            ax.plot(xs, ys, color=f"C{labels.index(label)}", label=f"{label} {mode}",
                    linestyle="-" if mode == "mean" else "--", linewidth=1.2)
        ax.axhline(0.99, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlim(8, max_probes)
        ax.set_ylim(0.85, 1.001)
        ax.set_xlabel("probed clusters P")
        ax.set_title(f"{name} ({st.topk_rank.shape[0]} positions)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 agreement with the dense head")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(Path(result["model"]).name, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder, hub id, or .gguf file")
    p.add_argument("--assets", nargs="+",
                   help="evaluate these FlashHead asset folders instead of building")
    p.add_argument("--tokens", type=int, default=2000, help="positions per data set")
    p.add_argument("--probes", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--per-item", type=int, default=64,
                   help="at most this many positions per conversation (0: all)")
    p.add_argument("--datasets", nargs="+", default=list(fd.DATASETS))
    p.add_argument("--clusterings", nargs="+", default=["12:6", "12:3"],
                   help="ITERS:REFINE[:METRIC] per clustering to build: k-means iterations per "
                        "level, flat refinement iterations, refinement metric (euclidean|cosine)")
    p.add_argument("--centroid-modes", nargs="+",
                   help=f"scoring vectors per clustering: {', '.join(CENTROID_MODES)} (recomputed "
                        f"from the clustering) or stored (the centroids in --assets); default: "
                        f"stored with --assets, else all recomputed modes")
    p.add_argument("--dtype", default="bfloat16", help="model dtype for the hidden states")
    p.add_argument("--prompt-format", choices=fd.PROMPT_FORMATS, default="chat",
                   help="chat: the tokenizer's chat template; plain: user text, blank line, answer "
                        "(base models without a chat template)")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="/work/shared/data")
    p.add_argument("--cache-dir", default="results/fidelity_cache")
    p.add_argument("--out", default="results/fidelity.json")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    cfg = FidelityConfig(model=a.model, assets=tuple(a.assets) if a.assets else None,
                         tokens=a.tokens, probes=tuple(a.probes),
                         per_item=a.per_item or None,
                         datasets=tuple(a.datasets), clusterings=tuple(a.clusterings),
                         centroid_modes=tuple(a.centroid_modes) if a.centroid_modes else None,
                         dtype=a.dtype, prompt_format=a.prompt_format, max_len=a.max_len,
                         seed=a.seed, data_dir=a.data_dir, cache_dir=a.cache_dir, out=a.out,
                         threads=a.threads)
    result = run(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({k: v for k, v in result.items() if not k.startswith("_")},
                              indent=1) + "\n")
    plot(result, out.with_suffix(".png"), max(1024, max(cfg.probes)))
    print_tables(result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
