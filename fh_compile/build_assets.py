"""Build FlashHead assets from an LM-head weight.  Command line: `python -m fh_compile build-assets`
(or `fh-build-assets`, or `python -m fh_compile.build_assets`), in fh_compile.cli."""

from __future__ import annotations

import time
from typing import Sequence

import torch

from fh_compile.assets import FlashHeadAssets, weight_fingerprint
from fh_compile.clustering import ClusterConfig, cluster_rows

CENTROID_MODES = ("mean", "normalized")


def centroids_for(weight_sorted: torch.Tensor, offsets: torch.Tensor, mode: str) -> torch.Tensor:
    """Scoring vectors [K, D] for clusters laid out by `offsets` over `weight_sorted` [V, D].

    mode "mean": the mean of the cluster's raw rows, so h . c is the cluster's mean logit (keeps
    the row norms, which decide which tokens win).  "normalized": the unit spherical centroid.
    """
    if mode not in CENTROID_MODES:
        raise ValueError(f"centroid_mode must be one of {CENTROID_MODES}, got {mode!r}")
    V, D = weight_sorted.shape
    sizes = (offsets[1:] - offsets[:-1]).to(weight_sorted.device)
    cluster = torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device), sizes)
    rows = weight_sorted.float()
    if mode == "normalized":
        rows = torch.nn.functional.normalize(rows, dim=-1)
    sums = torch.zeros(sizes.numel(), D, device=rows.device).index_add_(0, cluster, rows)
    cent = sums / sizes.clamp(min=1).unsqueeze(1).float()
    if mode == "normalized":
        cent = torch.nn.functional.normalize(cent, dim=-1)
    return cent.to(weight_sorted.dtype)


def build_assets(weight: torch.Tensor, *, cluster_size: int = 16, centroid_mode: str = "mean",
                 coarse_iters: int = 12, fine_iters: int = 12, refine_iters: int = 6,
                 groups: int | None = None, seed: int = 0, fingerprint: str | None = None,
                 refine_metric: str | None = None,
                 always_ids: Sequence[int] | None = None,
                 fit_hidden: torch.Tensor | None = None, fit_config=None,
                 fit_source: str | None = None) -> FlashHeadAssets:
    """Cluster the rows of an LM-head weight [V, D] and return FlashHead assets.

    Balanced spherical k-means (see fh_compile.clustering: exact capacities enforced in every
    assignment round; two levels, then flat refinement).  Every cluster holds `cluster_size` rows except that, when V is
    not divisible, the last clusters hold one fewer.  Rows are reordered cluster by cluster (by
    vocabulary id inside a cluster).  Runs on weight's device; the result stays there.
    refine_metric (None: the one that matches centroid_mode) is "euclidean" for "mean" scoring
    and "cosine" for "normalized" scoring (see fh_compile.clustering).
    always_ids: vocabulary ids to score at every step (fh_compile.always.always_scored_ids or
    always_ids_for_model_files), recorded in the assets' metadata; None records none (the head
    then takes them from the model).  `fh_compile.always.always_report` checks each one.
    fit_hidden [N, D]: the model's hidden states on calibration text (fh_compile.calibration);
    then the mean centroids are fitted to them (fh_compile.centroid_fit, fit_config or its
    defaults; same clusters, same op) and params["centroid_fit"] records the fit and fit_source
    (a sentence naming the calibration text).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    if cluster_size > weight.shape[0]:
        raise ValueError(f"cluster_size {cluster_size} exceeds the vocabulary size {weight.shape[0]}")
    if centroid_mode not in CENTROID_MODES:
        raise ValueError(f"centroid_mode must be one of {CENTROID_MODES}, got {centroid_mode!r}")
    if fit_hidden is not None and centroid_mode != "mean":
        raise ValueError("fit_hidden fits the mean centroids: use centroid_mode='mean'")
    if refine_metric is None:
        refine_metric = "euclidean" if centroid_mode == "mean" else "cosine"
    cfg = ClusterConfig(cluster_size=cluster_size, coarse_iters=coarse_iters,
                        fine_iters=fine_iters, refine_iters=refine_iters, groups=groups,
                        seed=seed, refine_metric=refine_metric)
    weight = weight.detach()
    t0 = time.perf_counter()
    cluster = cluster_rows(weight, cfg)                                 # [V] int64
    V = weight.shape[0]
    order = torch.argsort(cluster * V + torch.arange(V, device=cluster.device))
    counts = torch.bincount(cluster, minlength=int(cluster.max()) + 1)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64)
    weight_sorted = weight[order].contiguous()
    params = {"centroid_mode": centroid_mode, "coarse_iters": coarse_iters,
              "fine_iters": fine_iters, "refine_iters": refine_iters, "groups": groups,
              "refine_metric": refine_metric, "seed": seed,
              "algorithm": "two-level balanced spherical k-means + flat refinement",
              "build_seconds": round(time.perf_counter() - t0, 3),
              "build_device": str(weight.device)}
    assets = FlashHeadAssets(
        centroids=centroids_for(weight_sorted, offsets, centroid_mode),
        weight=weight_sorted, offsets=offsets.to(weight.device), token_ids=order.to(torch.int64),
        cluster_size=cluster_size, fingerprint=fingerprint or weight_fingerprint(weight),
        params=params, always_ids=None if always_ids is None else list(always_ids))
    if fit_hidden is not None:
        from fh_compile.centroid_fit import CentroidFitConfig, fit_assets
        assets = fit_assets(assets, fit_hidden, fit_config or CentroidFitConfig(),
                            fit_source or "hidden states of unnamed calibration text")
    return assets


def main(argv: list[str] | None = None) -> int:
    """`python -m fh_compile.build_assets` (the same command as `python -m fh_compile
    build-assets` and `fh-build-assets`; see fh_compile.cli)."""
    from fh_compile.cli import build_assets_main

    return build_assets_main(argv, prog="python -m fh_compile.build_assets")


if __name__ == "__main__":
    raise SystemExit(main())
