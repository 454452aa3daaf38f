"""The decode-attention op: `torch.ops.flashhead.decode_attention`.

One new token per row attends to the valid slots of a static KV cache, read in place:

    row b attends to slots j with  lo_b <= j < fill,  lo_b = max(starts[b], fill - window
    if window > 0 else 0);  empty range -> that row's output is exactly 0.

Layout of this file: input checks, the torch.library registration (a `triton_op`, so Inductor
sees the Triton kernel), whose body runs the CPU kernel (the PyTorch reference below) on CPU and
the Triton kernel (custom_ops/decode_attention_triton.py) on CUDA, then the reference.  The
output shape depends only on input shapes; the valid ranges live in device tensors, so the op
traces with fake tensors, exports as one node, and is CUDA-graph safe (no host sync, no .item()).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from custom_ops.counters import is_traced

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 256


class AttentionInputError(ValueError):
    """Bad input to a decode-attention op; the message says what to change."""


def check_ranges(k_cache: torch.Tensor, v_cache: torch.Tensor, starts: torch.Tensor,
                 fill: torch.Tensor) -> None:
    """Checks shared with rope_kv_write: caches [B, Hkv, L, Dh] alike and contiguous, starts
    [B] int64, fill one int64, all on the caches' device."""
    def fail(msg: str) -> None:
        raise AttentionInputError(msg)

    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        fail(f"k_cache and v_cache must both be [B, Hkv, L, Dh], got {tuple(k_cache.shape)} and "
             f"{tuple(v_cache.shape)}")
    if k_cache.dtype not in FLOAT_DTYPES or v_cache.dtype != k_cache.dtype:
        fail(f"k_cache and v_cache must share one of bf16/fp16/fp32, got {k_cache.dtype} and "
             f"{v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        fail("k_cache and v_cache must be contiguous (they are read and written in place, never "
             "copied); allocate the static cache as a contiguous [B, Hkv, L, Dh] tensor")
    B = k_cache.shape[0]
    if starts.shape != (B,) or starts.dtype != torch.int64:
        fail(f"starts must be int64 [B] = [{B}] (first valid slot of each row), got "
             f"{starts.dtype} {tuple(starts.shape)}")
    if fill.numel() != 1 or fill.dim() > 1 or fill.dtype != torch.int64:
        fail(f"fill must be one int64 element (0-dim or [1]: slots filled so far), got "
             f"{fill.dtype} {tuple(fill.shape)}")
    devices = {t.device for t in (k_cache, v_cache, starts, fill)}
    if len(devices) != 1:
        fail(f"caches, starts and fill must be on one device, got "
             f"{sorted(str(d) for d in devices)}")


def check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 starts: torch.Tensor, fill: torch.Tensor, scale: float, window: int = 0,
                 softcap: float = 0.0) -> None:
    """Raise AttentionInputError for anything the kernels cannot take.  Static checks only
    (fill and starts are not read: a fill past L reads as L, starts < 0 as 0)."""
    def fail(msg: str) -> None:
        raise AttentionInputError(msg)

    check_ranges(k_cache, v_cache, starts, fill)
    B, Hkv, _, Dh = k_cache.shape
    if q.dim() != 4 or q.shape[2] != 1:
        fail(f"q must be [B, Hq, 1, Dh] (one new token per row), got {tuple(q.shape)}; run "
             f"prefill (several tokens) through SDPA instead")
    if q.shape[0] != B or q.shape[3] != Dh:
        fail(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}: need the same "
             f"B and Dh")
    if q.dtype != k_cache.dtype:
        fail(f"q must have the cache's dtype {k_cache.dtype}, got {q.dtype}")
    if Hkv == 0 or q.shape[1] % Hkv != 0:
        fail(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({Hkv}) (GQA: query "
             f"head h reads kv head h // (Hq // Hkv))")
    if not 1 <= Dh <= MAX_HEAD_DIM:
        fail(f"head size must be in [1, {MAX_HEAD_DIM}], got {Dh}")
    if q.device != k_cache.device:
        fail(f"q is on {q.device} but the cache on {k_cache.device}")
    if not isinstance(window, int) or window < 0:
        fail(f"window must be an int >= 0 (0: no sliding window), got {window!r}")
    if not softcap >= 0.0:
        fail(f"softcap must be >= 0 (0: no soft-capping), got {softcap!r}")
    if not scale > 0.0:
        fail(f"scale must be > 0 (usually Dh ** -0.5), got {scale!r}")


@triton_op("flashhead::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     starts: torch.Tensor, fill: torch.Tensor, scale: float, window: int = 0,
                     softcap: float = 0.0) -> torch.Tensor:
    """Attention of one new token per row over a static KV cache: out [B, Hq, 1, Dh], q.dtype.

    See custom_ops.decode_attention (the front) for the contract.  CPU: the PyTorch reference.
    CUDA: the split-K Triton kernel.
    """
    return _decode_attention(q, k_cache, v_cache, starts, fill, scale, window, softcap, None)


@triton_op("flashhead::decode_attention_ws", mutates_args=("counters",))
def decode_attention_ws(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        starts: torch.Tensor, fill: torch.Tensor, scale: float, window: int,
                        softcap: float, counters: torch.Tensor) -> torch.Tensor:
    """decode_attention with the caller's counters (custom_ops.counters.workspace): the kernel
    counts in them and leaves them zeroed.  Declared mutated, so a compiled graph keeps them as
    the caller's state and runs no fill kernel for them (a separate op: see
    custom_ops.fused_linear.rms_norm_linear_ws_op)."""
    return _decode_attention(q, k_cache, v_cache, starts, fill, scale, window, softcap, counters)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      starts: torch.Tensor, fill: torch.Tensor, scale: float, window: int,
                      softcap: float, counters: Optional[torch.Tensor]) -> torch.Tensor:
    check_inputs(q, k_cache, v_cache, starts, fill, scale, window, softcap)
    if q.device.type != "cuda":
        if not is_traced(fill):   # eager on CPU: read only the slots up to the fill
            hi = max(1, min(int(fill.reshape(-1)[0]), k_cache.shape[2]))
            k_cache, v_cache = k_cache[:, :, :hi], v_cache[:, :, :hi]
        return decode_attention_reference(q, k_cache, v_cache, starts, fill, scale, window,
                                          softcap)
    from custom_ops.decode_attention_triton import triton_decode_attention

    return triton_decode_attention(q, k_cache, v_cache, starts, fill, scale, window, softcap,
                                   counters=counters)


