"""Triton split-K ("flash decoding") attention of one new token against a static KV cache.

Dimensions: B rows, Hq query heads, Hkv kv heads (GROUP = Hq // Hkv query heads share one),
L cache capacity (slots), Dh head size, S splits of a row's valid range.

One launch, grid (B * Hkv * NG, S), NG = cdiv(GROUP, 16) tiles of 16 query heads (one tile for
every GQA model up to 16 query heads per kv head).  The grid depends on shapes only; every
program reads `fill` and `starts[b]` from device memory, so a CUDA graph captured once replays
correctly while the fill grows, and the work scales with the valid range, not with L:

  valid range of row b:  [lo, fill), lo = max(starts[b], fill - window if window > 0, 0)
  chunk = max(cdiv(n, S) rounded up to BLOCK_N, min_chunk), n = fill - lo;  active splits
  A = cdiv(n, chunk) <= S: split s streams slots lo + s * chunk .. + chunk of its kv head once
  for all of its query heads (scores [16, BLOCK_N] and P @ V [16, Dh] by tl.dot, online softmax
  in fp32); splits s >= A exit at once.
  A == 0 (empty row): split 0 writes zeros.  A == 1: split 0 writes the output itself.
  A >= 2: each active split stores its partial (max m, sum l, unnormalized acc [GROUP, Dh],
  fp32), then counts itself on an atomic counter per (b, kv head, tile); the last to arrive
  merges the A partials and resets the counter to 0, so the next call (or CUDA-graph replay)
  starts from zero without a memset.  Above COMBINE_UPTO active splits the merge is a two-level
  tree: the last of each group of TREE_G consecutive splits merges its group into the group's
  first slot (a counter per group), and the last group to finish merges the group results, so
  no program folds more than max(TREE_G, cdiv(A, TREE_G)) partials.
Bytes moved per call: 2 * B * Hkv * n * Dh * elt (K and V of the valid slots, each read once)
+ 2 * B * Hq * Dh * elt (q, out) + ~2 * B * Hq * A * (Dh + 2) * 4 (partials, L2-resident).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from custom_ops.counters import is_traced, workspace
# Launch settings live in their own module; re-exported here for the kernels' callers.
from custom_ops.decode_attention_config import (_HEADS, MAX_SPLITS, DecodeBlocks,  # noqa: F401
                                                _check_blocks, _num_sms, decode_blocks)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel must fully write comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(kernel: Any, grid: tuple[int, ...]) -> Any:
    """wrap_triton so Inductor sees the kernel; the interpreter's kernels launch directly."""
    if isinstance(kernel, JITFunction):
        return torch.library.wrap_triton(kernel)[grid]
    return kernel[grid]


