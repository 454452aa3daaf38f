"""Triton kernel of flashhead::rope_decode_attention: q/k RMSNorm + rotary, the KV-cache write of
the new token and split-K decode attention, in ONE launch (the work of rope_kv_write followed by
decode_attention, custom_ops/rope_cache_triton.py and custom_ops/decode_attention_triton.py).

Grid (B * Hkv * NG, S) as in `_decode_attention_kernel`, with its valid range, chunks, splits and
last-program merge (`decode_blocks`, `_finish`).  Program (b, kv head, head tile, split s):
  1. loads its tile of 16 query heads from qkv [B, (Hq + 2 * Hkv) * Dh] twice: at lane d and at
     its rotate_half partner (d + Dh / 2) % Dh (so no in-register shuffle), applies the q RMSNorm
     (optional) and rotary in fp32, rounds to qkv's dtype: the q that rope_kv_write returns;
  2. the split whose chunk holds slot fill - 1 (the new token) computes the new k of its kv head
     (norm + rotary, rounded to the cache dtype) and loads the new v, and starts its online
     softmax with that slot (m = its score, l = 1, acc = v_new): k_new / v_new are dead before
     the loop (substituting them inside the loop with tl.where spilled at the triton 3.6 sm_90
     build; adding the slot after the loop cost ~75 registers at triton 3.9);
  3. streams the rest of its chunk of the valid range [lo, min(fill, L)) from the cache as the
     unfused kernel does; slot fill - 1 is never loaded;
  4. exactly one program per (b, kv head) stores k_new / v_new into slot fill - 1: that split
     (split 0 if the row's range is empty), head tile 0; nothing if the slot is outside [0, L).
     No other program reads the slot, so none reads what another one writes.
Rotary position of row b: fill - 1 - starts[b].  fill and starts are read on the device (no host
sync; the grid depends on shapes only: CUDA-graph safe while the fill grows).
Bytes moved: decode_attention's (K and V of the valid slots once, q and out, L2-resident
partials) + the q heads of qkv, read twice per split (lane and partner; L2-resident), the new k
and v read and written by one split; the rope op's q_out round trip (B * Hq * Dh elements
written and read) and its launch are gone.
Offline sm_90 builds at 4 warps, triton 3.6 (the GPU's): 233-255 registers at Dh 128 / 256
bf16, no spills.  Timed in the compiled R1-1.5B step on an H200 (fill ~150, B = 1): 7.0 us a
layer (custom_ops/decode_attention_config.py has the launch settings' measurements).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from custom_ops.counters import is_traced
from custom_ops.pdl import launch_options as pdl_launch_options
from custom_ops.pdl import pdl_entry
from custom_ops.decode_attention_triton import (DecodeBlocks, _attend_block, _empty, _finish,
                                                _launch, _scaled_scores, _split_range,
                                                split_buffers)


@triton.jit
def _cos_sin(inv_freq_ptr, pos, d, d_ok, attn_scaling, DH: tl.constexpr):
    """cos, sin [BLOCK_D] fp32 of lane d at rotary position pos (lanes d and d + Dh / 2 share
    inv_freq[d % (Dh / 2)]), times attn_scaling."""
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + d % (DH // 2), mask=d_ok, other=0.0)
    return tl.cos(angle) * attn_scaling, tl.sin(angle) * attn_scaling


@triton.jit
def _rope_heads(src, heads, mask, w_ptr, d, d_ok, cos, sin, eps, norm_offset,
                HAS_NORM: tl.constexpr, DH: tl.constexpr):
    """Heads at src + heads ([R, 1] or one element offset), lanes d [BLOCK_D] -> [RMSNorm] +
    rotate_half rotary, fp32 [R, BLOCK_D].  Each lane's partner (d + Dh / 2) % Dh is loaded
    too (no in-register shuffle); cos, sin [BLOCK_D] fp32 per lane."""
    dp = (d + DH // 2) % DH
    x = tl.load(src + heads + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(src + heads + dp[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / DH + eps)        # [R]
        w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + dp, mask=d_ok, other=0.0).to(tl.float32)
        x = x * inv_rms[:, None] * (norm_offset + w)[None, :]
        xp = xp * inv_rms[:, None] * (norm_offset + wp)[None, :]
    # First half: x1 cos - x2 sin; second half: x2 cos + x1 sin (transformers' rotate_half).
    xc = x * cos[None, :]
    xs = xp * sin[None, :]
    return tl.where((d < DH // 2)[None, :], xc - xs, xc + xs)


@triton.jit
def _rope_attention_kernel(qkv_ptr, k_ptr, v_ptr, starts_ptr, fill_ptr, inv_freq_ptr, qn_ptr,
                           kn_ptr, out_ptr, pm_ptr, pl_ptr, pacc_ptr, count_ptr, attn_scaling,
                           eps, norm_offset, scale, softcap, window, min_chunk, L, HKV, GROUP, NG,
                           DH: tl.constexpr, S: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_N: tl.constexpr, HAS_QN: tl.constexpr, HAS_KN: tl.constexpr,
                           SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
                           COMBINE_UPTO: tl.constexpr, TREE_G: tl.constexpr,
                           CSTRIDE: tl.constexpr, PDL: tl.constexpr):
    """See the module docstring.  qkv [B, (Hq + 2 * Hkv) * Dh]; k, v caches [B, Hkv, L, Dh]
    (contiguous; slot fill - 1 written); starts [B] int64; fill [1] int64; inv_freq [Dh / 2]
    fp32; q / k norm weights [Dh] when HAS_*; out [B, Hq, 1, Dh]; partials pm, pl [NP, 16, S]
    and pacc [NP, 16, S, Dh] fp32; count [>= NP * CSTRIDE] int32, zero on entry and on exit.
    PDL: programmatic dependent launch (custom_ops/pdl.py)."""
    pdl_entry(PDL, PDL)
    # Inductor passes Python floats to user kernels as fp64 scalars: keep the math fp32.
    attn_scaling = tl.cast(attn_scaling, tl.float32)
    eps = tl.cast(eps, tl.float32)
    norm_offset = tl.cast(norm_offset, tl.float32)
    scale = tl.cast(scale, tl.float32)
    pid = tl.program_id(0)                         # (b, kv head, head tile)
    s = tl.program_id(1)
    tile = pid % NG
    b = (pid // NG) // HKV
    kvh = (pid // NG) % HKV
    slot = tl.load(fill_ptr) - 1                   # the new token's slot (may lie outside [0, L))
    start = tl.load(starts_ptr + b)
    fill = tl.minimum(slot + 1, L)
    lo, n, chunk, active = _split_range(start, fill, window, min_chunk, S, BLOCK_N)
    if s < tl.maximum(active, 1):
        d = tl.arange(0, BLOCK_D)
        d_ok = d < DH
        cos, sin = _cos_sin(inv_freq_ptr, slot - start, d, d_ok, attn_scaling, DH)
        src = qkv_ptr + b.to(tl.int64) * (HKV * (GROUP + 2)) * DH  # row b: Hq + 2 * Hkv heads
        # 1. q of the tile's heads [16, BLOCK_D], rounded as rope_kv_write's q_out.
        g = tile * 16 + tl.arange(0, 16)           # query heads of the group, padded to 16
        g_ok = g < GROUP
        q = _rope_heads(src, (kvh * GROUP + g).to(tl.int64)[:, None] * DH,
                        g_ok[:, None] & d_ok[None, :], qn_ptr, d, d_ok, cos, sin, eps,
                        norm_offset, HAS_QN, DH).to(qkv_ptr.dtype.element_ty)
        # 2. the new token, from registers: its k (roped, rounded to the cache dtype) and v
        # [1, BLOCK_D].  The split whose chunk holds its slot starts its online softmax with it
        # (score s1: m = s1, l = 1, acc = v_new), so k_new / v_new are dead before the loop; one
        # program per (b, kv head) writes them into the cache (see the module docstring).
        kv_base = (b * HKV + kvh).to(tl.int64) * L * DH
        j_lo = lo + s * chunk
        j_hi = tl.minimum(j_lo + chunk, fill)
        holds = (slot >= j_lo) & (slot < j_hi)     # never when slot >= L (j_hi <= L)
        writes = (holds | ((n == 0) & (s == 0))) & (tile == 0) & (slot >= 0) & (slot < L)
        m_i = tl.full((16,), float("-inf"), tl.float32)
        l_i = tl.zeros((16,), tl.float32)
        acc = tl.zeros((16, BLOCK_D), tl.float32)
        if holds | writes:
            row = d_ok[None, :]                                           # [1, BLOCK_D]
            k_new = _rope_heads(src, (HKV * GROUP + kvh).to(tl.int64) * DH, row, kn_ptr, d, d_ok,
                                cos, sin, eps, norm_offset, HAS_KN, DH).to(k_ptr.dtype.element_ty)
            v_new = tl.load(src + (HKV * GROUP + HKV + kvh).to(tl.int64) * DH + d[None, :],
                            mask=row, other=0.0).to(v_ptr.dtype.element_ty)
            if writes:
                dst = kv_base + slot.to(tl.int64) * DH + d[None, :]
                tl.store(k_ptr + dst, k_new, mask=row)
                tl.store(v_ptr + dst, v_new, mask=row)
            if holds:
                # q . k_new: exact products summed in fp32, as tl.dot does.
                s1 = _scaled_scores(tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1),
                                    scale, softcap, SOFTCAP)                      # [16]
                m_i = s1
                l_i = tl.full((16,), 1.0, tl.float32)           # p = e^(s1 - m) = 1 exactly
                acc = acc + v_new.to(tl.float32)
        # 3. split-K attention over the chunk's cache slots, the new one excepted.
        j_end = tl.minimum(j_hi, slot)             # the chunk holding the slot ends with it
        for j0 in range(j_lo, j_end, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, kv_base, j0, j_end, d, d_ok, m_i, l_i,
                                          acc, scale, softcap, DH, BLOCK_N, SOFTCAP, DOT_FP32)
        _finish(out_ptr, pm_ptr, pl_ptr, pacc_ptr, count_ptr, m_i, l_i, acc,
                (b * HKV + kvh) * GROUP + g, g_ok, d, d_ok, pid, s, active, DH, S, COMBINE_UPTO,
                TREE_G, CSTRIDE)


def triton_rope_decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 starts: torch.Tensor, fill: torch.Tensor,
                                 inv_freq: torch.Tensor, attn_scaling: float, num_q_heads: int,
                                 q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor],
                                 eps: float, norm_offset: float, scale: float, window: int = 0,
                                 softcap: float = 0.0, counters: Optional[torch.Tensor] = None,
                                 *, blocks: Optional[DecodeBlocks] = None,
                                 pdl: bool = False) -> torch.Tensor:
    """flashhead::rope_decode_attention with one Triton launch (inputs checked by
    custom_ops.rope_attention.check_inputs).  Writes slot fill - 1 of the caches; returns out
    [B, Hq, 1, Dh] in qkv's dtype.  blocks overrides `decode_blocks` (tests, benchmarks);
    counters: a caller-held zeroed int32 buffer (custom_ops.counters.workspace), else the pool.
    pdl: launch with programmatic dependent launch (custom_ops/pdl.py; sm_90+, not under
    Inductor's tracing).
    """
    B, Hkv, L, Dh = k_cache.shape
    Hq = num_q_heads
    group = Hq // Hkv
    dev = qkv.device
    out = _empty((B, Hq, 1, Dh), qkv.dtype, dev)                         # out: [B, Hq, 1, Dh]
    if B == 0:
        return out
    launch_pdl = pdl_launch_options(_rope_attention_kernel, dev, pdl)
    sb = split_buffers(B, Hkv, group, L, Dh, qkv.dtype, dev, blocks, counters, is_traced(qkv))
    blk, S = sb.blk, sb.blk.splits
    # A missing norm weight is never read; inv_freq stands in (read-only: no aliasing with the
    # written caches for Inductor).
    _launch(_rope_attention_kernel, (sb.part_m.shape[0], S))(
        qkv, k_cache, v_cache, starts, fill.reshape(1), inv_freq,
        q_norm if q_norm is not None else inv_freq, k_norm if k_norm is not None else inv_freq,
        out, sb.part_m, sb.part_l, sb.part_acc, sb.count, float(attn_scaling), float(eps),
        float(norm_offset), float(scale), float(softcap), int(window), blk.min_chunk, L, Hkv,
        group, sb.ng, DH=Dh, S=S, BLOCK_D=blk.block_d, BLOCK_N=blk.block_n,
        HAS_QN=q_norm is not None,
        HAS_KN=k_norm is not None, SOFTCAP=softcap > 0, DOT_FP32=qkv.dtype == torch.float32,
        COMBINE_UPTO=blk.combine_upto, TREE_G=blk.tree_group, CSTRIDE=sb.cstride, PDL=pdl,
        num_warps=blk.num_warps, num_stages=blk.num_stages, **launch_pdl)
    return out
