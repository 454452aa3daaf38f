"""Triton kernels for FlashHead on CUDA: centroid scoring, the batch's cluster union, exact scoring.

Dimensions: B rows of the batch, D hidden size, V vocabulary, K clusters, C cluster size
(largest cluster), P probed clusters per row, U = min(B * P, K) slots of the cluster union,
k returned candidates.

Pipeline of `triton_topk` (every launch fixed-size, no host sync: CUDA-graph capturable):
  1. `_centroid_scores_kernel`: S [B, K] fp32 = h . centroids (+ noise); each program reads a
     block of centroids once for a tile of 16, 32 or 64 rows (`_blocks`; for B > 64 the next
     programs take the block's other row tiles, from L2), zeroes its block of flag [K], and
     counts the first digit (top 11 bits) of every score's order key into a per-row histogram
     (global atomics).
  2. Multi-program radix select (the default; one program per 1024 clusters of a row):
     `_select_refine_kernel` twice counts the next digit (11, then 10 bits) of the scores whose
     higher digits are the P-th largest's; `_select_take_kernel` then knows the P-th largest
     exactly, takes its chunk's picks (exact ties: smallest cluster ids first), and writes
     pos [B, K] = the slot of cluster c among row b's P picks or -1, sel [B, P], flag [K] and
     the batch's cluster union [U] with its length (atomic counters, so any order; at B = 1
     the union is row 0's picks in slot order, without flag or counter).
     Alternatives (select=): "single", `_select_top_kernel`, one program per row (a radix select
     in registers, K <= 16384), or "torch", torch.topk + `_mark_selected_kernel`; both then build
     the union with `_compact_union_kernel` (one program, increasing cluster order).
  3. `_score_union_kernel`: each program reads the C weight rows of one (or, for large B, a few)
     union clusters once, scores them against all B rows, and writes the rows that picked each
     cluster into keys [B, P * C] (logit, then smallest id, in one int64).  For k = 1 it keeps
     only each row's largest key (atomic max) and its last program to finish writes ids and
     logits; for k > 1 torch.topk over the keys and `_decode_keys_kernel` give the k best.
     Always-scored rows (the op's always ids): the first programs of this kernel score them for
     every row of h (their slots follow the P * C cluster slots), and a union program that meets
     one of them in a picked cluster leaves padding in its slot, so each id is a candidate once.
On Hopper and newer, run eagerly (also inside a CUDA graph), every kernel after the first is
launched with programmatic dependent launch (`custom_ops.pdl.pdl_entry`): it starts while the
kernel before it still runs and waits for it on the GPU, which hid ~3 us of launch gaps at
B = 1 on an H100.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from custom_ops.pdl import pdl_entry
from custom_ops.pdl import supported as pdl_supported

# Widest centroid row the one-program-per-row Triton selection holds in registers (16 warps x
# 32 keys per thread); above it torch.topk selects.
_MAX_SELECT_K = 16384


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every scratch buffer that a kernel must fully write comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(kernel: Any, grid: tuple[int, ...], pdl: bool = False) -> Any:
    """wrap_triton so Inductor sees the kernel; under TRITON_INTERPRET=1 the kernel is an
    InterpretedFunction, which older torch versions refuse to wrap, so launch it directly.
    pdl (only where `_pdl_usable`): launch it directly with programmatic dependent launch; the
    kernel must then wait with `pdl_entry` before it touches memory."""
    if pdl:
        return lambda *args, **kwargs: kernel[grid](*args, launch_pdl=True, **kwargs)
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    if isinstance(fn, JITFunction):
        return torch.library.wrap_triton(kernel)[grid]
    return kernel[grid]


def _pdl_usable(h: torch.Tensor) -> bool:
    """Whether the launches may use programmatic dependent launch (custom_ops.pdl.supported:
    a Hopper or newer GPU, triton >= 3.4, compiled kernels), with the op running now on real
    tensors.  Not while torch.compile or torch.export trace the op: Inductor launches the
    kernels itself from the traced graph and has no launch_pdl option for user kernels."""
    if (not h.is_cuda or torch.compiler.is_compiling() or type(h) is not torch.Tensor
            or _get_current_dispatch_mode_stack()):   # make_fx / fake / functional tracing
        return False
    return pdl_supported(_score_union_kernel, h.device)


# Multi-program radix select: the order key of an fp32 score (32 bits) in three digits, 11 + 11
# + 10 bits from the top, one histogram of _NBINS bins per digit and row.
_NBINS: tl.constexpr = tl.constexpr(2048)
_WS_ROW: tl.constexpr = tl.constexpr(3 * 2048)   # ints of workspace per row: 3 histograms
_SELECT_CHUNK = 1024        # scores per program of the selection kernels
_KEY_MIN: tl.constexpr = tl.constexpr(-9223372036854775807 - 1)   # below every candidate key


@triton.jit
def _order_key32(s):
    """int32 with the order of the fp32 scores s (-0.0 == +0.0, so they make equal keys);
    `_decode_key` inverts it."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _order_key64(s):
    """int64 in [0, 2**32) with the order of the fp32 scores s (-0.0 == +0.0)."""
    return _order_key32(s).to(tl.int64) + 2147483648


@triton.jit
def _cut(hist, need, NB: tl.constexpr):
    """Radix-select step: (t, need - #(digit > t)) where t is the digit of the need-th largest
    key, given hist [NB] int32 = how many of the keys still in play have each digit."""
    ge = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist       # #(digit >= bin)
    t = tl.sum((ge >= need).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(tl.arange(0, NB) > t, hist, 0), axis=0)
    return t, need - above


