"""Fidelity of FlashHead against the dense LM head, computed for every probe count at once.

Definitions (h a final hidden state, W [V, D] the LM head, dense logits z = h @ W^T in fp32;
FlashHead scores the K clusters by h . centroid, probes the best P, and scores every token of those
P clusters exactly, so its candidate logits equal the dense ones):

  top-1 agreement   FlashHead's argmax id == the dense argmax id.  With exact candidate logits this
                    holds iff the dense argmax token lies in a probed cluster.
  top-k recall      |dense top-k ids  ∩  FlashHead top-k ids| / k, averaged over positions.  With
                    exact candidate logits a dense top-k id is in FlashHead's top-k iff it lies in a
                    probed cluster, so this is the fraction of the dense top-k ids that are probed.
  eos recall        over the positions whose dense argmax is an end-of-turn / eos id (the op's
                    always-scored ids), the fraction where FlashHead's top-1 agrees: without
                    always-scored ids (the argmax's cluster is probed) and with them (candidates =
                    probed clusters' tokens UNION always ids; exact logits, so an always id that is
                    the dense argmax is always FlashHead's top-1).  top1_agreement_always is the
                    top-1 agreement over all positions with always ids.
  TV at temperature T
                    total-variation distance between the dense softmax p = softmax(z / T) and
                    FlashHead's sampling distribution q = softmax over the candidate set only
                    (renormalized).  With S = p's mass on the candidates, TV = 1/2 sum |p - q| =
                    1 - S exactly: the dense probability mass of the unprobed clusters.

All three only need, per position, the rank of each cluster under the centroid scores; so the
dense logits are computed once per position and every probe count is read off the ranks.
Ties in the dense logits are broken as torch.topk breaks them (they do not occur on real data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOPK = 10  # dense top-k ids tracked per position (recall is reported for k = 5 and 10)


@dataclass(frozen=True)
class HeadClusters:
    """A clustering of the vocabulary and its scoring vectors, in vocabulary order.

    token_cluster: [V] int64 cluster of each vocabulary id; centroids: [K, D]; sizes: [K] int64
    """

    token_cluster: torch.Tensor
    centroids: torch.Tensor
    sizes: torch.Tensor

    def __post_init__(self) -> None:
        K = self.centroids.shape[0]
        if self.sizes.shape != (K,):
            raise ValueError(f"sizes must be [{K}], got {tuple(self.sizes.shape)}")
        if int(self.token_cluster.min()) < 0 or int(self.token_cluster.max()) >= K:
            raise ValueError("token_cluster ids must lie in [0, K)")

    @classmethod
    def from_assets(cls, assets, centroids: torch.Tensor | None = None) -> "HeadClusters":
        """From FlashHeadAssets; `centroids` [K, D] replaces the assets' own scoring vectors."""
        sizes = (assets.offsets[1:] - assets.offsets[:-1]).cpu()
        row_cluster = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)   # [V] by row
        token_cluster = torch.empty_like(row_cluster)
        token_cluster[assets.token_ids.cpu()] = row_cluster
        cent = assets.centroids if centroids is None else centroids
        return cls(token_cluster, cent.detach().float().cpu(), sizes)


@dataclass
class PositionStats:
    """Per-position quantities from which every metric and every probe count follows.

    topk_rank:   [N, TOPK] int64  rank (0 = best) of the cluster of the dense j-th best token
    tail_mass:   {T: [N, len(probes)] fp32}  dense softmax mass at temperature T outside the probed
                 clusters, per probe count (= TV at T)
    candidates:  [N, len(probes)] int64  number of vocabulary rows scored, per probe count
    dense_top1:  [N] int64  the dense argmax id (for a sanity check against the next token)
    """

    probes: tuple[int, ...]
    topk_rank: torch.Tensor
    tail_mass: dict[float, torch.Tensor]
    candidates: torch.Tensor
    dense_top1: torch.Tensor

    def subset(self, mask: torch.Tensor) -> "PositionStats":
        """The positions where mask [N] bool is True."""
        return PositionStats(self.probes, self.topk_rank[mask],
                             {T: t[mask] for T, t in self.tail_mass.items()},
                             self.candidates[mask], self.dense_top1[mask])


