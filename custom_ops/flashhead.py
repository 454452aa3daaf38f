"""The FlashHead op: `torch.ops.flashhead.topk`.

Layout of this file: input checks, the torch.library registration (a `triton_op`, so Inductor
sees the Triton kernels), whose body runs the CPU kernel (the PyTorch reference) on CPU and the
Triton kernels (custom_ops/flashhead_triton.py) on CUDA.  Output shapes depend only on input
shapes and the integer arguments, so the op traces with fake tensors, exports, and is CUDA-graph
safe (no host sync, no .item()).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from custom_ops.reference import flashhead_reference

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class FlashHeadInputError(ValueError):
    """Bad input to the FlashHead op; the message says what to change."""


def check_inputs(h: torch.Tensor, centroids: torch.Tensor, weight: torch.Tensor,
                 offsets: torch.Tensor, token_ids: torch.Tensor, probes: int, cluster_size: int,
                 k: int, centroid_noise: Optional[torch.Tensor] = None) -> None:
    """Raise FlashHeadInputError for anything the kernels cannot take.  Static checks only."""
    def fail(msg: str) -> None:
        raise FlashHeadInputError(msg)

    if h.dim() != 2:
        fail(f"h must be [B, D], got shape {tuple(h.shape)}; flatten leading dims first")
    if weight.dim() != 2 or centroids.dim() != 2:
        fail(f"weight [V, D] and centroids [K, D] must be 2-D, got {tuple(weight.shape)} and "
             f"{tuple(centroids.shape)}")
    B, D = h.shape
    V, K = weight.shape[0], centroids.shape[0]
    if h.dtype not in FLOAT_DTYPES:
        fail(f"h must be bf16, fp16 or fp32, got {h.dtype}")
    if weight.dtype not in FLOAT_DTYPES or centroids.dtype != weight.dtype:
        fail(f"weight and centroids must share one of bf16/fp16/fp32, got {weight.dtype} and "
             f"{centroids.dtype}; use FlashHeadAssets.to(dtype=...)")
    if weight.shape[1] != D or centroids.shape[1] != D:
        fail(f"hidden size mismatch: h has D={D}, weight {tuple(weight.shape)}, centroids "
             f"{tuple(centroids.shape)}: these assets were built for another model")
    if offsets.shape != (K + 1,) or offsets.dtype != torch.int64:
        fail(f"offsets must be int64 [K + 1] = [{K + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
    if token_ids.shape != (V,) or token_ids.dtype != torch.int64:
        fail(f"token_ids must be int64 [V] = [{V}], got {token_ids.dtype} {tuple(token_ids.shape)}")
    devices = {t.device for t in (h, centroids, weight, offsets, token_ids)}
    if centroid_noise is not None:
        devices.add(centroid_noise.device)
        if centroid_noise.shape != (B, K):
            fail(f"centroid_noise must be [B, K] = [{B}, {K}], got {tuple(centroid_noise.shape)}")
    if len(devices) != 1:
        fail(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}; move the "
             f"assets with FlashHeadAssets.to(device)")
    if not 1 <= probes <= K:
        fail(f"probes must be in [1, K={K}], got {probes}")
    if cluster_size < 1:
        fail(f"cluster_size must be >= 1, got {cluster_size}")
    if not 1 <= k <= probes * cluster_size:
        fail(f"k must be in [1, probes * cluster_size = {probes * cluster_size}], got {k}; "
             f"raise probes or lower k")
    for name, t in (("h", h), ("centroids", centroids), ("weight", weight), ("offsets", offsets),
                    ("token_ids", token_ids)):
        if not t.is_contiguous():
            fail(f"{name} must be contiguous; call .contiguous() on it")


@triton_op("flashhead::topk", mutates_args=())
def topk(h: torch.Tensor, centroids: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
         token_ids: torch.Tensor, probes: int, cluster_size: int, k: int,
         centroid_noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashHead top-k: ids [B, k] int64 (vocabulary ids) and exact logits [B, k] fp32.

    See custom_ops.flashhead_topk for the documented front.  CPU: the PyTorch reference.  CUDA:
    the fused Triton kernels.
    """
    check_inputs(h, centroids, weight, offsets, token_ids, probes, cluster_size, k, centroid_noise)
    if h.device.type != "cuda":
        return flashhead_reference(h, centroids, weight, offsets, token_ids, probes, cluster_size,
                                   k, centroid_noise)
    from custom_ops.flashhead_triton import triton_topk

    return triton_topk(h, centroids, weight, offsets, token_ids, probes, cluster_size, k,
                       centroid_noise)
