"""The per-row bodies of the fused GEMV kernel (custom_ops/fused_linear_triton.py): the prologues
(residual add + RMSNorm, activation-mul) and the loops over K that multiply a block of weight
rows by one block of batch rows.  Device functions only, inlined into `_fused_gemv_kernel`.

Dimensions: B rows of the batch, N output features, K input features; BLOCK_B / BLOCK_N /
BLOCK_K the kernel's tile.
"""

import triton
import triton.language as tl


@triton.jit
def _residual_chunk(x_ptr, res_ptr, bn_ptr, rows, k, mask, K, inv_x, norm_offset,
                    HAS_RES: tl.constexpr, HAS_BN: tl.constexpr):
    """r [BLOCK_B, BLOCK_K] fp32 holding values of x's dtype, columns k of the given rows:
    b = x, or round(x * inv_x * (norm_offset + branch_norm)); r = round(b + residual) or b."""
    off = rows[:, None].to(tl.int64) * K + k[None, :]
    xv = tl.load(x_ptr + off, mask=mask, other=0.0)
    r = xv.to(tl.float32)
    if HAS_BN:
        bn = tl.load(bn_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        r = (r * inv_x[:, None] * (norm_offset + bn[None, :])).to(xv.dtype).to(tl.float32)
    if HAS_RES:
        res = tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
        r = (r + res).to(xv.dtype).to(tl.float32)
    return r


@triton.jit
def _inv_rms(x_ptr, res_ptr, bn_ptr, rout_ptr, rows, row_ok, K, eps, inv_x, norm_offset,
             write_rows, OF_R: tl.constexpr, HAS_RES: tl.constexpr, HAS_BN: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_B] fp32 1 / sqrt(mean(v^2) + eps) per row, v = x (OF_R False) or r (OF_R True,
    see `_residual_chunk`).  With OF_R, also store r into residual_out for rows < write_rows
    (B in program 0, 0 elsewhere: an int bound, as the interpreter mis-types a bool scalar
    and-ed into a mask)."""
    ss = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (k < K)[None, :]
        if OF_R:
            v = _residual_chunk(x_ptr, res_ptr, bn_ptr, rows, k, mask, K, inv_x, norm_offset,
                                HAS_RES, HAS_BN)
            off = rows[:, None].to(tl.int64) * K + k[None, :]
            tl.store(rout_ptr + off, v.to(rout_ptr.dtype.element_ty),
                     mask=mask & (rows < write_rows)[:, None])
        else:
            v = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + k[None, :], mask=mask,
                        other=0.0).to(tl.float32)
        ss += v * v
    return 1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps)


@triton.jit
def _x_chunk(x_ptr, res_ptr, bn_ptr, norm_ptr, rows, row_ok, k, K, inv_x, inv_r, norm_offset,
             PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, HAS_BN: tl.constexpr,
             EVEN_K: tl.constexpr):
    """The GEMV's input, columns k of the given rows, in x's dtype: [BLOCK_B, BLOCK_K]."""
    if EVEN_K:
        mask = row_ok[:, None]
        k_ok = k >= 0
    else:
        k_ok = k < K
        mask = row_ok[:, None] & k_ok[None, :]
    if PROLOGUE == 3:       # RMS_NORM
        r = _residual_chunk(x_ptr, res_ptr, bn_ptr, rows, k, mask, K, inv_x, norm_offset,
                            HAS_RES, HAS_BN)
        nw = tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        y = r * inv_r[:, None] * (norm_offset + nw[None, :])
        xk = y.to(x_ptr.dtype.element_ty)
    elif PROLOGUE == 0:     # NONE
        xk = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + k[None, :], mask=mask, other=0.0)
    else:                   # gate | up, x [B, 2K]
        off = rows[:, None].to(tl.int64) * (2 * K) + k[None, :]
        g = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + off + K, mask=mask, other=0.0).to(tl.float32)
        if PROLOGUE == 1:   # SILU_MUL: g * sigmoid(g)
            a = g / (1.0 + tl.exp(-g))
        else:               # GELU_TANH_MUL: 0.5 g (1 + tanh(z)) = g * sigmoid(2 z)
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = g / (1.0 + tl.exp(-2.0 * z))
        xk = (a * u).to(x_ptr.dtype.element_ty)
    return xk


@triton.jit
def _gemv_rows(x_ptr, res_ptr, bn_ptr, norm_ptr, rout_ptr, w_rows, n_ok, rows, row_ok, pid, s, B,
               K, k_lo, k_hi, eps, norm_offset, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr,
               HAS_BN: tl.constexpr, EVEN_K: tl.constexpr, DOT_IEEE: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PREFETCH: tl.constexpr):
    """y [BLOCK_B, BLOCK_N] fp32: the given rows' prologue(x) over K columns [k_lo, k_hi) times
    the weight rows w_rows (no bias); RMS_NORM first sums squares over all of K (and writes
    residual_out from program (0, 0))."""
    if PREFETCH:                 # the first tile of the K range, in flight during the norm
        w_next = _w_tile(w_rows, n_ok, k_lo + tl.arange(0, BLOCK_K), k_hi)
    inv_x = tl.zeros((BLOCK_B,), dtype=tl.float32)
    inv_r = tl.zeros((BLOCK_B,), dtype=tl.float32)
    if PROLOGUE == 3:
        if HAS_BN:
            inv_x = _inv_rms(x_ptr, res_ptr, bn_ptr, rout_ptr, rows, row_ok, K, eps, inv_x,
                             norm_offset, 0, False, HAS_RES, HAS_BN, BLOCK_B, BLOCK_K)
        write_rows = tl.where((pid == 0) & (s == 0), B, 0)  # one program writes residual_out
        inv_r = _inv_rms(x_ptr, res_ptr, bn_ptr, rout_ptr, rows, row_ok, K, eps, inv_x,
                         norm_offset, write_rows, True, HAS_RES, HAS_BN, BLOCK_B, BLOCK_K)
    if BLOCK_B == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        if PREFETCH:
            w = w_next
            w_next = _w_tile(w_rows, n_ok, k + BLOCK_K, k_hi)      # empty past k_hi
        xk = _x_chunk(x_ptr, res_ptr, bn_ptr, norm_ptr, rows, row_ok, k, K, inv_x, inv_r,
                      norm_offset, PROLOGUE, HAS_RES, HAS_BN, EVEN_K)   # [BLOCK_B, BLOCK_K]
        if not PREFETCH:
            if EVEN_K:
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0)
            else:
                w = _w_tile(w_rows, n_ok, k, K)                     # [BLOCK_N, BLOCK_K]
        if BLOCK_B == 1:
            acc += w.to(tl.float32) * xk.to(tl.float32)
        elif DOT_IEEE:
            acc = tl.dot(xk, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(xk, tl.trans(w), acc)
    if BLOCK_B == 1:
        y = tl.sum(acc, axis=1)[None, :]                                # [1, BLOCK_N]
    else:
        y = acc                                                         # [BLOCK_B, BLOCK_N]
    return y


@triton.jit
def _rms_norm_row(x_ptr, res_ptr, bn_ptr, norm_ptr, rout_ptr, w_rows, n_ok, rows, row_ok, K, eps,
                  norm_offset, write_rows, HAS_RES: tl.constexpr, HAS_BN: tl.constexpr,
                  EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PREFETCH: tl.constexpr):
    """ONE_PASS: the RMS_NORM GEMV of one row (rows [1]) in a single pass over K, y [1, BLOCK_N]
    fp32 (no bias).  The norms' scales are scalars of the row, so they are applied after the
    sums: y = inv_r * sum_k w[n, k] r[k] g[k] (g = norm_offset + norm), with inv_r from the same
    pass's sum of r^2.  With a branch norm (r = x inv_x bn' + res, bn' = norm_offset +
    branch_norm), y = inv_r (inv_x sum w (x bn') g + sum w res g) and sum r^2 = inv_x^2 sum
    (x bn')^2 + 2 inv_x sum (x bn') res + sum res^2.  So weight loads start at once instead of
    after one or two passes over x (a chain of L2 round trips per program), and the input is
    not rounded to x's dtype before the product (the reference rounds b, r and y; r is rounded
    here only without a branch norm, where it needs no scale).  residual_out: rows < write_rows
    (all in program 0, none elsewhere); with a branch norm, by a second pass once inv_x is
    known."""
    # Inductor passes Python floats to user kernels as fp64 scalars: keep the math fp32.
    eps = tl.cast(eps, tl.float32)
    norm_offset = tl.cast(norm_offset, tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)      # sum w * (x bn' or r) * g
    acc_res = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # sum w * res * g (branch norm)
    s_xx = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    s_aa = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    s_ab = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    s_bb = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    unit = tl.full((1,), 1.0, tl.float32)                     # r's scale without a branch norm
    if PREFETCH:
        w_next = _w_tile(w_rows, n_ok, tl.arange(0, BLOCK_K), K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        if PREFETCH:
            w = w_next
            w_next = _w_tile(w_rows, n_ok, k + BLOCK_K, K)           # empty past K
        elif EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0)
        else:
            w = _w_tile(w_rows, n_ok, k, K)                          # [BLOCK_N, BLOCK_K]
        k_ok = k < K
        mask = row_ok[:, None] & k_ok[None, :]
        off = rows[:, None].to(tl.int64) * K + k[None, :]
        g = norm_offset + tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        wf = w.to(tl.float32)
        if HAS_BN:
            xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            a = xv * (norm_offset + tl.load(bn_ptr + k, mask=k_ok, other=0.0).to(tl.float32))
            s_xx += xv * xv
            s_aa += a * a
            acc += wf * (a * g)
            if HAS_RES:
                res = tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
                s_ab += a * res
                s_bb += res * res
                acc_res += wf * (res * g)
        else:
            r = _residual_chunk(x_ptr, res_ptr, bn_ptr, rows, k, mask, K, unit, norm_offset,
                                HAS_RES, False)                      # [1, BLOCK_K], rounded
            tl.store(rout_ptr + off, r.to(rout_ptr.dtype.element_ty),
                     mask=mask & (rows < write_rows)[:, None])
            s_aa += r * r
            acc += wf * (r * g)
    if HAS_BN:
        inv_x = 1.0 / tl.sqrt(tl.sum(s_xx, axis=1) / K + eps)                     # [1]
        ss = inv_x * inv_x * tl.sum(s_aa, axis=1)
        if HAS_RES:
            ss += 2.0 * inv_x * tl.sum(s_ab, axis=1) + tl.sum(s_bb, axis=1)
        inv_r = 1.0 / tl.sqrt(tl.maximum(ss, 0.0) / K + eps)
        y = inv_r * (inv_x * tl.sum(acc, axis=1) + tl.sum(acc_res, axis=1))       # [BLOCK_N]
        if write_rows > 0:                   # residual_out, now that inv_x is known
            _inv_rms(x_ptr, res_ptr, bn_ptr, rout_ptr, rows, row_ok, K, eps, inv_x, norm_offset,
                     write_rows, True, HAS_RES, True, 1, BLOCK_K)    # (its norm is not needed)
    else:
        y = tl.sum(acc, axis=1) / tl.sqrt(tl.sum(s_aa, axis=1) / K + eps)
    return y[None, :]                                                              # [1, BLOCK_N]


@triton.jit
def _w_tile(w_rows, n_ok, k, k_hi):
    """Weight tile [BLOCK_N, BLOCK_K] of columns k (zeros at and past k_hi)."""
    return tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < k_hi)[None, :], other=0.0)
