"""How long does building FlashHead assets take?  (build_assets on a [V, D] head, CPU or CUDA.)

    python -m benchmarks.build_time [--model PATH | --random] [--device cpu|cuda]
        [--vocab 151936 --hidden 1536] [--iters 12] [--refine 6] [--out results/build_time.json]
        [--fit-hidden DIR --fit-epochs 2]

--random (the default) times random N(0, 0.02) weights of the given shape (Qwen2.5-1.5B /
DeepSeek-R1-Distill-Qwen-1.5B: V=151936, D=1536); --model times the real LM head of a checkpoint
(load_lm_head_weight).  One timed build per repetition, no warm-up: a build is a one-off offline
step and its first run is the one users wait for.  The clustering time (build_assets' own
params.build_seconds) is reported next to the total (clustering + reorder + centroids + fingerprint).
--fit-hidden (a folder from python -m fh_compile.calibration, with --model) also times the centroid
fit to those hidden states (fh_compile.centroid_fit.fit_assets; its targets pass and epochs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fh_compile.build_assets import CENTROID_MODES, build_assets


@dataclass(frozen=True)
class BuildTimeConfig:
    model: str | None = None
    vocab: int = 151936
    hidden: int = 1536
    device: str = "cpu"
    cluster_size: int = 16
    iters: int = 12
    refine: int = 6
    centroid_mode: str = "mean"
    repeats: int = 1
    threads: int = 2
    seed: int = 0
    out: str = "results/build_time.json"
    fit_hidden: str | None = None
    fit_epochs: int = 2

    def __post_init__(self) -> None:
        if self.vocab < self.cluster_size or self.hidden < 1:
            raise ValueError(f"need vocab >= cluster_size and hidden >= 1, got V={self.vocab}, "
                             f"D={self.hidden}, C={self.cluster_size}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible")
        if self.centroid_mode not in CENTROID_MODES:
            raise ValueError(f"--centroid-mode must be one of {CENTROID_MODES}")
        if self.fit_hidden and not self.model:
            raise ValueError("--fit-hidden needs --model (hidden states belong to one model)")
        if self.repeats < 1 or self.iters < 1 or self.refine < 0:
            raise ValueError("--repeats and --iters must be >= 1, --refine >= 0")


def head_weight(cfg: BuildTimeConfig) -> tuple[torch.Tensor, str]:
    """(weight [V, D] fp32 on cfg.device, a description of where it came from)."""
    if cfg.model:
        from fh_compile.loading import load_lm_head_weight
        w = load_lm_head_weight(cfg.model, dtype=torch.float32)
        source = f"lm_head of {cfg.model}"
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        w = torch.randn(cfg.vocab, cfg.hidden, generator=gen) * 0.02
        source = "random N(0, 0.02)"
    return w.to(cfg.device), source


def run(cfg: BuildTimeConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    weight, source = head_weight(cfg)
    V, D = weight.shape
    rows = []
    for rep in range(cfg.repeats):
        if cfg.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        assets = build_assets(weight, cluster_size=cfg.cluster_size, centroid_mode=cfg.centroid_mode,
                              coarse_iters=cfg.iters, fine_iters=cfg.iters, refine_iters=cfg.refine,
                              seed=cfg.seed + rep)
        if cfg.device == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        row = {"repeat": rep, "total_seconds": round(total, 3),
               "clustering_seconds": assets.params["build_seconds"],
               "num_clusters": assets.num_clusters, "params": assets.params}
        if cfg.fit_hidden:
            from fh_compile.calibration import load_hidden
            from fh_compile.centroid_fit import CentroidFitConfig, fit_assets
            h, meta = load_hidden(cfg.fit_hidden)
            t1 = time.perf_counter()
            fitted = fit_assets(assets, h, CentroidFitConfig(epochs=cfg.fit_epochs, seed=cfg.seed),
                                meta.get("source", cfg.fit_hidden))
            row["fit_seconds"] = round(time.perf_counter() - t1, 3)
            row["fit_positions"] = h.shape[0]
            row["fit_source"] = fitted.params["centroid_fit"]["source"]
            row["total_seconds"] = round(total + row["fit_seconds"], 3)
        rows.append(row)
        print(f"repeat {rep}: {row['total_seconds']:.1f} s total, "
              f"{assets.params['build_seconds']:.1f} s clustering"
              + (f", {row['fit_seconds']:.1f} s centroid fit" if cfg.fit_hidden else ""))
    dev = torch.cuda.get_device_name() if cfg.device == "cuda" else (platform.processor() or platform.machine())
    return {"benchmark": "build_time", "source": source, "vocab_size": V, "hidden_size": D,
            "cluster_size": cfg.cluster_size, "iters": cfg.iters, "refine_iters": cfg.refine,
            "device": cfg.device, "device_name": dev, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.build_time", *sys.argv[1:]]), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.build_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="time the real LM head of this HF folder / hub id / .gguf")
    src.add_argument("--random", action="store_true", help="random weights (the default)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cluster-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=12, help="k-means iterations per level")
    p.add_argument("--refine", type=int, default=6, help="flat refinement iterations")
    p.add_argument("--centroid-mode", default="mean")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/build_time.json")
    p.add_argument("--fit-hidden", help="also fit the centroids to these calibration hidden states "
                                        "(a folder from python -m fh_compile.calibration)")
    p.add_argument("--fit-epochs", type=int, default=2)
    a = p.parse_args(argv)
    cfg = BuildTimeConfig(model=a.model, vocab=a.vocab, hidden=a.hidden, device=a.device,
                          cluster_size=a.cluster_size, iters=a.iters, refine=a.refine,
                          centroid_mode=a.centroid_mode, repeats=a.repeats, threads=a.threads,
                          seed=a.seed, out=a.out, fit_hidden=a.fit_hidden,
                          fit_epochs=a.fit_epochs)
    result = run(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    secs = [r["total_seconds"] for r in result["rows"]]
    print(f"\n{'source':<40}{'V':>8}{'D':>6}{'C':>4}{'iters':>6}{'refine':>7}{'device':>8}"
          f"{'threads':>8}{'median s':>10}")
    print(f"{result['source'][:39]:<40}{result['vocab_size']:>8}{result['hidden_size']:>6}"
          f"{cfg.cluster_size:>4}{cfg.iters:>6}{cfg.refine:>7}{cfg.device:>8}{result['threads']:>8}"
          f"{sorted(secs)[len(secs) // 2]:>10.1f}")
    if cfg.fit_hidden:
        fits = sorted(r["fit_seconds"] for r in result["rows"])
        print(f"of which centroid fit to {result['rows'][0]['fit_positions']} hidden states: "
              f"{fits[len(fits) // 2]:.1f} s ({result['rows'][0]['fit_source']})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
