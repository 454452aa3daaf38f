"""Pure-PyTorch FlashHead: the oracle every kernel is tested against, and the CPU kernel.

Dimensions: B rows of the batch, D hidden size, V vocabulary, K clusters, C cluster size
(largest cluster), P probed clusters, A always-scored tokens, k returned candidates.
"""

from __future__ import annotations

from typing import Optional

import torch

# Rows of h scored per chunk, so the [b, P, C, D] gather stays under ~256 MiB of fp32.
_GATHER_BUDGET = 1 << 26


def select_clusters(h: torch.Tensor, centroids: torch.Tensor, probes: int,
                    centroid_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Top-`probes` clusters per row by h . centroid (+ noise): [B, P] int64, best first."""
    scores = h.float() @ centroids.float().t()                          # [B, K] fp32
    if centroid_noise is not None:
        scores = scores + centroid_noise.float()
    return scores.topk(probes, dim=1).indices


def candidate_rows(sel: torch.Tensor, offsets: torch.Tensor,
                   cluster_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reordered-row index of every candidate slot and whether the slot is real.

    sel: [B, P] cluster ids -> rows [B, P * C] int64 (0 where padding), valid [B, P * C] bool
    """
    start = offsets[sel]                                                # [B, P]
    length = offsets[sel + 1] - start
    slot = torch.arange(cluster_size, device=sel.device)
    valid = slot < length.unsqueeze(-1)                                 # [B, P, C]
    rows = torch.where(valid, start.unsqueeze(-1) + slot, 0)
    return rows.flatten(1), valid.flatten(1)


def topk_by_logit_then_id(logits: torch.Tensor, ids: torch.Tensor,
                          k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (ids, logits) per row; equal logits are ordered by smallest id (like argmax)."""
    by_id = torch.sort(ids, dim=1, stable=True)
    by_logit = torch.sort(torch.gather(logits, 1, by_id.indices), dim=1, descending=True,
                          stable=True)
    order = torch.gather(by_id.indices, 1, by_logit.indices[:, :k])
    return torch.gather(ids, 1, order), by_logit.values[:, :k]


def always_rows_of(always_ids: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Rows of the reordered weight that hold the vocabulary ids `always_ids` [A] int64 ->
    [A] int64, through the inverse of the permutation token_ids [V] (O(V) work: callers that
    score the same ids at every step compute this once, as FlashHeadLMHead does)."""
    inverse = torch.empty_like(token_ids)                              # [V] vocab id -> row
    inverse[token_ids] = torch.arange(token_ids.shape[0], device=token_ids.device)
    return inverse[always_ids]


def always_candidates(always_rows: torch.Tensor) -> torch.Tensor:
    """[A] bool: the first occurrence of each row (an id listed twice is scored once)."""
    same = always_rows.unsqueeze(0) == always_rows.unsqueeze(1)        # [A, A]
    return ~torch.tril(same, diagonal=-1).any(dim=1)


def flashhead_reference(h: torch.Tensor, centroids: torch.Tensor, weight: torch.Tensor,
                        offsets: torch.Tensor, token_ids: torch.Tensor, probes: int,
                        cluster_size: int, k: int,
                        centroid_noise: Optional[torch.Tensor] = None,
                        always_ids: Optional[torch.Tensor] = None,
                        always_rows: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashHead in plain PyTorch, fp32 arithmetic.

    h [B, D]; centroids [K, D]; weight [V, D] reordered; offsets [K + 1] int64;
    token_ids [V] int64; centroid_noise [B, K] or None (added to the centroid scores, for
    stochastic probing); always_ids [A] int64 vocabulary ids scored at every step whatever the
    probes, or None; always_rows [A] int64 their rows in `weight` (token_ids[always_rows] ==
    always_ids), or None to look them up here.  Returns ids [B, k] int64 (vocabulary ids) and
    logits [B, k] fp32, best first; equal logits come smallest vocabulary id first, so with
    probes == K the first id is exactly torch.argmax of the dense fp32 logits.

    Candidates: the rows of the `probes` best clusters UNION the always rows, each row once (an
    always row inside a probed cluster, or listed twice, turns its other slots into padding).
    Padding slots (short clusters, those duplicates) score -inf with id token_ids[0] and are
    never returned while k <= probes * (smallest cluster size).
    """
    sel = select_clusters(h, centroids, probes, centroid_noise)        # [B, P]
    rows, valid = candidate_rows(sel, offsets, cluster_size)           # [B, P * C]
    if always_ids is not None and always_ids.numel() > 0:
        if always_rows is None:
            always_rows = always_rows_of(always_ids, token_ids)
        valid = valid & ~torch.isin(rows, always_rows)                  # scored below instead
        B, A = h.shape[0], always_rows.shape[0]
        rows = torch.cat([rows, always_rows.expand(B, A)], dim=1)       # [B, P * C + A]
        valid = torch.cat([valid, always_candidates(always_rows).expand(B, A)], dim=1)
    rows = torch.where(valid, rows, 0)
    hf = h.float()
    chunk = max(1, _GATHER_BUDGET // max(1, rows.shape[1] * h.shape[1]))
    logits = torch.cat([
        torch.einsum("bnd,bd->bn", weight[rows[i:i + chunk]].float(), hf[i:i + chunk])
        for i in range(0, h.shape[0], chunk)]) if h.shape[0] > 0 else rows.float()
    logits = logits.masked_fill(~valid, float("-inf"))
    return topk_by_logit_then_id(logits, token_ids[rows], k)


def dense_reference(h: torch.Tensor, weight: torch.Tensor, k: int,
                    token_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense head in fp32: the top-k (ids, logits) over the whole vocabulary.

    weight is in vocabulary order, or reordered with `token_ids` giving each row's vocab id.
    """
    logits = h.float() @ weight.float().t()                            # [B, V] fp32
    ids = torch.arange(weight.shape[0], device=h.device) if token_ids is None else token_ids
    return topk_by_logit_then_id(logits, ids.expand_as(logits), k)