def position_stats(h: torch.Tensor, weight: torch.Tensor, clusterings: list[HeadClusters],
                   probes: tuple[int, ...], temperatures: tuple[float, ...],
                   chunk: int = 256) -> list[PositionStats]:
    """PositionStats for each clustering, on hidden states h [N, D] and the dense head W [V, D].

    Cost: one dense [chunk, V] fp32 logit matrix per chunk, shared by all clusterings, probe
    counts and temperatures; per clustering a [chunk, K] score matrix and a [chunk, K] mass
    histogram per temperature.
    """
    W = weight.float()
    out = [([], {T: [] for T in temperatures}, []) for _ in clusterings]
    top1 = []
    for s in range(0, h.shape[0], chunk):
        hc = h[s:s + chunk].float()                                     # [n, D] fp32
        logits = hc @ W.t()                                             # [n, V] fp32
        top_ids = logits.topk(TOPK, dim=1).indices                      # [n, TOPK]
        top1.append(top_ids[:, 0])
        probs = {T: torch.softmax(logits / T, dim=1) for T in temperatures}
        for c, (ranks, tails, cands) in zip(clusterings, out):
            rank, order = _cluster_rank(hc, c)
            ranks.append(rank.gather(1, c.token_cluster[top_ids]))
            K = c.centroids.shape[0]
            cands.append(_at_probes(c.sizes[order].cumsum(1), probes, K, before=True))
            for T, p in probs.items():
                mass = torch.zeros(hc.shape[0], K).index_add_(1, c.token_cluster, p)  # [n, K]
                # tail[:, j] = mass of the clusters ranked j and worse; exactly 0 past the last.
                tail = mass.gather(1, order).flip(1).cumsum(1).flip(1)
                tails[T].append(_at_probes(tail, probes, K, before=False))
    return [PositionStats(probes, torch.cat(r), {T: torch.cat(v) for T, v in t.items()},
                          torch.cat(n), torch.cat(top1)) for r, t, n in out]


def _cluster_rank(h: torch.Tensor, c: HeadClusters) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank [n, K] of every cluster, order [n, K] of clusters best first) by h . centroid."""
    scores = h @ c.centroids.t()                                        # [n, K] fp32
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return rank, order


def _at_probes(table: torch.Tensor, probes: tuple[int, ...], K: int, before: bool) -> torch.Tensor:
    """Read a per-rank table at each probe count P: column P - 1 (before) or P (after, 0 past K)."""
    cols = []
    for P in probes:
        P = min(P, K)
        if before:
            cols.append(table[:, P - 1])
        else:
            cols.append(table[:, P] if P < K else torch.zeros_like(table[:, 0]))
    return torch.stack(cols, dim=1)


def summarize(stats: PositionStats, vocab_size: int, cluster_size: int,
              always_ids: torch.Tensor | None = None) -> list[dict]:
    """One row of metrics per probe count (means over positions; p99 of TV as a tail).  With
    always_ids [A] int64 the rows add the eos recall and top1_agreement_always (see above)."""
    rows = []
    r = stats.topk_rank
    is_eos = (torch.isin(stats.dense_top1, always_ids) if always_ids is not None
              else torch.zeros_like(stats.dense_top1, dtype=torch.bool))           # [N]
    for j, P in enumerate(stats.probes):
        hit = (r < P).float()                                           # [N, TOPK]
        row = {"probes": P, "positions": int(r.shape[0]),
               "vocab_fraction_nominal": P * cluster_size / vocab_size,
               "vocab_fraction": float(stats.candidates[:, j].float().mean()) / vocab_size,
               "top1_agreement": float(hit[:, 0].mean()),
               "top5_recall": float(hit[:, :5].mean()),
               "top10_recall": float(hit[:, :10].mean())}
        if always_ids is not None:
            with_always = hit[:, 0].bool() | is_eos        # the argmax is a candidate either way
            row["top1_agreement_always"] = float(with_always.float().mean())
            row["eos_positions"] = int(is_eos.sum())
            row["eos_top1_recall"] = (float(hit[is_eos, 0].mean()) if bool(is_eos.any())
                                      else float("nan"))
            row["eos_top1_recall_always"] = (float(with_always[is_eos].float().mean())
                                             if bool(is_eos.any()) else float("nan"))
        for T, tail in stats.tail_mass.items():
            tv = tail[:, j].clamp(min=0)
            row[f"tv_t{T:g}"] = float(tv.mean())
            row[f"tv_t{T:g}_p99"] = float(tv.quantile(0.99)) if tv.numel() else float("nan")
        rows.append(row)
    return rows


def probes_for_agreement(stats: PositionStats, target: float) -> int:
    """Smallest probe count whose top-1 agreement on these positions is >= target."""
    need = (stats.topk_rank[:, 0] + 1).sort().values                    # [N] probes each needs
    idx = max(0, min(need.numel() - 1, int(torch.tensor(target * need.numel()).ceil()) - 1))
    return int(need[idx])
