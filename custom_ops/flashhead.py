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
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.weak import WeakIdKeyDictionary

from custom_ops.reference import always_rows_of, flashhead_reference

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Most always-scored tokens per call: each union program of the Triton kernel compares its rows
# with all of them (end-of-turn/eos lists hold 1-10 ids).  Up to 64 the sm_90 builds of the
# union kernel spill at most 16 bytes (32-row tiles); at 256, 0.3-0.5 KB.
MAX_ALWAYS = 64


class FlashHeadInputError(ValueError):
    """Bad input to the FlashHead op; the message says what to change."""


def check_inputs(h: torch.Tensor, centroids: torch.Tensor, weight: torch.Tensor,
                 offsets: torch.Tensor, token_ids: torch.Tensor, probes: int, cluster_size: int,
                 k: int, centroid_noise: Optional[torch.Tensor] = None,
                 always_ids: Optional[torch.Tensor] = None,
                 always_rows: Optional[torch.Tensor] = None) -> None:
    """Raise FlashHeadInputError for anything the kernels cannot take.  Static checks only
    (shapes, dtypes, devices); `check_always_values` reads the always ids' values."""
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
    if always_rows is not None and always_ids is None:
        fail("always_rows needs always_ids (the vocabulary ids they hold); pass both, or "
             "always_ids alone")
    for name, t in (("always_ids", always_ids), ("always_rows", always_rows)):
        if t is None:
            continue
        devices.add(t.device)
        if t.dim() != 1 or t.dtype != torch.int64:
            fail(f"{name} must be a 1-D int64 tensor [A], got {t.dtype} {tuple(t.shape)}; e.g. "
                 f"torch.tensor(fh_compile.always_scored_ids(model, tokenizer))")
        if t.shape[0] > MAX_ALWAYS:
            fail(f"{name} holds {t.shape[0]} ids, at most {MAX_ALWAYS} are supported (each is "
                 f"scored at every step); keep the end-of-turn / eos tokens only")
        if not t.is_contiguous():
            fail(f"{name} must be contiguous; call .contiguous() on it")
    if always_rows is not None and always_rows.shape != always_ids.shape:
        fail(f"always_rows must match always_ids (one row per id), got {tuple(always_rows.shape)} "
             f"and {tuple(always_ids.shape)}")
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


# Always-id tensors whose values were checked, with the (storage, version) of the tensors then
# seen: those passed at every step (FlashHeadLMHead's buffers) are read back once, not per call.
_ALWAYS_CHECKED = WeakIdKeyDictionary()


def _values_readable(t: torch.Tensor) -> bool:
    """Whether t's values can be read now: a real tensor with data (not traced by
    torch.compile / torch.export / make_fx, not on the meta device), not inside CUDA-graph
    capture."""
    if (type(t) is not torch.Tensor or t.device.type == "meta" or torch.compiler.is_compiling()
            or _get_current_dispatch_mode_stack()):
        return False
    if t.is_cuda:
        return not torch.cuda.is_current_stream_capturing()
    return True


def check_always_values(always_ids: torch.Tensor, always_rows: Optional[torch.Tensor],
                        token_ids: torch.Tensor) -> None:
    """Raise FlashHeadInputError unless every always id is a vocabulary id in [0, V) and
    always_rows (when given) are their rows: token_ids[always_rows] == always_ids.

    Data-dependent, so it runs only where the values can be read: eagerly, once per set of
    tensors and versions (on CUDA one host sync), never while tracing or capturing a CUDA graph
    (compiled and exported programs rely on the eager or construction-time check).
    """
    tensors = [t for t in (always_ids, always_rows, token_ids) if t is not None]
    if not all(_values_readable(t) for t in tensors):
        return
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    if _ALWAYS_CHECKED.get(always_ids) == key:
        return
    V = token_ids.shape[0]
    if always_ids.unique().numel() != always_ids.numel():
        raise FlashHeadInputError(f"always_ids must be distinct, got {always_ids.tolist()}; pass "
                                  f"sorted(set(ids)) (fh_compile.always_scored_ids does)")
    bad = always_ids[(always_ids < 0) | (always_ids >= V)]
    if bad.numel():
        raise FlashHeadInputError(f"always_ids must be vocabulary ids in [0, V={V}), got "
                                  f"{bad.tolist()[:8]}; build the list with "
                                  f"fh_compile.always_scored_ids(model, tokenizer)")
    if always_rows is not None:
        in_range = (always_rows >= 0) & (always_rows < V)
        ok = in_range & (token_ids[always_rows.clamp(0, V - 1)] == always_ids)
        if not bool(ok.all()):
            raise FlashHeadInputError(
                "always_rows must be the rows of always_ids in the reordered weight "
                "(token_ids[always_rows] == always_ids); pass always_rows=None to have them "
                "looked up")
    _ALWAYS_CHECKED[always_ids] = key


@triton_op("flashhead::topk", mutates_args=())
def topk(h: torch.Tensor, centroids: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
         token_ids: torch.Tensor, probes: int, cluster_size: int, k: int,
         centroid_noise: Optional[torch.Tensor] = None, always_ids: Optional[torch.Tensor] = None,
         always_rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashHead top-k: ids [B, k] int64 (vocabulary ids) and exact logits [B, k] fp32.

    See custom_ops.flashhead_topk for the documented front.  CPU: the PyTorch reference.  CUDA:
    the fused Triton kernels.  always_ids without always_rows: the rows are looked up here, an
    O(V) scatter per call; pass both to keep the extra cost at O(A * D).
    """
    check_inputs(h, centroids, weight, offsets, token_ids, probes, cluster_size, k,
                 centroid_noise, always_ids, always_rows)
    if always_ids is not None and always_ids.shape[0] == 0:
        always_ids = always_rows = None                     # empty list: today's op
    if always_ids is not None:
        check_always_values(always_ids, always_rows, token_ids)
        if always_rows is None:
            always_rows = always_rows_of(always_ids, token_ids)
    if h.device.type != "cuda":
        return flashhead_reference(h, centroids, weight, offsets, token_ids, probes, cluster_size,
                                   k, centroid_noise, always_ids, always_rows)
    from custom_ops.flashhead_triton import triton_topk

    return triton_topk(h, centroids, weight, offsets, token_ids, probes, cluster_size, k,
                       centroid_noise, always_rows)
