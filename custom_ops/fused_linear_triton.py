"""Triton GEMV kernels of the fused decode linears: `rms_norm_linear` and `act_linear` on CUDA.

Dimensions: B rows of the batch (1..64 at decode), N output features, K input features.

At decode time every linear is a matrix-vector product bound by reading the weight once, so one
kernel (`_fused_gemv_kernel`) does both ops: each program owns BLOCK_N output features, streams
their weight rows once (coalesced along K), and recomputes the op's cheap prologue (residual add
+ RMSNorm, or the activation-mul) from x, which is B * K elements and stays in L1/L2.  Rows of x
go BLOCK_B at a time: BLOCK_B = 1 multiplies and sums elementwise (no tl.dot, B = 1); BLOCK_B in
{16, 32, 64} runs tl.dot on the batch padded to BLOCK_B rows, so the weight is read from HBM once
for up to 64 rows (later row blocks of B > 64 re-read it, mostly from L2).

Configs come from `GEMV_CONFIGS` (keyed by N, K and a batch bucket; benchmarks/gemv_sweep.py
prints a new table from a GPU sweep) and otherwise from `default_config`; no autotuning, so the
launch is the same in eager mode, under torch.compile and inside a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# Prologue of `_fused_gemv_kernel` (constexpr PROLOGUE).
NONE, SILU_MUL, GELU_TANH_MUL, RMS_NORM = 0, 1, 2, 3
ACT_PROLOGUES = {"none": NONE, "silu_mul": SILU_MUL, "gelu_tanh_mul": GELU_TANH_MUL}

# Measured best configs: (N, K, batch bucket) -> (block_b, block_n, block_k, num_warps,
# num_stages); block_k counts 16-bit elements (fp32 weights use half as many, the same bytes).
# Buckets: "b1" (B = 1), "b16" (B <= 16), "b32" (B <= 32), "b64" (B > 32; B > 64 loops over
# 64-row blocks).  Paste the dict that `python -m benchmarks.gemv_sweep` prints last.
GEMV_CONFIGS: dict[tuple[int, int, str], tuple[int, int, int, int, int]] = {}

_SMS = 132          # programs per wave on an H100/H200; the default config aims for >= 2 waves


@dataclass(frozen=True)
class GemvConfig:
    """Launch config of `_fused_gemv_kernel`.

    block_b: rows of x per tile, 1 (elementwise FMA) or 16/32/64 (tl.dot); block_n: output
    features per program (>= 8 for tl.dot: 16 x 8 x 16 mma tiles; smaller is padded);
    block_k: K chunk per loop step (elements of the weight's dtype); num_warps, num_stages:
    Triton's launch options (num_stages pipelines only the tl.dot loop: the FMA loop's sm_90
    code is the same for every num_stages, triton 3.9)."""
    block_b: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {v}")
        if self.block_b not in (1, 16, 32, 64):
            raise ValueError(f"GemvConfig.block_b must be 1, 16, 32 or 64, got {self.block_b}")
        if self.block_b > 1 and (self.block_n < 8 or self.block_k < 16):
            raise ValueError(f"tl.dot tiles (block_b > 1) need block_n >= 8 and block_k >= 16 "
                             f"(the mma tile is 16 x 8 x 16), got block_n={self.block_n}, "
                             f"block_k={self.block_k}")
        if self.num_stages < 1:
            raise ValueError(f"GemvConfig.num_stages must be >= 1, got {self.num_stages}")


def batch_bucket(B: int) -> str:
    """The GEMV_CONFIGS bucket of a batch of B rows."""
    return "b1" if B <= 1 else "b16" if B <= 16 else "b32" if B <= 32 else "b64"


def default_config(N: int, K: int, B: int) -> GemvConfig:
    """Config for shapes the table lacks: the widest block of output features that still gives
    >= 2 waves of programs (narrow N: narrow blocks, so every SM streams); at B = 1 steps of
    8 KB of weight (16-bit), which keeps the fp32 accumulator at 32 registers a thread."""
    if B <= 1:
        block_n = next((bn for bn in (16, 8, 4, 2) if triton.cdiv(N, bn) >= 2 * _SMS), 1)
        return GemvConfig(1, block_n, min(2048, 4096 // block_n), num_warps=4, num_stages=1)
    block_b = 16 if B <= 16 else 32 if B <= 32 else 64
    block_n = next((bn for bn in (32, 16) if triton.cdiv(N, bn) >= 2 * _SMS), 8)
    return GemvConfig(block_b, block_n, 256 if block_b < 64 else 128, num_warps=4, num_stages=3)


def fit_config(cfg: GemvConfig, K: int, dtype: torch.dtype) -> GemvConfig:
    """cfg with block_k in elements of dtype (table block_k counts 16-bit ones), <= K's
    next power of two."""
    block_k = cfg.block_k // 2 if dtype == torch.float32 else cfg.block_k
    block_k = max(16, min(block_k, triton.next_power_of_2(K)))
    return GemvConfig(cfg.block_b, cfg.block_n, block_k, cfg.num_warps, cfg.num_stages)


def pick_config(N: int, K: int, B: int, dtype: torch.dtype) -> GemvConfig:
    """The GEMV_CONFIGS entry of (N, K, B's bucket), else `default_config`, fitted to K."""
    entry = GEMV_CONFIGS.get((N, K, batch_bucket(B)))
    return fit_config(GemvConfig(*entry) if entry is not None else default_config(N, K, B), K,
                      dtype)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output that a kernel must fully write comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(kernel: Any, grid: tuple[int, ...]) -> Any:
    """wrap_triton so Inductor sees the kernel; under TRITON_INTERPRET=1 the kernel is an
    InterpretedFunction, which older torch versions refuse to wrap, so launch it directly."""
    if isinstance(kernel, JITFunction):
        return torch.library.wrap_triton(kernel)[grid]
    return kernel[grid]


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
def _fused_gemv_kernel(x_ptr, res_ptr, bn_ptr, norm_ptr, w_ptr, bias_ptr, out_ptr, rout_ptr,
                       B, N, K, eps, norm_offset, PROLOGUE: tl.constexpr,
                       HAS_RES: tl.constexpr, HAS_BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                       EVEN_K: tl.constexpr, DOT_IEEE: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [B, N] = prologue(x) [B, K] @ weight[N, K]^T (+ bias [N]), fp32 accumulation.

    Inputs: x [B, K] ([B, 2K] = [gate | up] for the act-mul prologues), weight [N, K] and out in
    one dtype (bf16/fp16/fp32); bias [N] that dtype (HAS_BIAS); RMS_NORM also reads residual
    [B, K] (HAS_RES), branch_norm [K] (HAS_BN) and norm [K] (any float dtype) and writes
    residual_out [B, K] (program 0 only); pointers of absent tensors are never read.
    Prologues (fp32 math, rounded to x's dtype where the reference rounds):
      RMS_NORM: b = x or round(rms(x) * (norm_offset + branch_norm)); r = round(b + residual) or
        b -> residual_out; input = round(rms(r) * (norm_offset + norm)), rms(v) = v / sqrt(mean
        (v^2) + eps).  Each program first sums r^2 over K per row (and x^2 before it with
        HAS_BN), then normalizes each chunk in the main loop.
      SILU_MUL / GELU_TANH_MUL: input = round(act(gate) * up); NONE: input = x.
    Every element of out (and residual_out) is written; rows are independent (no ties).
    Grid (cdiv(N, BLOCK_N),).  DOT_IEEE: fp32 products in tl.dot (fp32 weights), not TF32.
    Cost: N * K * elt bytes of weight read once from HBM for B <= BLOCK_B (the floor: 55 MB
    for the 1.5B model's gate/up, 12.8 us at 4.3 TB/s), plus per program B * K * elt of x (1-3
    passes, from L1/L2), and elt * B * N (+ B * K) written.  Speed per shape and config:
    benchmarks/gemv_sweep.py (not measured yet when this was written: no GPU at hand).
    """
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K                       # [BLOCK_N, 1]
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        inv_x = tl.zeros((BLOCK_B,), dtype=tl.float32)
        inv_r = tl.zeros((BLOCK_B,), dtype=tl.float32)
        if PROLOGUE == 3:
            if HAS_BN:
                inv_x = _inv_rms(x_ptr, res_ptr, bn_ptr, rout_ptr, rows, row_ok, K, eps, inv_x,
                                 norm_offset, 0, False, HAS_RES, HAS_BN, BLOCK_B, BLOCK_K)
            write_rows = tl.where(pid == 0, B, 0)           # program 0 writes residual_out
            inv_r = _inv_rms(x_ptr, res_ptr, bn_ptr, rout_ptr, rows, row_ok, K, eps, inv_x,
                             norm_offset, write_rows, True, HAS_RES, HAS_BN, BLOCK_B, BLOCK_K)
        if BLOCK_B == 1:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xk = _x_chunk(x_ptr, res_ptr, bn_ptr, norm_ptr, rows, row_ok, k, K, inv_x, inv_r,
                          norm_offset, PROLOGUE, HAS_RES, HAS_BN, EVEN_K)   # [BLOCK_B, BLOCK_K]
            if EVEN_K:
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0)
            else:
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :],
                            other=0.0)                                  # [BLOCK_N, BLOCK_K]
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
        if HAS_BIAS:
            y += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = rows[:, None].to(tl.int64) * N + n[None, :]
        tl.store(out_ptr + out, y.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, prologue: int, *,
               residual: Optional[torch.Tensor] = None,
               branch_norm: Optional[torch.Tensor] = None, norm: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 0.0, norm_offset: float = 0.0,
               config: Optional[GemvConfig] = None
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch `_fused_gemv_kernel`: (out [B, N], residual_out [B, K] for RMS_NORM else None).

    Inputs already checked (custom_ops.fused_linear): weight [N, K] contiguous; x [B, K]
    ([B, 2K] for the act-mul prologues) contiguous, weight's dtype.  config: None picks one
    from GEMV_CONFIGS / `default_config`; benchmarks pass their own.  No host sync.
    """
    N, K = weight.shape
    B = x.shape[0]
    dev, dt = x.device, x.dtype
    out = _empty((B, N), dt, dev)                                       # out: [B, N]
    rout = _empty((B, K), dt, dev) if prologue == RMS_NORM else None    # residual_out: [B, K]
    if B == 0:
        return out, rout
    cfg = config if config is not None else pick_config(N, K, B, dt)
    # Absent tensors: the kernel never touches their pointers; read-only stand-ins are x and
    # the written one is out (a tensor both read and written would look aliased to Inductor).
    _launch(_fused_gemv_kernel, (triton.cdiv(N, cfg.block_n),))(
        x, residual if residual is not None else x, branch_norm if branch_norm is not None else x,
        norm if norm is not None else x, weight, bias if bias is not None else x, out,
        rout if rout is not None else out, B, N, K, eps, norm_offset, PROLOGUE=prologue,
        HAS_RES=residual is not None, HAS_BN=branch_norm is not None,
        HAS_BIAS=bias is not None, EVEN_K=K % cfg.block_k == 0, DOT_IEEE=dt == torch.float32,
        BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, rout


def rms_norm_linear_triton(x: torch.Tensor, residual: Optional[torch.Tensor],
                           branch_norm: Optional[torch.Tensor], norm: torch.Tensor,
                           weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                           norm_offset: float, config: Optional[GemvConfig] = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """custom_ops.fused_linear.rms_norm_linear_reference's contract with the Triton kernel."""
    out, rout = fused_gemv(x, weight, RMS_NORM, residual=residual, branch_norm=branch_norm,
                           norm=norm, bias=bias, eps=eps, norm_offset=norm_offset,
                           config=config)
    assert rout is not None
    return out, rout


def act_linear_triton(x: torch.Tensor, weight: torch.Tensor, act: str,
                      config: Optional[GemvConfig] = None) -> torch.Tensor:
    """custom_ops.fused_linear.act_linear_reference's contract with the Triton kernel."""
    return fused_gemv(x, weight, ACT_PROLOGUES[act], config=config)[0]
