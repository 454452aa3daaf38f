"""Triton kernel of flashhead::rope_kv_write: rotary (+ q/k RMSNorm) and the KV-cache write.

One launch, grid (B, Hq + 2 * Hkv): program (b, h) takes head h of row b's fused qkv vector
(q heads, then k heads, then v heads), in two halves of Dh / 2 (the rotate_half pairs):
  q head: [RMSNorm] + rotary -> q_out[b, h, 0]
  k head: [RMSNorm] + rotary -> k_cache[b, h - Hq, fill - 1]
  v head: copy              -> v_cache[b, h - Hq - Hkv, fill - 1]
fill and starts are read on the device (no host sync: CUDA-graph safe while fill grows); a slot
outside [0, L) is not written.  fp32 math, one rounding at the store.
Bytes moved: 2 * B * (Hq + 2 * Hkv) * Dh * elt (qkv read, q_out and the cache slots written)
+ inv_freq and norm weights (L2-resident across programs).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from custom_ops.decode_attention_triton import _empty, _launch


@triton.jit
def _norm_rope(x1, x2, w_ptr, i, ok, cos, sin, eps, norm_offset, HAS_NORM: tl.constexpr,
               DH: tl.constexpr):
    """Halves x1, x2 [HALF] fp32 of one head -> the normed (if HAS_NORM), roped halves."""
    if HAS_NORM:
        inv_rms = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / DH + eps)
        w1 = tl.load(w_ptr + i, mask=ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + DH // 2 + i, mask=ok, other=0.0).to(tl.float32)
        x1 = x1 * inv_rms * (norm_offset + w1)
        x2 = x2 * inv_rms * (norm_offset + w2)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_kv_write_kernel(qkv_ptr, k_ptr, v_ptr, starts_ptr, fill_ptr, inv_freq_ptr, qn_ptr,
                          kn_ptr, q_out_ptr, attn_scaling, eps, norm_offset, L, HQ, HKV,
                          DH: tl.constexpr, HALF_PAD: tl.constexpr, HAS_QN: tl.constexpr,
                          HAS_KN: tl.constexpr):
    """qkv [B, (Hq + 2 * Hkv) * Dh]; k, v caches [B, Hkv, L, Dh]; starts [B] int64; fill [1]
    int64; inv_freq [Dh / 2] fp32; q_norm / k_norm [Dh] (any float) when HAS_*; q_out [B, Hq,
    1, Dh].  See the module docstring."""
    # Inductor passes Python floats to user kernels as fp64 scalars: keep the math fp32.
    attn_scaling = tl.cast(attn_scaling, tl.float32)
    eps = tl.cast(eps, tl.float32)
    norm_offset = tl.cast(norm_offset, tl.float32)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    slot = tl.load(fill_ptr) - 1
    i = tl.arange(0, HALF_PAD)
    ok = i < DH // 2
    # Per-lane copies of the scalars: the interpreter turns `block & scalar bool` into ints.
    slot_i = slot + tl.zeros((HALF_PAD,), tl.int64)
    in_cache = ok & (slot_i >= 0) & (slot_i < L)
    src = qkv_ptr + (b * (HQ + 2 * HKV) + h) * DH
    x1 = tl.load(src + i, mask=ok, other=0.0)
    x2 = tl.load(src + DH // 2 + i, mask=ok, other=0.0)
    if h < HQ + HKV:
        pos = (slot - tl.load(starts_ptr + b)).to(tl.float32)
        angle = pos * tl.load(inv_freq_ptr + i, mask=ok, other=0.0)        # [HALF] fp32
        cos = tl.cos(angle) * attn_scaling
        sin = tl.sin(angle) * attn_scaling
        if h < HQ:
            y1, y2 = _norm_rope(x1.to(tl.float32), x2.to(tl.float32), qn_ptr, i, ok, cos, sin,
                                eps, norm_offset, HAS_QN, DH)
            dst = q_out_ptr + (b * HQ + h) * DH
        else:
            y1, y2 = _norm_rope(x1.to(tl.float32), x2.to(tl.float32), kn_ptr, i, ok, cos, sin,
                                eps, norm_offset, HAS_KN, DH)
            dst = k_ptr + ((b * HKV + h - HQ) * L + slot) * DH
        store = in_cache | (ok & (h + tl.zeros((HALF_PAD,), tl.int32) < HQ))
        tl.store(dst + i, y1.to(dst.dtype.element_ty), mask=store)
        tl.store(dst + DH // 2 + i, y2.to(dst.dtype.element_ty), mask=store)
    else:
        dst = v_ptr + ((b * HKV + h - HQ - HKV) * L + slot) * DH
        tl.store(dst + i, x1, mask=in_cache)
        tl.store(dst + DH // 2 + i, x2, mask=in_cache)


def triton_rope_kv_write(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         starts: torch.Tensor, fill: torch.Tensor, inv_freq: torch.Tensor,
                         attn_scaling: float, num_q_heads: int,
                         q_norm: Optional[torch.Tensor] = None,
                         k_norm: Optional[torch.Tensor] = None, eps: float = 1e-6,
                         norm_offset: float = 0.0) -> torch.Tensor:
    """flashhead::rope_kv_write with one Triton launch (inputs checked by
    custom_ops.rope_cache.check_inputs).  Mutates the caches; returns q_out [B, Hq, 1, Dh]."""
    B, Hkv, L, Dh = k_cache.shape
    Hq = num_q_heads
    q_out = _empty((B, Hq, 1, Dh), qkv.dtype, qkv.device)               # [B, Hq, 1, Dh]
    if B == 0:
        return q_out
    # A missing norm weight is never read; inv_freq stands in (read-only, so no aliasing with
    # the written caches for Inductor).
    _launch(_rope_kv_write_kernel, (B, Hq + 2 * Hkv))(
        qkv, k_cache, v_cache, starts, fill.reshape(1), inv_freq,
        q_norm if q_norm is not None else inv_freq, k_norm if k_norm is not None else inv_freq,
        q_out, float(attn_scaling), float(eps), float(norm_offset), L, Hq, Hkv, DH=Dh,
        HALF_PAD=triton.next_power_of_2(max(Dh // 2, 1)), HAS_QN=q_norm is not None,
        HAS_KN=k_norm is not None, num_warps=1)
    return q_out