def valid_slots(starts: torch.Tensor, fill: torch.Tensor, L: int, window: int = 0
                ) -> torch.Tensor:
    """[B, L] bool: slot j of row b is attended (lo_b <= j < fill, see the module docstring)."""
    fill = fill.reshape(())
    lo = starts.clamp(min=0)                                            # [B]
    if window > 0:
        lo = torch.maximum(lo, fill - window)
    j = torch.arange(L, device=starts.device)                           # [L]
    return (j[None, :] >= lo[:, None]) & (j[None, :] < fill)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               starts: torch.Tensor, fill: torch.Tensor, scale: float,
                               window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """The oracle and CPU kernel: fp32 `scaled_dot_product_attention` over the whole cache with
    an explicit boolean mask [B, 1, 1, L] (kv heads repeated for GQA, transformers' repeat_kv
    order); with softcap > 0 a manual softmax of softcap * tanh(scores / softcap).
    Returns [B, Hq, 1, Dh] in q.dtype; rows with no valid slot are exactly 0.
    Cost: reads and upcasts the whole cache (every L slot), unlike the Triton kernel."""
    B, Hq, _, Dh = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    valid = valid_slots(starts, fill, L, window)                        # [B, L]
    k = k_cache.float().repeat_interleave(Hq // Hkv, dim=1)             # [B, Hq, L, Dh]
    v = v_cache.float().repeat_interleave(Hq // Hkv, dim=1)
    qf = q.float()
    mask = valid[:, None, None, :]                                      # [B, 1, 1, L]
    if softcap > 0:
        scores = (qf @ k.transpose(-1, -2)) * scale                     # [B, Hq, 1, L]
        scores = softcap * torch.tanh(scores / softcap)
        p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = p.nan_to_num(0.0) @ v
    else:
        out = torch.nn.functional.scaled_dot_product_attention(qf, k, v, attn_mask=mask,
                                                               scale=scale)
    out = torch.where(valid.any(-1)[:, None, None, None], out, 0.0)   # empty rows: 0, not NaN
    return out.to(q.dtype)