@triton.jit
def _tanh(x):
    """tanh from exp, stable for any |x| (exp(-2|x|) <= 1); absolute error ~1e-7 near 0."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, starts_ptr, fill_ptr, out_ptr, pm_ptr, pl_ptr,
                             pacc_ptr, count_ptr, scale, softcap, window, min_chunk, L, HKV,
                             GROUP, NG, DH: tl.constexpr, S: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                             SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
                             COMBINE_UPTO: tl.constexpr, TREE_G: tl.constexpr,
                             CSTRIDE: tl.constexpr):
    """See the module docstring.  q, out [B, Hq, 1, Dh]; k, v [B, Hkv, L, Dh] (contiguous);
    starts [B] int64; fill [1] int64; partials pm, pl [NP, 16, S] fp32 and pacc [NP, 16, S, Dh]
    fp32 (NP = B * Hkv * NG); count [NP * CSTRIDE] int32 (per program group: the final counter,
    then one per tree group, CSTRIDE = 1 + cdiv(S, TREE_G)), zero on entry and on exit."""
    pid = tl.program_id(0)                         # (b, kv head, head tile)
    s = tl.program_id(1)
    tile = pid % NG
    b = (pid // NG) // HKV
    kvh = (pid // NG) % HKV
    fill = tl.minimum(tl.load(fill_ptr), L)
    lo, n, chunk, active = _split_range(tl.load(starts_ptr + b), fill, window, min_chunk, S,
                                        BLOCK_N)
    if s < tl.maximum(active, 1):
        g = tile * 16 + tl.arange(0, 16)           # query heads of the group, padded to 16
        g_ok = g < GROUP
        d = tl.arange(0, BLOCK_D)
        d_ok = d < DH
        hq = (b * HKV + kvh) * GROUP + g           # flat (b, query head) index
        q = tl.load(q_ptr + hq.to(tl.int64)[:, None] * DH + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)       # [16, BLOCK_D]
        kv_base = (b * HKV + kvh).to(tl.int64) * L * DH
        m_i = tl.full((16,), float("-inf"), tl.float32)
        l_i = tl.zeros((16,), tl.float32)
        acc = tl.zeros((16, BLOCK_D), tl.float32)
        j_lo = lo + s * chunk
        j_hi = tl.minimum(j_lo + chunk, fill)
        # Inductor passes Python floats to user kernels as fp64 scalars: keep the math fp32.
        scale32 = tl.cast(scale, tl.float32)
        for j0 in range(j_lo, j_hi, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, kv_base, j0, j_hi, d, d_ok, m_i, l_i,
                                          acc, scale32, softcap, DH, BLOCK_N, SOFTCAP, DOT_FP32)
        _finish(out_ptr, pm_ptr, pl_ptr, pacc_ptr, count_ptr, m_i, l_i, acc, hq, g_ok, d, d_ok,
                pid, s, active, DH, S, COMBINE_UPTO, TREE_G, CSTRIDE)


@triton.jit
def _split_range(start, fill, window, min_chunk, S: tl.constexpr, BLOCK_N: tl.constexpr):
    """A row's valid slots [lo, fill) (lo = max(start, fill - window if window > 0, 0)), their
    count n, the chunk a split takes (cdiv(n, S) rounded up to BLOCK_N, at least min_chunk) and
    the active splits A = cdiv(n, chunk) (see the module docstring)."""
    lo = tl.maximum(start, 0)
    if window > 0:
        lo = tl.maximum(lo, fill - window)
    n = tl.maximum(fill - lo, 0)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(n, S), BLOCK_N) * BLOCK_N, min_chunk)
    return lo, n, chunk, tl.cdiv(n, chunk)


@triton.jit
def _scaled_scores(sc, scale, softcap, SOFTCAP: tl.constexpr):
    """q . k products (fp32) -> scores: times scale (fp32), then softcap * tanh(x / softcap)
    when SOFTCAP (softcap: Inductor passes it as an fp64 scalar, so it is cast to fp32)."""
    sc = sc * scale
    if SOFTCAP:
        cap = tl.cast(softcap, tl.float32)
        sc = cap * _tanh(sc / cap)
    return sc


@triton.jit
def _attend_block(q, k_ptr, v_ptr, kv_base, j0, j_end, d, d_ok, m_i, l_i, acc, scale, softcap,
                  DH: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
                  DOT_FP32: tl.constexpr):
    """One online-softmax step over cache slots j0 .. j0 + BLOCK_N (those < j_end; at least
    one): q [16, BLOCK_D] against K and V [BLOCK_N, BLOCK_D] at kv_base (one kv head's [L, Dh]
    rows); scale fp32.  Returns the updated (m_i [16], l_i [16], acc [16, BLOCK_D]) fp32."""
    j = j0 + tl.arange(0, BLOCK_N)
    j_ok = j < j_end
    kv_off = kv_base + j.to(tl.int64)[:, None] * DH + d[None, :]
    kv_mask = j_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)                  # [BLOCK_N, BLOCK_D]
    # V is requested with K, before the scores: a short row is a chain of memory round trips,
    # and this makes a block one of them instead of two.
    v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)                  # [BLOCK_N, BLOCK_D]
    if DOT_FP32:
        sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        sc = tl.dot(q, tl.trans(k))                                       # [16, BLOCK_N] fp32
    sc = tl.where(j_ok[None, :], _scaled_scores(sc, scale, softcap, SOFTCAP), float("-inf"))
    # The block holds a valid slot (j0 < j_end), so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(sc - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_FP32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _finish(out_ptr, pm_ptr, pl_ptr, pacc_ptr, count_ptr, m_i, l_i, acc, hq, g_ok, d, d_ok, pid,
            s, active, DH: tl.constexpr, S: tl.constexpr, COMBINE_UPTO: tl.constexpr,
            TREE_G: tl.constexpr, CSTRIDE: tl.constexpr):
    """A split's end: with one active split, out[hq] = acc / l (0 where l = 0); else store the
    partials (m, l, acc) of split s and count it.  Up to COMBINE_UPTO active splits, the last to
    arrive merges them all; above, the two-level tree of the module docstring.  The merging
    program resets the counter it won.  hq [16] flat (b, query head) indices, g_ok their mask."""
    out_mask = g_ok[:, None] & d_ok[None, :]
    out_off = hq.to(tl.int64)[:, None] * DH + d[None, :]
    if active <= 1:                            # the whole range was this program's
        o = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
        tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = pid.to(tl.int64) * 16 + tl.arange(0, 16)                   # [16] (NP, 16) rows
        _store_partial(pm_ptr, pl_ptr, pacc_ptr, row, s, m_i, l_i, acc, g_ok, d, out_mask, DH, S)
        top = count_ptr + pid * CSTRIDE
        # The barrier orders every thread's partial stores before the counter's release; the
        # last program's acquire orders its partial loads after every other release.
        tl.debug_barrier()
        if active <= COMBINE_UPTO:
            if tl.atomic_add(top, 1, sem="acq_rel") == active - 1:
                m, ll, acc = _merge(pm_ptr, pl_ptr, pacc_ptr, row, g_ok, d, out_mask, 0, 1,
                                    active, DH, S)
                _store_out(out_ptr, out_off, out_mask, g_ok, ll, acc)
                tl.atomic_xchg(top, 0, sem="relaxed")                   # clean for next call
        else:
            grp = s // TREE_G
            first = grp * TREE_G
            members = tl.minimum(active - first, TREE_G)                 # splits of the group
            if tl.atomic_add(top + 1 + grp, 1, sem="acq_rel") == members - 1:
                m, ll, acc = _merge(pm_ptr, pl_ptr, pacc_ptr, row, g_ok, d, out_mask, first, 1,
                                    members, DH, S)
                _store_partial(pm_ptr, pl_ptr, pacc_ptr, row, first, m, ll, acc, g_ok, d,
                               out_mask, DH, S)
                tl.atomic_xchg(top + 1 + grp, 0, sem="relaxed")
                groups = tl.cdiv(active, TREE_G)
                tl.debug_barrier()
                if tl.atomic_add(top, 1, sem="acq_rel") == groups - 1:
                    m, ll, acc = _merge(pm_ptr, pl_ptr, pacc_ptr, row, g_ok, d, out_mask, 0,
                                        TREE_G, groups, DH, S)
                    _store_out(out_ptr, out_off, out_mask, g_ok, ll, acc)
                    tl.atomic_xchg(top, 0, sem="relaxed")


@triton.jit
def _store_partial(pm_ptr, pl_ptr, pacc_ptr, row, t, m, ll, acc, g_ok, d, out_mask,
                   DH: tl.constexpr, S: tl.constexpr):
    """Partial slot t of the rows [16]: m, l [16] and acc [16, BLOCK_D], fp32."""
    tl.store(pm_ptr + row * S + t, m, mask=g_ok)
    tl.store(pl_ptr + row * S + t, ll, mask=g_ok)
    tl.store(pacc_ptr + (row * S + t)[:, None] * DH + d[None, :], acc, mask=out_mask)


@triton.jit
def _store_out(out_ptr, out_off, out_mask, g_ok, ll, acc):
    """out = acc / l for the tile's real heads (every merged partial holds a valid slot)."""
    o = acc / tl.where(g_ok, ll, 1.0)[:, None]
    tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge(pm_ptr, pl_ptr, pacc_ptr, row, g_ok, d, out_mask, t0, stride, count,
           DH: tl.constexpr, S: tl.constexpr):
    """(m, l, acc) of the partial slots t0, t0 + stride, ... (count of them, >= 1) merged, all 16
    query heads of the tile at once, one slot after the other (a [16, BLOCK_D] tile per step,
    online rescaling): `count` dependent L2 reads, .cg loads (past the SM's L1, which is not
    coherent with the other programs' stores).  Every merged slot holds a valid slot, so m is
    finite for the tile's real heads; padded heads read m = 0 and are never stored."""
    m = tl.load(pm_ptr + row * S + t0, mask=g_ok, other=0.0, cache_modifier=".cg")     # [16]
    ll = tl.load(pl_ptr + row * S + t0, mask=g_ok, other=0.0, cache_modifier=".cg")
    acc = tl.load(pacc_ptr + (row * S + t0)[:, None] * DH + d[None, :], mask=out_mask,
                  other=0.0, cache_modifier=".cg")                                   # [16, BD]
    # Unrolled so that several slots' loads are in flight at once (each is an L2 round trip).
    for i in tl.range(1, count, loop_unroll_factor=2):
        t = t0 + i * stride
        mt = tl.load(pm_ptr + row * S + t, mask=g_ok, other=0.0, cache_modifier=".cg")
        lt = tl.load(pl_ptr + row * S + t, mask=g_ok, other=0.0, cache_modifier=".cg")
        at = tl.load(pacc_ptr + (row * S + t)[:, None] * DH + d[None, :], mask=out_mask,
                     other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, mt)
        wa = tl.exp(m - m_new)
        wt = tl.exp(mt - m_new)
        ll = ll * wa + lt * wt
        acc = acc * wa[:, None] + at * wt[:, None]
        m = m_new
    return m, ll, acc


