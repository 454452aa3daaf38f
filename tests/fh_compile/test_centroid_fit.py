"""Centroid fitting: targets against brute force, and a fit that beats the mean centroids on
fresh hidden states of a head whose clusters each hide one long (often winning) row."""

import pytest
import torch

from fh_compile.centroid_fit import (CentroidFitConfig, argmax_cluster_rank, cluster_targets,
                                     fit_centroids)


def _head(K=40, C=16, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    W = mu.repeat_interleave(C, 0) + 0.3 * torch.randn(K * C, D, generator=g)
    W[torch.arange(K) * C] += 2.0 * torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    perm = torch.randperm(K * C, generator=g)                           # clusters not contiguous
    token_cluster = torch.arange(K).repeat_interleave(C)[perm]
    W = W[perm]
    mean = torch.zeros(K, D).index_add_(0, token_cluster, W) / C
    return W, token_cluster, mean


def test_cluster_targets_match_brute_force(fresh_seed):
    W, tc, _ = _head(K=7, C=5, D=12, seed=fresh_seed % 1000)
    h = 2 * torch.randn(37, 12)
    tg = cluster_targets(h, W, tc, 7, temperature=0.7, top=3, chunk=10)
    z = (h.bfloat16() @ W.bfloat16().t()).float()
    p = torch.softmax(z / 0.7, dim=1)
    mass = torch.stack([p[:, tc == k].sum(1) for k in range(7)], dim=1)   # [N, K]
    torch.testing.assert_close(tg.mass, mass.topk(3, dim=1).values)
    assert torch.equal(tg.top1, tc[z.argmax(1)])
    torch.testing.assert_close(mass.gather(1, tg.idx), tg.mass)


def test_argmax_cluster_rank():
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cent = torch.tensor([[3.0, 0.0], [2.0, 5.0], [1.0, 1.0]])
    assert argmax_cluster_rank(h, cent, torch.tensor([2, 2])).tolist() == [2, 1]


def test_fit_beats_mean_centroids_on_fresh_states():
    W, tc, mean = _head()
    torch.manual_seed(1)
    train, fresh = 3 * torch.randn(3000, 32), 3 * torch.randn(2000, 32)
    res = fit_centroids(train, W, tc, mean, CentroidFitConfig(epochs=6, lr=1e-2, batch=128,
                                                             select_probes=8), log=lambda s: None)
    assert res.centroids.shape == mean.shape and res.best_epoch > 0
    assert res.history[res.best_epoch]["held_out_miss"] == min(r["held_out_miss"] for r in res.history)
    top1 = cluster_targets(fresh, W, tc, 40, 1.0, 1).top1
    hit = {n: (argmax_cluster_rank(fresh, c, top1) < 4).float().mean().item()
           for n, c in (("mean", mean), ("fit", res.centroids))}
    assert hit["fit"] > hit["mean"] + 0.05, hit
    summary = res.summary(CentroidFitConfig(), 3000)
    assert summary["positions"] == 3000 and len(summary["history"]) == 7


def test_argmax_weight_one_fits_the_argmax_cluster():
    W, tc, mean = _head(seed=2)
    torch.manual_seed(2)
    res = fit_centroids(3 * torch.randn(2000, 32), W, tc, mean,
                        CentroidFitConfig(epochs=3, lr=1e-2, batch=128, argmax_weight=1.0,
                                          select_probes=8), log=lambda s: None)
    assert res.history[res.best_epoch]["held_out_miss"] < res.history[0]["held_out_miss"]


def test_errors():
    W, tc, mean = _head(K=4, C=4, D=8)
    with pytest.raises(ValueError, match="hidden states must be"):
        fit_centroids(torch.randn(10, 9), W, tc, mean, CentroidFitConfig())
    with pytest.raises(ValueError, match="one cluster id per vocabulary row"):
        fit_centroids(torch.randn(10, 8), W, tc[:-1], mean, CentroidFitConfig())
    with pytest.raises(ValueError, match="at least 2"):
        fit_centroids(torch.randn(1, 8), W, tc, mean, CentroidFitConfig())
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"argmax_weight": 1.5}, {"holdout": 1.0}):
        with pytest.raises(ValueError):
            CentroidFitConfig(**bad)


def test_build_assets_with_fit_hidden_keeps_the_clustering():
    from fh_compile.build_assets import build_assets

    W, _, _ = _head(K=12, C=16, D=32, seed=3)
    h = 3 * torch.randn(600, 32)
    kw = dict(coarse_iters=2, fine_iters=2, refine_iters=1)
    plain = build_assets(W, **kw)
    fitted = build_assets(W, **kw, fit_hidden=h, fit_source="random states",
                          fit_config=CentroidFitConfig(epochs=2, lr=1e-2, select_probes=2))
    assert torch.equal(plain.token_ids, fitted.token_ids) and torch.equal(plain.offsets, fitted.offsets)
    assert fitted.centroids.shape == plain.centroids.shape
    fit = fitted.params["centroid_fit"]
    assert fit["source"] == "random states" and fit["positions"] == 600 and fit["init"] == "mean"
    if fit["best_epoch"] > 0:
        assert not torch.equal(fitted.centroids, plain.centroids)
    else:
        assert torch.equal(fitted.centroids, plain.centroids)
    with pytest.raises(ValueError, match="fit_hidden fits the mean centroids"):
        build_assets(W, centroid_mode="normalized", fit_hidden=h)


def test_pull_only_leaves_clusters_without_target_mass_alone():
    W, tc, mean = _head(seed=4)
    torch.manual_seed(4)
    # Hidden states near the first 10 clusters' rows only: the other 30 never hold the top mass.
    h = 4 * W[tc < 10][torch.randint(0, 160, (800,))] + 0.1 * torch.randn(800, 32)
    tg = cluster_targets(h, W, tc, 40, 1.0, 1)
    unused = torch.ones(40, dtype=torch.bool)
    unused[tg.idx.unique()] = False
    assert int(unused.sum()) >= 20
    cfg = dict(epochs=2, lr=1e-2, batch=64, top_clusters=1, select_probes=2)
    pulled = fit_centroids(h, W, tc, mean, CentroidFitConfig(**cfg, pull_only=True), log=lambda s: None)
    pushed = fit_centroids(h, W, tc, mean, CentroidFitConfig(**cfg, pull_only=False),
                           log=lambda s: None)
    assert pulled.best_epoch > 0 and pushed.best_epoch > 0
    assert torch.equal(pulled.centroids[unused], mean[unused])
    assert not torch.equal(pulled.centroids[~unused], mean[~unused])
    assert not torch.equal(pushed.centroids[unused], mean[unused])
