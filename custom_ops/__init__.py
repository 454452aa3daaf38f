"""FlashHead operators: the stable, typed front.

Callers use these functions or `torch.ops.flashhead.topk`, never the kernels directly.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from custom_ops import flashhead as _flashhead  # registers torch.ops.flashhead.*
from custom_ops.flashhead import FlashHeadInputError, check_inputs
from custom_ops.reference import dense_reference, flashhead_reference

__all__ = ["FlashHeadTopK", "FlashHeadInputError", "flashhead_topk", "check_inputs",
           "dense_reference", "flashhead_reference"]


class FlashHeadTopK(NamedTuple):
    ids: torch.Tensor     # [B, k] int64 vocabulary ids, best first
    logits: torch.Tensor  # [B, k] fp32 exact logits of those ids


def flashhead_topk(h: torch.Tensor, centroids: torch.Tensor, weight: torch.Tensor,
                   offsets: torch.Tensor, token_ids: torch.Tensor, *, probes: int,
                   cluster_size: int, k: int = 1,
                   centroid_noise: Optional[torch.Tensor] = None) -> FlashHeadTopK:
    """Approximate LM head: the k best tokens among the `probes` best clusters, exactly scored.

    h [B, D] bf16/fp16/fp32; centroids [K, D]; weight [V, D] (rows reordered by cluster);
    offsets [K + 1] int64 (CSR: cluster c owns rows offsets[c]:offsets[c + 1]); token_ids [V]
    int64 (vocabulary id of each row); centroid_noise [B, K] or None (added to centroid scores:
    Gumbel noise gives stochastic probing).  All on one device, contiguous.

    Returns FlashHeadTopK(ids [B, k] int64, logits [B, k] fp32), best first, equal logits by
    smallest id.  With probes == K, ids[:, 0] is the dense head's argmax.
    Raises FlashHeadInputError on bad dtypes, devices, shapes, probes or k.
    """
    ids, logits = torch.ops.flashhead.topk(h, centroids, weight, offsets, token_ids, probes,
                                           cluster_size, k, centroid_noise)
    return FlashHeadTopK(ids, logits)