class SplitBuffers(NamedTuple):
    """Launch settings and split-K buffers of one call of either attention kernel (this one and
    custom_ops/rope_attention_triton.py).  Grid (NP, blk.splits), NP = B * Hkv * ng."""
    blk: DecodeBlocks
    ng: int                   # NG: tiles of 16 query heads per kv head
    part_m: torch.Tensor      # [NP, 16, S] fp32: the splits' running maxima
    part_l: torch.Tensor      # [NP, 16, S] fp32: their sums
    part_acc: torch.Tensor    # [NP, 16, S, Dh] fp32: their unnormalized outputs (A <= S used)
    count: torch.Tensor       # [>= NP * cstride] int32, zero (custom_ops.counters.workspace)
    cstride: int              # CSTRIDE: counters per program group (1 + tree groups)


def split_buffers(B: int, Hkv: int, group: int, L: int, Dh: int, dtype: torch.dtype,
                  device: torch.device, blocks: Optional[DecodeBlocks],
                  counters: Optional[torch.Tensor], traced: bool) -> SplitBuffers:
    """`blocks` (checked) or `decode_blocks`, and the partials and counters the kernel needs."""
    blk = blocks or decode_blocks(B, Hkv, group, L, Dh, dtype, device)
    _check_blocks(blk, Dh)
    ng = triton.cdiv(group, _HEADS)
    NP, S = B * Hkv * ng, blk.splits
    cstride = 1 + triton.cdiv(S, blk.tree_group)
    return SplitBuffers(blk, ng, _empty((NP, _HEADS, S), torch.float32, device),
                        _empty((NP, _HEADS, S), torch.float32, device),
                        _empty((NP, _HEADS, S, Dh), torch.float32, device),
                        workspace(counters, NP * cstride, device, traced), cstride)