@triton.jit
def _select_refine_kernel(s_ptr, ws_ptr, K, P, DIGIT: tl.constexpr, CHUNK: tl.constexpr,
                          PDL: tl.constexpr):
    """Digit 2 or 3 of the multi-program radix select: counts, for the scores of row b whose
    higher digits equal those of the P-th largest score (read off the histograms before), their
    DIGIT-th digit into ws[b, DIGIT - 1].

    S [B, K] fp32; ws [B, 3, 2048] int32 (histograms of the digits before complete, this one
    zeroed before).  Grid (cdiv(K, CHUNK), B).  Cost: 4 * B * K + 8-16 KB * programs (L2) read.
    """
    pdl_entry(PDL, PDL)
    b = tl.program_id(1).to(tl.int64)
    bins = tl.arange(0, _NBINS)
    row_ws = ws_ptr + b * _WS_ROW
    need = tl.full((), 0, tl.int32) + P                  # (P == 1 arrives as a constexpr)
    t1, need = _cut(tl.load(row_ws + bins), need, _NBINS)
    c = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    ok = c < K
    u = _order_key64(tl.load(s_ptr + b * K + c, mask=ok, other=0.0))
    if DIGIT == 2:
        tl.atomic_add(row_ws + _NBINS + ((u >> 10) & 2047), tl.full((CHUNK,), 1, tl.int32),
                      mask=ok & ((u >> 21) == t1), sem="relaxed")
    else:
        t2, need = _cut(tl.load(row_ws + _NBINS + bins), need, _NBINS)
        prefix = (t1.to(tl.int64) << 11) | t2.to(tl.int64)
        tl.atomic_add(row_ws + 2 * _NBINS + (u & 1023), tl.full((CHUNK,), 1, tl.int32),
                      mask=ok & ((u >> 10) == prefix), sem="relaxed")


