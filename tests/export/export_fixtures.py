"""Settings and an eager DecodeStep shared by the export tests (tiny model: V = 275, C = 16, so
K = 18 clusters, the last ones one row short)."""

from __future__ import annotations

from pathlib import Path

import torch

PROBES, K = 4, 8
BATCH, MAX_SEQ_LEN = 2, 32


def tiny_step(folder: Path, assets_dir: Path | None = None, batch: int = BATCH,
              device: str = "cpu", dtype: torch.dtype = torch.float32, probes: int = PROBES):
    """A fresh eager DecodeStep of the tiny model with FlashHead installed (assets from
    `assets_dir`, or built now from the head in `dtype`)."""
    from fh_compile import FlashHeadAssets, build_assets, swap_head
    from fh_compile.decode import DecodeStep
    from fh_compile.loading import lm_head_of, load_model

    model, _ = load_model(folder, dtype=dtype, device=device)
    assets = (FlashHeadAssets.load(assets_dir) if assets_dir is not None else
              build_assets(lm_head_of(model).weight.detach(), cluster_size=16, coarse_iters=3,
                           fine_iters=3))
    swap_head(model, assets, probes=probes, k=K)
    return DecodeStep(model, max_batch_size=batch, max_cache_len=MAX_SEQ_LEN, k=K)