def triton_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            starts: torch.Tensor, fill: torch.Tensor, scale: float,
                            window: int = 0, softcap: float = 0.0, *,
                            blocks: Optional[DecodeBlocks] = None,
                            counters: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode attention with the Triton kernel: out [B, Hq, 1, Dh] in q.dtype.

    Same contract as custom_ops.decode_attention.decode_attention_reference (inputs checked by
    custom_ops.decode_attention.check_inputs): q [B, Hq, 1, Dh]; k_cache, v_cache [B, Hkv, L,
    Dh] contiguous, read in place; starts [B] int64; fill one int64.  No host sync: the grid
    depends on shapes only.  blocks overrides `decode_blocks` (tests, benchmarks); counters: a
    caller-held zeroed int32 buffer (custom_ops.counters.workspace), else the pool.
    """
    B, Hq, _, Dh = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    dev = q.device
    out = _empty((B, Hq, 1, Dh), q.dtype, dev)                           # out: [B, Hq, 1, Dh]
    if B == 0 or Hq == 0:
        return out
    q = q.contiguous()
    sb = split_buffers(B, Hkv, group, L, Dh, q.dtype, dev, blocks, counters, is_traced(q))
    blk, S = sb.blk, sb.blk.splits
    _launch(_decode_attention_kernel, (sb.part_m.shape[0], S))(
        q, k_cache, v_cache, starts, fill.reshape(1), out, sb.part_m, sb.part_l, sb.part_acc,
        sb.count, float(scale), float(softcap), int(window), blk.min_chunk, L, Hkv, group, sb.ng,
        DH=Dh, S=S, BLOCK_D=blk.block_d, BLOCK_N=blk.block_n, SOFTCAP=softcap > 0,
        DOT_FP32=q.dtype == torch.float32, COMBINE_UPTO=blk.combine_upto,
        TREE_G=blk.tree_group, CSTRIDE=sb.cstride, num_warps=blk.num_warps,
        num_stages=blk.num_stages)
    return out