@triton.jit
def _select_take_kernel(s_ptr, ws_ptr, flag_ptr, union_ptr, sel_ptr, pos_ptr, B, K, P,
                        ONE_ROW: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    """Last step of the multi-program radix select, the batch's cluster union included.

    From the three digit histograms in ws [B, 3, 2048] the program knows the P-th largest key
    T of row b and how many keys equal to T are needed; it takes the keys > T and those ties,
    the smallest cluster ids first (counting the ties of earlier chunks only when some ties
    must be left out).  For its chunk of clusters it then writes
      pos [B, K] int32: the slot of cluster c among row b's P picks, or -1 (every element);
      sel [B, P] int64: sel[b, slot] = c (slots are handed out by an atomic counter per row,
          so their order is arbitrary; every slot written);
      flag [K] int32 (zeroed before) = 1 for every picked cluster, and the first program to
          flag a cluster appends it to union [U] int32; counters (zeroed before) after ws:
          taken[b] = ws[B * 6144 + b], union length n_union = ws[B * 6144 + B].
    ONE_ROW (B == 1): the union is row 0's picks, so union[slot] = c and n_union = P are written
    directly (no flag exchange and no second counter: two fewer atomic round trips in the chain).
    Grid (cdiv(K, CHUNK), B).  Cost: 4 * B * K read, 4 * B * K + 8 * B * P written.
    """
    pdl_entry(PDL, PDL)
    b = tl.program_id(1).to(tl.int64)
    bins = tl.arange(0, _NBINS)
    row_ws = ws_ptr + b * _WS_ROW
    need = tl.full((), 0, tl.int32) + P
    t1, need = _cut(tl.load(row_ws + bins), need, _NBINS)
    t2, need = _cut(tl.load(row_ws + _NBINS + bins), need, _NBINS)
    h3 = tl.load(row_ws + 2 * _NBINS + tl.arange(0, 1024))
    t3, need = _cut(h3, need, 1024)
    n_tie = tl.sum(tl.where(tl.arange(0, 1024) == t3, h3, 0), axis=0)
    thr = (((t1.to(tl.int64) << 11) | t2.to(tl.int64)) << 10) | t3.to(tl.int64)   # T
    c0 = tl.program_id(0) * CHUNK
    ties_before = tl.full((), 0, tl.int32)
    if need < n_tie:                    # some keys equal to T stay out: earlier ids first
        for r0 in range(0, c0, CHUNK):
            r = r0 + tl.arange(0, CHUNK)
            ur = _order_key64(tl.load(s_ptr + b * K + r, mask=r < K, other=0.0))
            ties_before += tl.sum(((r < K) & (ur == thr)).to(tl.int32), axis=0)
    c = c0 + tl.arange(0, CHUNK)
    ok = c < K
    u = _order_key64(tl.load(s_ptr + b * K + c, mask=ok, other=0.0))
    tie = ok & (u == thr)
    rank = ties_before + tl.cumsum(tie.to(tl.int32), axis=0) - 1
    take = ok & ((u > thr) | (tie & (rank < need)))
    taken = take.to(tl.int32)
    counters = ws_ptr + B * _WS_ROW
    base = tl.atomic_add(counters + b, tl.sum(taken, axis=0), sem="relaxed")
    slot = base + tl.cumsum(taken, axis=0) - 1
    tl.store(pos_ptr + b * K + c, tl.where(take, slot, -1), mask=ok)
    tl.store(sel_ptr + b * P + slot, c.to(tl.int64), mask=take)
    if ONE_ROW:
        tl.store(union_ptr + slot, c, mask=take)
        if tl.program_id(0) == 0:
            tl.store(counters + B, P)
    else:
        old = tl.atomic_xchg(flag_ptr + c, tl.full((CHUNK,), 1, tl.int32), mask=take,
                             sem="relaxed")
        new = (take & (old == 0)).to(tl.int32)
        ubase = tl.atomic_add(counters + B, tl.sum(new, axis=0), sem="relaxed")
        tl.store(union_ptr + ubase + tl.cumsum(new, axis=0) - 1, c, mask=new != 0)


@triton.jit
def _centroid_scores_kernel(h_ptr, cent_ptr, noise_ptr, s_ptr, flag_ptr, ws_ptr, best_ptr, B, K,
                            D, HAS_NOISE: tl.constexpr, HIST: tl.constexpr,
                            INIT_BEST: tl.constexpr, DOT_FP32: tl.constexpr,
                            EVEN_D: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """S[b, c] = sum_d h[b, d] * centroids[c, d] (+ noise[b, c]), fp32 accumulation.

    h [B, D] and centroids [K, D] in bf16/fp16/fp32 (fp32 products unless both are the same
    16-bit type, whose products are exact in fp32 anyway); noise [B, K] any float (read only
    with HAS_NOISE); S [B, K] fp32, every element written; flag [K] int32 zeroed (here, so that
    the selection can mark it without a memset launch).  With HIST, also the first digit's
    histogram of the multi-program selection (see `_select_refine_kernel`): ws [B, 3, 2048] int32
    (zeroed before) gets ws[b, 0, top 11 bits of the score's order key] += 1.  With INIT_BEST,
    best [B + 1] int64 (k = 1, see `_score_union_kernel`) = B times the smallest int64, then 0.
    Grid (cdiv(K, BLOCK_K) * cdiv(B, BLOCK_B),): a program reads its BLOCK_K centroids once for
    BLOCK_B rows; the row blocks of one centroid block are consecutive programs, so they run
    together and all but the first read the centroids from L2.
    Cost: K * D * elt bytes of centroids (29 MB for K=9496, D=1536 bf16) + 4 * B * K written.
    PDL: launched normally (a memset comes before it), it lets the next kernel launch early.
    """
    pdl_entry(False, PDL)
    nb = tl.cdiv(B, BLOCK_B)
    kb = tl.program_id(0) // nb                                         # centroid block
    bb = tl.program_id(0) % nb                                          # row block
    rows = kb * BLOCK_K + tl.arange(0, BLOCK_K)                         # [BLOCK_K] cluster ids
    b = bb * BLOCK_B + tl.arange(0, BLOCK_B)                            # [BLOCK_B]
    row_ok = rows < K
    b_ok = b < B
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            c_mask = row_ok[:, None]
            h_mask = b_ok[:, None]
        else:
            c_mask = row_ok[:, None] & (d < D)[None, :]
            h_mask = b_ok[:, None] & (d < D)[None, :]
        cv = tl.load(cent_ptr + rows64[:, None] * D + d[None, :], mask=c_mask, other=0.0)
        hv = tl.load(h_ptr + b[:, None] * D + d[None, :], mask=h_mask, other=0.0)
        if DOT_FP32:
            acc = tl.dot(cv.to(tl.float32), tl.trans(hv.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(cv, tl.trans(hv), acc)
    out = b[None, :].to(tl.int64) * K + rows[:, None]                   # [BLOCK_K, BLOCK_B]
    out_mask = row_ok[:, None] & b_ok[None, :]
    if HAS_NOISE:
        acc += tl.load(noise_ptr + out, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(s_ptr + out, acc, mask=out_mask)
    if HIST:
        u = _order_key64(acc)
        tl.atomic_add(ws_ptr + b[None, :].to(tl.int64) * _WS_ROW + (u >> 21),
                      tl.full((BLOCK_K, BLOCK_B), 1, tl.int32), mask=out_mask, sem="relaxed")
    if bb == 0:
        tl.store(flag_ptr + rows, tl.zeros((BLOCK_K,), dtype=tl.int32), mask=row_ok)
    if INIT_BEST:
        if kb == 0:
            tl.store(best_ptr + b, tl.full((BLOCK_B,), _KEY_MIN, tl.int64), mask=b_ok)
            if bb == 0:
                tl.store(best_ptr + B, tl.zeros((), dtype=tl.int64))


# One config (no benchmarking, so safe inside CUDA-graph capture): 16 warps keep 16384 keys at
# 32 per thread.
@triton.autotune(configs=[triton.Config({}, num_warps=16)], key=[])
@triton.jit
def _select_top_kernel(s_ptr, sel_ptr, pos_ptr, flag_ptr, K, P, BLOCK_K: tl.constexpr):
    """sel[b, :] = the P clusters with the largest S[b, :], in increasing cluster order.

    S [B, K] fp32; sel [B, P] int64, every element written; pos [B, K] int32, every element
    written: the slot p of cluster c in sel[b], or -1; flag [K] int32 (zeroed before): set to 1
    for every selected cluster (concurrent writes of 1 from several rows are benign).
    One program per row holds the row in registers (BLOCK_K >= K) and finds the P-th largest
    score T by a radix select on order-preserving keys: 4 passes of 8-bit digits, from the top,
    each a 256-bin histogram of the digit over the keys whose higher digits equal T's so far.
    It then takes every score > T and the scores == T of the smallest cluster ids until P are
    taken (torch.topk leaves ties unspecified; the reference uses it, so either choice is the
    reference's); -0.0 ties with +0.0.
    Cost: 4 * B * K read, 8 * B * P + 4 * B * K written; 4 histogram passes + 2 scans per row.
    """
    b = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_K)
    ok = c < K
    key = _order_key32(tl.load(s_ptr + b * K + c, mask=ok, other=0.0))
    sign = tl.full((), 1, tl.int32) << 31
    # u: unsigned order as bits, so digits compare.  Lanes past K get u = 0, below every real
    # score (u = 0 is one NaN pattern, and a tie with it goes to the real, smaller ids first),
    # so they are never taken and the loop needs no mask (fewer live registers).
    u = tl.where(ok, key ^ sign, 0)
    key = u ^ sign
    # prefix: T's digits found so far (u order; lower bits 0), hi: the bits they cover, need:
    # how many keys that match the prefix are still to take (1 <= need <= their count).
    prefix = tl.full((), 0, tl.int32)
    hi = tl.full((), 0, tl.int32)
    need = tl.full((), 0, tl.int32) + P                  # (P == 1 arrives as a constexpr)
    # A runtime loop, not static_range: a long unrolled dataflow chain makes Inductor's kernel
    # mutation analysis slow.
    for i in range(4):
        shift = 24 - 8 * i
        match = (u & hi) == prefix
        hist = tl.histogram((u >> shift) & 255, 256, mask=match)       # [256] int32
        d, need = _cut(hist, need, 256)                                  # T's digit
        prefix |= d << shift
        hi |= 255 << shift
    t = prefix ^ sign
    above = key > t
    tie = key == t
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(pos_ptr + b * K + c, tl.where(take, slot, -1), mask=ok)
    tl.store(flag_ptr + c, tl.full((BLOCK_K,), 1, tl.int32), mask=take)
    # sel from the pos row just written (L1/L2-hot), 2048 clusters at a time: scattering all
    # BLOCK_K ids at once keeps 32 64-bit addresses per thread live and spilled registers
    # (sm_90, 16 warps).  The barrier makes this program's pos stores visible to all its threads.
    tl.debug_barrier()
    for c0 in range(0, K, 2048):
        co = c0 + tl.arange(0, 2048)
        p = tl.load(pos_ptr + b * K + co, mask=co < K, other=-1)
        tl.store(sel_ptr + b * P + p, co.to(tl.int64), mask=p >= 0)


@triton.jit
def _mark_selected_kernel(sel_ptr, pos_ptr, flag_ptr, B, K, P, BLOCK: tl.constexpr):
    """pos[b, sel[b, p]] = p and flag[sel[b, p]] = 1 for every (b, p).

    The path for torch.topk selection.  sel [B, P] int64 distinct per row; pos [B, K] int32
    pre-filled with -1; flag [K] int32 pre-zeroed (concurrent writes of 1 to one flag are
    benign).  Cost: ~12 * B * P bytes.
    """
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < B * P
    c = tl.load(sel_ptr + idx, mask=ok, other=0)
    b = idx // P
    tl.store(pos_ptr + b.to(tl.int64) * K + c, idx - b * P, mask=ok)
    tl.store(flag_ptr + c, tl.full((BLOCK,), 1, tl.int32), mask=ok)


@triton.jit
def _compact_union_kernel(flag_ptr, union_ptr, n_union_ptr, K, BLOCK: tl.constexpr):
    """union[:n] = the flagged clusters in increasing order; n_union[0] = n.

    flag [K] int32 0/1; union [U] int32, only its first n slots written; n_union [1] int32.
    One program walks K in blocks with a running count (one launch instead of a cumsum's two
    and a scatter).  Cost: 4 * K read + 4 * n written.
    """
    n = tl.full((), 0, tl.int32)
    for c0 in range(0, K, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        f = (tl.load(flag_ptr + c, mask=c < K, other=0) != 0).to(tl.int32)
        tl.store(union_ptr + n + tl.cumsum(f, axis=0) - 1, c, mask=f != 0)
        n += tl.sum(f, axis=0)
    tl.store(n_union_ptr, n)


@triton.jit
def _score_union_kernel(h_ptr, w_ptr, offsets_ptr, token_ids_ptr, pos_ptr, union_ptr,
                        n_union_ptr, key_ptr, ids_ptr, logit_ptr, always_ptr, B, K, D, V, NCAND,
                        C: tl.constexpr, GROUP: tl.constexpr, BEST: tl.constexpr,
                        DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
                        A: tl.constexpr, A_BLOCK: tl.constexpr, A_PROGRAMS: tl.constexpr):
    """Exact logits of the union's clusters for the rows that picked them, and of the
    always-scored rows for every row.

    h [B, D]; weight [V, D] reordered; offsets [K + 1] int64; token_ids [V] int64; pos [B, K]
    int32; union [U] int32 with length n_union[0].  Program g scores the rows of the GROUP
    clusters union[g * GROUP:(g + 1) * GROUP] (C or fewer rows each) once against each
    block of BLOCK_B rows of h in turn (more than one block only for B > 64; the later blocks
    read the weight rows from L1/L2), and for each row b and cluster c with p = pos[b, c] >= 0
    writes slots p * C .. p * C + C - 1 of
      key [B, NCAND = P * C (+ A)] int64: (logit as order-preserving int32) << 32 |
          (2**31 - 1 - vocab id), so the largest key is the largest logit, ties to the smallest
          vocab id; the logit is exact and decodes back from the key (`_decode_key`); padding
          slots of short clusters hold -inf and token_ids[0], like the reference.
    Every (b, p) slot is written exactly once.  Programs past the union's length skip the work.
    BEST (k = 1): no key array; key [B + 1] int64 (set by `_centroid_scores_kernel`) gets
    key[b] = max(key[b], the program's best key of row b) by atomics, key[B] counts finished
    programs, and the last program to finish decodes key[:B] into ids [B, 1] int64 and logits
    [B, 1] fp32 (so no reduction launch follows).
    GROUP = BLOCK_B // BLOCK_C (`_blocks`: 1 at 16-row tiles, 4 at 64 rows and C = 16), so
    that a program reads no more of h than of the weight.  Measured on an H100 at B=64, probes
    64: 0.143 ms for the whole op with 64-row tiles of 4 clusters; with 16-row tiles 0.244 ms
    (4 programs per cluster, launched one after another) or 0.291 ms (one program per cluster
    looping over the 4 row blocks).
    Always-scored rows (A > 0; A = 0 compiles the kernel without any of this): always [A] int64
    rows of the weight (A <= 64, V given for bounds).  The first A_PROGRAMS programs score them
    (`_score_always_block`, GROUP * BLOCK_C rows each) for every row of h into key slots
    P * C .. P * C + A - 1 (NCAND = P * C + A), or into the row maxima (BEST); the union
    programs follow and turn the slot of an always row inside their clusters into padding, so
    every row is a candidate once.
    Cost: |union| * C * D * elt bytes of weight (12.6 MB for 256 clusters, C=16, D=1536 bf16;
    all 467 MB when the union covers every cluster) + 8 * B * P * C bytes written; always rows:
    A * D * elt bytes of weight (3 KB per id at D=1536 bf16) + 8 * B * A written, plus A * 8
    bytes per union program (L2).
    """
    pdl_entry(PDL, PDL)
    g = tl.program_id(0) - A_PROGRAMS
    n_union = tl.load(n_union_ptr)
    if A_PROGRAMS > 0:
        if g < 0:
            for bb in range(0, tl.cdiv(B, BLOCK_B)):
                _score_always_block(h_ptr, w_ptr, token_ids_ptr, always_ptr, key_ptr,
                                    g + A_PROGRAMS, bb, B, D, V, NCAND, A, A_BLOCK, BEST,
                                    DOT_FP32, EVEN_D, BLOCK_B, GROUP * BLOCK_C, BLOCK_D)
        elif g * GROUP < n_union:
            for bb in range(0, tl.cdiv(B, BLOCK_B)):
                _score_union_block(h_ptr, w_ptr, offsets_ptr, token_ids_ptr, pos_ptr, union_ptr,
                                   n_union, key_ptr, always_ptr, g, bb, B, K, D, NCAND, C, GROUP,
                                   BEST, DOT_FP32, EVEN_D, BLOCK_B, BLOCK_C, BLOCK_D, A,
                                   A_BLOCK)
    elif g * GROUP < n_union:
        for bb in range(0, tl.cdiv(B, BLOCK_B)):
            _score_union_block(h_ptr, w_ptr, offsets_ptr, token_ids_ptr, pos_ptr, union_ptr,
                               n_union, key_ptr, always_ptr, g, bb, B, K, D, NCAND, C, GROUP,
                               BEST, DOT_FP32, EVEN_D, BLOCK_B, BLOCK_C, BLOCK_D, A, A_BLOCK)
    if BEST:
        # Last program out decodes the row maxima.  The barrier orders every thread's atomic_max
        # before the counter's release; the counter's acquire orders the reads after it.
        tl.debug_barrier()
        done = tl.atomic_add(key_ptr + B, 1, sem="acq_rel")
        if done == tl.num_programs(0) - 1:
            for r0 in range(0, B, BLOCK_B):
                r = r0 + tl.arange(0, BLOCK_B)
                best = tl.atomic_max(key_ptr + r, tl.full((BLOCK_B,), _KEY_MIN, tl.int64),
                                     mask=r < B, sem="relaxed")     # an atomic read
                vid, logit = _decode_key(best)
                tl.store(ids_ptr + r, vid, mask=r < B)
                tl.store(logit_ptr + r, logit, mask=r < B)


@triton.jit
def _rows_dot(h_ptr, w_ptr, rows, valid, b, b_ok, D, DOT_FP32: tl.constexpr,
              EVEN_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """fp32 [BLOCK_B, BLOCK_N] products of the rows b of h [B, D] with the weight rows `rows`
    (weight [V, D]), over D in BLOCK_D chunks; rows not `valid` and b not `b_ok` read zeros."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            w_mask = valid[:, None]
            h_mask = b_ok[:, None]
        else:
            w_mask = valid[:, None] & (d < D)[None, :]
            h_mask = b_ok[:, None] & (d < D)[None, :]
        wv = tl.load(w_ptr + rows[:, None] * D + d[None, :], mask=w_mask, other=0.0)
        hv = tl.load(h_ptr + b[:, None] * D + d[None, :], mask=h_mask, other=0.0)
        if DOT_FP32:
            acc = tl.dot(hv.to(tl.float32), tl.trans(wv.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(hv, tl.trans(wv), acc)
    return acc


@triton.jit
def _score_union_block(h_ptr, w_ptr, offsets_ptr, token_ids_ptr, pos_ptr, union_ptr, n_union,
                       key_ptr, always_ptr, g, bb, B, K, D, NCAND, C: tl.constexpr,
                       GROUP: tl.constexpr, BEST: tl.constexpr, DOT_FP32: tl.constexpr,
                       EVEN_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_D: tl.constexpr, A: tl.constexpr, A_BLOCK: tl.constexpr):
    """The work of one `_score_union_kernel` program (see there): union clusters
    g * GROUP .. g * GROUP + GROUP - 1 against row block bb."""
    # Per cluster first ([GROUP]), then per lane ([GROUP, BLOCK_C] flattened, GROUP clusters
    # side by side): gathering union and offsets straight per lane (slot = lane // BLOCK_C)
    # fails to compile for GROUP > 1 with triton 3.6 (TritonGPURemoveLayoutConversions).
    jg = g * GROUP + tl.arange(0, GROUP)                # union slots of the program
    live_g = jg < n_union
    c_g = tl.load(union_ptr + jg, mask=live_g, other=0).to(tl.int64)
    start_g = tl.load(offsets_ptr + c_g, mask=live_g, other=0)
    length_g = tl.load(offsets_ptr + c_g + 1, mask=live_g, other=0) - start_g
    i2 = tl.broadcast_to(tl.arange(0, BLOCK_C)[None, :], (GROUP, BLOCK_C))
    valid2 = live_g[:, None] & (i2 < length_g[:, None]) & (i2 < C)
    rows2 = tl.where(valid2, start_g[:, None] + i2, 0)
    i = tl.reshape(i2, (GROUP * BLOCK_C,))                # row inside its cluster
    valid = tl.reshape(valid2, (GROUP * BLOCK_C,))
    rows = tl.reshape(rows2, (GROUP * BLOCK_C,))          # [GROUP * BLOCK_C] int64
    c = tl.reshape(tl.broadcast_to(c_g[:, None], (GROUP, BLOCK_C)), (GROUP * BLOCK_C,))
    live = tl.reshape(tl.broadcast_to(live_g[:, None], (GROUP, BLOCK_C)), (GROUP * BLOCK_C,))
    b = bb * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < B
    acc = _rows_dot(h_ptr, w_ptr, rows, valid, b, b_ok, D, DOT_FP32, EVEN_D, BLOCK_B,
                    GROUP * BLOCK_C, BLOCK_D)                          # [BLOCK_B, GROUP * BLOCK_C]
    if A > 0:
        # An always row is scored by `_score_always_block`; here its slot becomes padding.
        for a0 in tl.static_range(0, A, A_BLOCK):
            aj = a0 + tl.arange(0, A_BLOCK)
            ar = tl.load(always_ptr + aj, mask=aj < A, other=-1)         # [A_BLOCK] rows
            hit = tl.sum((rows[:, None] == ar[None, :]).to(tl.int32), axis=1)
            valid = valid & (hit == 0)
        rows = tl.where(valid, rows, 0)
    score = tl.where(valid[None, :], acc, float("-inf"))
    ordered = _order_key32(score)
    tid = tl.load(token_ids_ptr + rows)                                 # [GROUP * BLOCK_C]
    key = (ordered.to(tl.int64) << 32) | (2147483647 - tid)[None, :]
    p = tl.load(pos_ptr + b[:, None].to(tl.int64) * K + c[None, :],
                mask=b_ok[:, None] & live[None, :], other=-1)   # [BLOCK_B, GROUP * BLOCK_C]
    out_mask = (p >= 0) & (i < C)[None, :]
    if BEST:
        row_best = tl.max(tl.where(out_mask, key, _KEY_MIN), axis=1)        # [BLOCK_B]
        tl.atomic_max(key_ptr + b, row_best, mask=b_ok & (row_best > _KEY_MIN), sem="relaxed")
    else:
        out = b[:, None].to(tl.int64) * NCAND + p * C + i[None, :]
        tl.store(key_ptr + out, key, mask=out_mask)


@triton.jit
def _score_always_block(h_ptr, w_ptr, token_ids_ptr, always_ptr, key_ptr, g, bb, B, D, V, NCAND,
                        A: tl.constexpr, A_BLOCK: tl.constexpr, BEST: tl.constexpr,
                        DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Always rows a = g * BLOCK_N .. g * BLOCK_N + BLOCK_N - 1 (of always [A] int64) against
    row block bb, for every row: key[b, NCAND - A + a] (the same key as `_score_union_block`'s),
    or with BEST the row maxima.  The rows are distinct (the op checks the ids on the host: a
    duplicate test in the kernel, a reduction over [A, A], made triton 3.6's layout pass fail
    for 32- and 64-row tiles); rows outside [0, V) (never passed by the checked op) are padding
    (-inf, token_ids[0])."""
    a = g * BLOCK_N + tl.arange(0, BLOCK_N)                              # [BLOCK_N] slots
    live = a < A
    rows = tl.load(always_ptr + a, mask=live, other=0)                  # [BLOCK_N] int64
    valid = live & (rows >= 0) & (rows < V)
    rows = tl.where(valid, rows, 0)
    b = bb * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < B
    acc = _rows_dot(h_ptr, w_ptr, rows, valid, b, b_ok, D, DOT_FP32, EVEN_D, BLOCK_B, BLOCK_N,
                    BLOCK_D)                                           # [BLOCK_B, BLOCK_N]
    score = tl.where(valid[None, :], acc, float("-inf"))
    tid = tl.load(token_ids_ptr + rows)                                 # [BLOCK_N]
    key = (_order_key32(score).to(tl.int64) << 32) | (2147483647 - tid)[None, :]
    if BEST:
        row_best = tl.max(tl.where(valid[None, :], key, _KEY_MIN), axis=1)  # [BLOCK_B]
        tl.atomic_max(key_ptr + b, row_best, mask=b_ok & (row_best > _KEY_MIN), sem="relaxed")
    else:
        out = b[:, None].to(tl.int64) * NCAND + (NCAND - A) + a[None, :]
        tl.store(key_ptr + out, key, mask=b_ok[:, None] & live[None, :])


@triton.jit
def _decode_key(key):
    """(vocab id int64, logit fp32) of a candidate key made by `_score_union_kernel`."""
    hi = key >> 32
    ordered = hi.to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return 2147483647 - (key - (hi << 32)), bits.to(tl.float32, bitcast=True)


@triton.jit
def _decode_keys_kernel(key_ptr, ids_ptr, logit_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """ids, logits [N] = the decoded keys [N] int64 (torch.topk's k best per row)."""
    pdl_entry(PDL, False)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    vid, logit = _decode_key(tl.load(key_ptr + i, mask=ok, other=0))
    tl.store(ids_ptr + i, vid, mask=ok)
    tl.store(logit_ptr + i, logit, mask=ok)


class _Blocks(NamedTuple):
    block_b: int    # rows of h per program (>= 16: tl.dot's smallest tile)
    block_k: int    # centroids per stage-1 program
    block_c: int    # rows per cluster in stage 2 (>= C and >= 16)
    group: int      # union clusters per stage-2 program
    block_d: int    # hidden-size chunk per loop step
    dot_fp32: bool  # fp32 products (tl.dot in IEEE mode) instead of 16-bit tensor-core inputs
    num_warps: int  # of the centroid and union kernels


def _blocks(D: int, C: int, h_dtype: torch.dtype, w_dtype: torch.dtype, B: int) -> _Blocks:
    """Tile sizes.  Rows of h per program: 16, 32 or 64, the smallest that holds B (more rows:
    the union kernel loops over row blocks); union clusters per program: as many as make the
    weight rows as many as the rows of h, so that a program reads no more of h than of the
    weight (at B=64 with 16-row tiles, every cluster re-read all of h, 4x its own bytes, from
    L2).  So a compiled graph specializes on B <= 16, B <= 32 and B == 1 (the take kernel).
    4 warps and 128-wide D chunks (64 for fp32 products) spill no registers in the sm_90 builds
    of 16- and 32-row tiles, nor 8 warps and 64-wide chunks at 64 rows (triton 3.6 and 3.9,
    ptxas -v; 4 warps spill 0.1-1 KB there); a sweep of D chunks, warps and stages of the 16-row
    tiles on an H200 found none more than ~1.5 us faster.
    """
    dot_fp32 = not (h_dtype == w_dtype and h_dtype in (torch.bfloat16, torch.float16))
    block_b = 16 if B <= 16 else 32 if B <= 32 else 64
    # Small centroid blocks so every SM streams (K=9496 -> 297 programs).
    block_k = 32
    block_c = max(16, triton.next_power_of_2(C))
    group = max(1, block_b // block_c)
    wide = block_b == 64
    block_d = min(64 if dot_fp32 or wide else 128, max(16, triton.next_power_of_2(D)))
    return _Blocks(block_b, block_k, block_c, group, block_d, dot_fp32, 8 if wide else 4)


def triton_topk(h: torch.Tensor, centroids: torch.Tensor, weight: torch.Tensor,
                offsets: torch.Tensor, token_ids: torch.Tensor, probes: int, cluster_size: int,
                k: int, centroid_noise: Optional[torch.Tensor] = None,
                always_rows: Optional[torch.Tensor] = None, *, select: str = "auto",
                pdl: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashHead top-k with Triton kernels: ids [B, k] int64 and logits [B, k] fp32, best first.

    Same contract as custom_ops.reference.flashhead_reference (inputs already checked by
    custom_ops.flashhead.check_inputs): h [B, D]; centroids [K, D]; weight [V, D] reordered;
    offsets [K + 1] int64; token_ids [V] int64; centroid_noise [B, K] or None; always_rows [A]
    int64 rows of `weight` scored for every row whatever the probes (the op's always ids,
    already turned into rows), or None.  Equal logits come smallest vocabulary id first.  Output shapes depend only on B, k: no host sync.
    select: how the P clusters per row are picked: "multi" (the default, "auto": a radix select
    spread over many programs, `_select_refine_kernel` and `_select_take_kernel`), "single"
    (`_select_top_kernel`, one program per row, K <= 16384) or "torch" (torch.topk);
    benchmarks.head_latency compares them.
    pdl: chain the launches after the first with programmatic dependent launch where
    `_pdl_usable` (Hopper+, eager): each kernel launches while the one before it still runs and
    waits for it on the GPU, so launch latency hides behind work.  The outputs are the same
    either way; benchmarks.head_latency measures both ("triton_nopdl").
    """
    if select not in ("auto", "multi", "single", "torch"):
        raise ValueError(f"select must be 'auto', 'multi', 'single' or 'torch', got {select!r}")
    if select == "single" and triton.next_power_of_2(centroids.shape[0]) > _MAX_SELECT_K:
        raise ValueError(f"select='single' holds at most {_MAX_SELECT_K} clusters per row, "
                         f"got K={centroids.shape[0]}; use select='multi'")
    B, D = h.shape
    K = centroids.shape[0]
    P, C = probes, cluster_size
    dev = h.device
    if B == 0:
        return (torch.empty((0, k), dtype=torch.int64, device=dev),
                torch.empty((0, k), dtype=torch.float32, device=dev))
    blk = _blocks(D, C, h.dtype, weight.dtype, B)
    even_d = D % blk.block_d == 0
    nb = triton.cdiv(B, blk.block_b)
    pdl = pdl and _pdl_usable(h)

    multi = select in ("auto", "multi")
    scores = _empty((B, K), torch.float32, dev)                         # S: [B, K] fp32
    flag = _empty((K,), torch.int32, dev)             # flag: [K] int32, zeroed by stage 1
    # ws: the multi-program selection's digit histograms [B, 3, 2048] and counters [B + 1]
    # (picks per row, union length), int32, one memset.
    n_hist = B * _WS_ROW.value                   # ints of histograms; counters follow
    ws = torch.zeros((n_hist + B + 1,) if multi else (1,), dtype=torch.int32, device=dev)
    # Without noise the kernel never reads noise_ptr; h stands in (not `scores`: one tensor as
    # both a read and a written argument would look aliased to Inductor).
    noise = centroid_noise.contiguous() if centroid_noise is not None else h
    A = 0 if always_rows is None else int(always_rows.shape[0])
    # keys: k = 1: [B + 1] int64, the row maxima and a program counter (set up by stage 1,
    # decoded by the last stage-2 program); else every candidate's key [B, P * C + A].
    keys = _empty((B + 1,) if k == 1 else (B, P * C + A), torch.int64, dev)
    _launch(_centroid_scores_kernel, (triton.cdiv(K, blk.block_k) * nb,))(
        h, centroids, noise, scores, flag, ws, keys, B, K, D,
        HAS_NOISE=centroid_noise is not None, HIST=multi, INIT_BEST=k == 1,
        DOT_FP32=blk.dot_fp32, EVEN_D=even_d, BLOCK_K=blk.block_k, BLOCK_B=blk.block_b,
        BLOCK_D=blk.block_d, PDL=pdl, num_warps=blk.num_warps)
    U = torch.sym_min(B * P, K)                  # no guard on B when B is symbolic
    union = _empty((U,), torch.int32, dev)                              # union: [U] int32
    if select == "torch":       # torch.topk picks; `_mark_selected_kernel` fills pos below
        sel = torch.topk(scores, P, dim=1, sorted=False).indices
        pos = torch.full((B, K), -1, dtype=torch.int32, device=dev)
    else:                       # written by the Triton selection
        sel = _empty((B, P), torch.int64, dev)                          # sel: [B, P] int64
        pos = _empty((B, K), torch.int32, dev)                          # pos: [B, K] int32
    if multi:
        grid = (triton.cdiv(K, _SELECT_CHUNK), B)
        for digit in (2, 3):
            _launch(_select_refine_kernel, grid, pdl)(scores, ws, K, P, DIGIT=digit,
                                                      CHUNK=_SELECT_CHUNK, PDL=pdl)
        _launch(_select_take_kernel, grid, pdl)(scores, ws, flag, union, sel, pos, B, K, P,
                                                ONE_ROW=B == 1, CHUNK=_SELECT_CHUNK, PDL=pdl)
        n_union = ws[n_hist + B:]                                        # [1] int32
    else:
        if select == "single":
            _launch(_select_top_kernel, (B,))(scores, sel, pos, flag, K, P,
                                              BLOCK_K=triton.next_power_of_2(K))
        else:
            _launch(_mark_selected_kernel, (triton.cdiv(B * P, 1024),))(
                sel, pos, flag, B, K, P, BLOCK=1024)
        n_union = _empty((1,), torch.int32, dev)                        # n_union: [1] int32
        _launch(_compact_union_kernel, (1,))(flag, union, n_union, K, BLOCK=4096, num_warps=8)

    ids = torch.empty((B, k), dtype=torch.int64, device=dev)             # ids: [B, k] int64
    logits = torch.empty((B, k), dtype=torch.float32, device=dev)       # logits: [B, k] fp32
    # The always rows: the first programs of the union kernel (A = 0: the kernel as without).
    a_programs = triton.cdiv(A, blk.group * blk.block_c)
    _launch(_score_union_kernel, (triton.cdiv(U, blk.group) + a_programs,), pdl)(
        h, weight, offsets, token_ids, pos, union, n_union, keys, ids, logits,
        always_rows if A else offsets, B, K, D, weight.shape[0], P * C + A,
        C=C, GROUP=blk.group, BEST=k == 1, DOT_FP32=blk.dot_fp32, EVEN_D=even_d,
        BLOCK_B=blk.block_b, BLOCK_C=blk.block_c, BLOCK_D=blk.block_d, PDL=pdl,
        A=A, A_BLOCK=min(32, triton.next_power_of_2(max(A, 1))), A_PROGRAMS=a_programs,
        num_warps=blk.num_warps)
    if k > 1:
        best = torch.topk(keys, k, dim=1).values                       # [B, k], best first
        _launch(_decode_keys_kernel, (triton.cdiv(B * k, 1024),), pdl)(
            best, ids, logits, B * k, BLOCK=1024, PDL=pdl)
    return ids, logits
