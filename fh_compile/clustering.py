"""Balanced spherical k-means for LM-head rows, two levels deep so it runs on a laptop CPU.

Balance is exact and enforced in every assignment step (not by post-hoc repair): each cluster has a
fixed capacity, and points are assigned by rounds of proposals.  In a round every unassigned point
proposes to its most similar cluster that still has room; each cluster accepts its best proposals up
to its remaining capacity and is closed when full; rejected points propose again next round.  The
rounds end when every point is placed, after at most (number of clusters + 1) rounds.

Two levels: the rows are first split into G ~ sqrt(K) balanced groups whose capacities are sums of
whole clusters, then each group is split into its clusters of C rows.  Each level is spherical
k-means (unit-norm rows, cosine similarity, unit-norm centroids) with the balanced assignment above.
Work per iteration is O(V * (G + K/G) * D) instead of O(V * K * D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class ClusterConfig:
    cluster_size: int = 16
    coarse_iters: int = 12
    fine_iters: int = 12
    groups: int | None = None  # None: round(sqrt(K))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.cluster_size < 1:
            raise ValueError(f"cluster_size must be >= 1, got {self.cluster_size}")
        if self.coarse_iters < 1 or self.fine_iters < 1:
            raise ValueError("coarse_iters and fine_iters must be >= 1")
        if self.groups is not None and self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")


def cluster_sizes(vocab_size: int, cluster_size: int) -> torch.Tensor:
    """Sizes [K] int64: all C, except that the last clusters hold C - 1 when C does not divide V."""
    K = math.ceil(vocab_size / cluster_size)
    base, extra = divmod(vocab_size, K)
    sizes = torch.full((K,), base, dtype=torch.int64)
    sizes[:extra] += 1
    return sizes


def balanced_assign(sim: torch.Tensor, caps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Assign points to clusters under exact capacities.

    sim:   [G, N, M] float  similarity of point n to cluster m, in G independent problems
    caps:  [G, M] int64     capacity of each cluster (0 for padding clusters)
    valid: [G, N] bool      False for padding points; sum(valid[g]) must equal sum(caps[g])
    returns assign [G, N] int64, -1 for padding points
    """
    G, N, M = sim.shape
    assign = torch.full((G, N), -1, dtype=torch.int64, device=sim.device)
    remaining = caps.clone()
    open_pts = valid.clone()
    for _ in range(M + 1):
        if not bool(open_pts.any()):
            return assign
        masked = sim.masked_fill((remaining == 0).unsqueeze(1), float("-inf"))
        val, best = masked.max(dim=2)                                   # [G, N]
        g_idx, n_idx = open_pts.nonzero(as_tuple=True)
        v, key = val[g_idx, n_idx], g_idx * M + best[g_idx, n_idx]
        # Sort proposals by cluster, best first inside each cluster (two stable sorts).
        order = torch.sort(v, descending=True, stable=True).indices
        order = order[torch.sort(key[order], stable=True).indices]
        key_s = key[order]
        first = torch.searchsorted(key_s, key_s, right=False)
        rank = torch.arange(key_s.numel(), device=sim.device) - first
        accept = rank < remaining.view(-1)[key_s]
        acc = order[accept]
        assign[g_idx[acc], n_idx[acc]] = best[g_idx[acc], n_idx[acc]]
        open_pts[g_idx[acc], n_idx[acc]] = False
        remaining.view(-1).index_add_(0, key[acc], torch.full_like(key[acc], -1))
    raise AssertionError("balanced_assign did not converge; capacities do not match points")


def spherical_kmeans(x: torch.Tensor, caps: torch.Tensor, valid: torch.Tensor, iters: int,
                     generator: torch.Generator, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced spherical k-means on G independent groups.

    x: [G, N, D] unit-norm rows (padding rows arbitrary); caps [G, M]; valid [G, N]
    returns (assign [G, N] int64, centroids [G, M, D] unit norm)
    """
    G, N, D = x.shape
    M = caps.shape[1]
    # Init: M distinct valid points of each group, chosen at random.
    noise = torch.rand(G, N, generator=generator, device="cpu").to(x.device)
    noise = noise.masked_fill(~valid, -1.0)
    init = noise.topk(M, dim=1).indices                                 # [G, M]
    cent = torch.gather(x, 1, init.unsqueeze(-1).expand(G, M, D))
    assign = None
    for _ in tqdm(range(iters), desc=desc, leave=False):
        sim = torch.bmm(x, cent.transpose(1, 2))                        # [G, N, M]
        new_assign = balanced_assign(sim, caps, valid)
        cent = _centroids(x, new_assign, M)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
    return new_assign, cent


def _centroids(x: torch.Tensor, assign: torch.Tensor, M: int) -> torch.Tensor:
    G, N, D = x.shape
    sums = torch.zeros(G, M + 1, D, dtype=x.dtype, device=x.device)
    idx = torch.where(assign < 0, M, assign)                            # padding -> bin M
    sums.scatter_add_(1, idx.unsqueeze(-1).expand(G, N, D), x)
    return torch.nn.functional.normalize(sums[:, :M], dim=-1)


def cluster_rows(weight: torch.Tensor, cfg: ClusterConfig) -> torch.Tensor:
    """Cluster the rows of `weight` [V, D]; returns the cluster id [V] int64 of every row.

    Cluster k holds exactly cluster_sizes(V, C)[k] rows.  Runs on weight's device, in fp32.
    """
    V, D = weight.shape
    sizes = cluster_sizes(V, cfg.cluster_size).to(weight.device)
    K = sizes.numel()
    G = min(cfg.groups or max(1, round(math.sqrt(K))), K)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.nn.functional.normalize(weight.float(), dim=-1)           # [V, D] unit rows

    # Level 1: G groups; group g owns clusters [bounds[g], bounds[g+1]).
    bounds = torch.linspace(0, K, G + 1).round().long().to(weight.device)
    csum = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    group_caps = (csum[bounds[1:]] - csum[bounds[:-1]]).unsqueeze(0)    # [1, G]
    all_valid = torch.ones(1, V, dtype=torch.bool, device=weight.device)
    group, _ = spherical_kmeans(x.unsqueeze(0), group_caps, all_valid, cfg.coarse_iters, gen,
                                "coarse clusters")
    group = group[0]

    # Level 2: inside each group, clusters of the prescribed sizes.  Pad groups to equal shape.
    members = torch.argsort(group, stable=True)                         # rows sorted by group
    n_per = group_caps[0]
    n_max, m_max = int(n_per.max()), int((bounds[1:] - bounds[:-1]).max())
    starts = torch.cat([n_per.new_zeros(1), n_per.cumsum(0)[:-1]])
    pos = torch.arange(n_max, device=weight.device)
    valid = pos.unsqueeze(0) < n_per.unsqueeze(1)                       # [G, n_max]
    rows = torch.where(valid, starts.unsqueeze(1) + pos, 0)
    rows = members[rows.clamp(max=V - 1)]                               # [G, n_max] row ids
    mpos = torch.arange(m_max, device=weight.device)
    cl_valid = mpos.unsqueeze(0) < (bounds[1:] - bounds[:-1]).unsqueeze(1)
    caps = torch.where(cl_valid, sizes[(bounds[:-1].unsqueeze(1) + mpos).clamp(max=K - 1)], 0)
    local, _ = spherical_kmeans(x[rows], caps, valid, cfg.fine_iters, gen, "fine clusters")
    cluster = torch.empty(V, dtype=torch.int64, device=weight.device)
    cluster[rows[valid]] = (bounds[:-1].unsqueeze(1) + local)[valid]
    return cluster
