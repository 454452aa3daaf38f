"""Rotary + q/k RMSNorm + KV-cache write of one new token: `torch.ops.flashhead.rope_kv_write`.

For every row b, with slot = fill - 1 and rotary position pos_b = fill - 1 - starts[b]:

    q, k, v = split(qkv[b])                                 Hq, Hkv, Hkv heads of Dh
    x = rmsnorm(x) * (norm_offset + w)      for q (q_norm) and k (k_norm), when given
    x = rotate_half rotary of x at pos_b    transformers' convention: pairs (d, d + Dh/2),
        x1' = x1 cos - x2 sin,  x2' = x2 cos + x1 sin,  angle = pos_b * inv_freq[d],
        cos and sin multiplied by attn_scaling
    k_cache[b, :, slot] = k;  v_cache[b, :, slot] = v;  returns q [B, Hq, 1, Dh]

fp32 math, one rounding to the cache dtype at the end.  transformers rounds to the model dtype
after the norm, and multiplies by cos / sin already rounded to the model dtype; so fp32 inputs
agree with transformers' functions to ~1e-6, bf16 ones within a rounding or two.
A fill of 0 or past L writes nothing (slot out of range) and still returns q_out.

Layout of this file: input checks, the torch.library registration (mutates the caches), whose
body runs the reference below on CPU and one Triton launch (custom_ops/rope_cache_triton.py) on
CUDA, then the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from custom_ops.decode_attention import AttentionInputError, check_ranges


def check_inputs(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 starts: torch.Tensor, fill: torch.Tensor, inv_freq: torch.Tensor,
                 num_q_heads: int, q_norm: Optional[torch.Tensor] = None,
                 k_norm: Optional[torch.Tensor] = None) -> None:
    """Raise AttentionInputError for anything the kernels cannot take.  Static checks only."""
    def fail(msg: str) -> None:
        raise AttentionInputError(msg)

    check_ranges(k_cache, v_cache, starts, fill)
    B, Hkv, _, Dh = k_cache.shape
    if Dh % 2:
        fail(f"rotary needs an even head size, got Dh={Dh}")
    if num_q_heads < 1 or num_q_heads % max(Hkv, 1):
        fail(f"num_q_heads must be a positive multiple of the cache's {Hkv} kv heads, got "
             f"{num_q_heads}")
    width = (num_q_heads + 2 * Hkv) * Dh
    if qkv.shape != (B, width):
        fail(f"qkv must be [B, (Hq + 2 * Hkv) * Dh] = [{B}, {width}] (q, k, v heads of the fused "
             f"projection), got {tuple(qkv.shape)}")
    if qkv.dtype != k_cache.dtype:
        fail(f"qkv must have the cache's dtype {k_cache.dtype}, got {qkv.dtype}")
    if inv_freq.shape != (Dh // 2,) or inv_freq.dtype != torch.float32:
        fail(f"inv_freq must be fp32 [Dh // 2] = [{Dh // 2}] (transformers' rotary inv_freq), "
             f"got {inv_freq.dtype} {tuple(inv_freq.shape)}")
    tensors = [qkv, inv_freq]
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w is not None:
            if w.shape != (Dh,) or not w.dtype.is_floating_point:
                fail(f"{name} must be a float [Dh] = [{Dh}] per-head RMSNorm weight, got "
                     f"{w.dtype} {tuple(w.shape)}")
            tensors.append(w)
    if any(t.device != k_cache.device for t in tensors):
        fail(f"qkv, inv_freq and the norm weights must be on the cache's device {k_cache.device}")
    if not all(t.is_contiguous() for t in tensors):
        fail("qkv, inv_freq and the norm weights must be contiguous; call .contiguous()")


@triton_op("flashhead::rope_kv_write", mutates_args=("k_cache", "v_cache"))
def rope_kv_write(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  starts: torch.Tensor, fill: torch.Tensor, inv_freq: torch.Tensor,
                  attn_scaling: float, num_q_heads: int, q_norm: Optional[torch.Tensor] = None,
                  k_norm: Optional[torch.Tensor] = None, eps: float = 1e-6,
                  norm_offset: float = 0.0) -> torch.Tensor:
    """Writes roped k and raw v into slot fill - 1 of the caches; returns q_out [B, Hq, 1, Dh].

    See custom_ops.rope_kv_write (the front).  CPU: the reference.  CUDA: one Triton launch.
    """
    check_inputs(qkv, k_cache, v_cache, starts, fill, inv_freq, num_q_heads, q_norm, k_norm)
    if qkv.device.type != "cuda":
        return rope_kv_write_reference(qkv, k_cache, v_cache, starts, fill, inv_freq,
                                       attn_scaling, num_q_heads, q_norm, k_norm, eps,
                                       norm_offset)
    from custom_ops.rope_cache_triton import triton_rope_kv_write

    return triton_rope_kv_write(qkv, k_cache, v_cache, starts, fill, inv_freq, attn_scaling,
                                num_q_heads, q_norm, k_norm, eps, norm_offset)


def rope_reference(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor,
                   attn_scaling: float, norm: Optional[torch.Tensor], eps: float,
                   norm_offset: float) -> torch.Tensor:
    """x [B, H, Dh] (any float) -> fp32 [B, H, Dh]: optional RMSNorm, then rotate_half rotary
    at positions pos [B] int64."""
    x = x.float()
    if norm is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (norm_offset + norm.float())
    angle = pos.float()[:, None] * inv_freq[None, :]                     # [B, Dh / 2] fp32
    cos = (angle.cos() * attn_scaling)[:, None, :]                        # [B, 1, Dh / 2]
    sin = (angle.sin() * attn_scaling)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_kv_write_reference(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            starts: torch.Tensor, fill: torch.Tensor, inv_freq: torch.Tensor,
                            attn_scaling: float, num_q_heads: int,
                            q_norm: Optional[torch.Tensor] = None,
                            k_norm: Optional[torch.Tensor] = None, eps: float = 1e-6,
                            norm_offset: float = 0.0) -> torch.Tensor:
    """The oracle and CPU kernel (see the module docstring).  Mutates k_cache and v_cache at
    slot fill - 1 (nothing when that slot is outside [0, L)); returns q_out [B, Hq, 1, Dh]."""
    B, Hkv, L, Dh = k_cache.shape
    Hq = num_q_heads
    heads = qkv.view(B, Hq + 2 * Hkv, Dh)
    slot = fill.reshape(1) - 1                                          # [1] int64
    pos = fill.reshape(()) - 1 - starts                                 # [B] int64
    q = rope_reference(heads[:, :Hq], pos, inv_freq, attn_scaling, q_norm, eps, norm_offset)
    k = rope_reference(heads[:, Hq:Hq + Hkv], pos, inv_freq, attn_scaling, k_norm, eps,
                       norm_offset)
    v = heads[:, Hq + Hkv:]
    # Out-of-range slot: write back what is there (no host sync to find out beforehand).
    ok = (slot >= 0) & (slot < L)                                       # [1] bool
    at = slot.clamp(0, max(L - 1, 0))
    for cache, new in ((k_cache, k), (v_cache, v)):
        new = new.to(cache.dtype)[:, :, None, :]                        # [B, Hkv, 1, Dh]
        cache.index_copy_(2, at, torch.where(ok, new, cache.index_select(2, at)))
    return q.to(qkv.dtype)[:, :, None, :]
