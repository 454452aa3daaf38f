"""Flat refinement: the Euclidean metric (raw rows) and the bias form of balanced_assign_sparse."""

import pytest
import torch

from fh_compile.build_assets import build_assets
from fh_compile.clustering import ClusterConfig, balanced_assign_sparse, cluster_rows, cluster_sizes


def test_bias_gives_euclidean_assignment(fresh_seed):
    # Loose capacities, so every row gets its unconstrained nearest centroid.
    x = torch.randn(200, 12)
    cent = torch.randn(10, 12) * 2
    sizes = torch.full((10,), 200, dtype=torch.int64)
    got = balanced_assign_sparse(x, cent, sizes, candidates=4, bias=-0.5 * (cent * cent).sum(1))
    assert torch.equal(got, torch.cdist(x, cent).argmin(1))
    assert torch.equal(balanced_assign_sparse(x, cent, sizes, candidates=4), (x @ cent.t()).argmax(1))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_refinement_keeps_exact_balance(metric, fresh_seed):
    w = torch.randn(1003, 24) * torch.rand(1003, 1)                     # rows of varied norms
    cl = cluster_rows(w, ClusterConfig(cluster_size=16, coarse_iters=2, fine_iters=2,
                                       refine_iters=2, refine_metric=metric))
    assert torch.equal(torch.bincount(cl, minlength=63), cluster_sizes(1003, 16))


def test_euclidean_refinement_separates_norms():
    # Two groups with the same directions but norms 1 and 5: cosine cannot tell them apart,
    # Euclidean clusters never mix a short row with a long one.
    torch.manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).repeat_interleave(16, 0)
    dirs = dirs + 0.01 * torch.randn_like(dirs)
    w = torch.cat([dirs, 5 * dirs])                                     # [256, 16]
    cl = cluster_rows(w, ClusterConfig(cluster_size=16, coarse_iters=4, fine_iters=4,
                                       refine_iters=4, refine_metric="euclidean"))
    long_row = torch.arange(256) >= 128
    mixed = [k for k in range(16) if long_row[cl == k].any() and (~long_row[cl == k]).any()]
    assert not mixed


def test_refine_metric_follows_centroid_mode():
    w = torch.randn(100, 8)
    assert build_assets(w, coarse_iters=1, fine_iters=1, refine_iters=1).params["refine_metric"] == "euclidean"
    a = build_assets(w, centroid_mode="normalized", coarse_iters=1, fine_iters=1, refine_iters=1)
    assert a.params["refine_metric"] == "cosine"
    with pytest.raises(ValueError, match="refine_metric"):
        ClusterConfig(refine_metric="manhattan")
