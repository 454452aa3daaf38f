"""Triton GEMV kernels of the fused decode linears: `rms_norm_linear` and `act_linear` on CUDA.

Dimensions: B rows of the batch (1..64 at decode), N output features, K input features, S splits.

At decode time every linear is a matrix-vector product bound by reading the weight once, so one
kernel (`_fused_gemv_kernel`) does both ops: each program owns BLOCK_N output features, streams
their weight rows once (coalesced along K), and recomputes the op's cheap prologue (residual add
+ RMSNorm, or the activation-mul) from x, which is B * K elements and stays in L1/L2.  Rows of x
go BLOCK_B at a time: BLOCK_B = 1 multiplies and sums elementwise (no tl.dot, B = 1); BLOCK_B in
{16, 32, 64} runs tl.dot on the batch padded to BLOCK_B rows, so the weight is read from HBM once
for up to 64 rows (later row blocks of B > 64 re-read it, mostly from L2).

Split-K (S > 1, grid (N blocks, S)): program (j, s) reduces one contiguous chunk of K (whole
BLOCK_K steps) for every row, reading only that chunk of x, and stores an fp32 partial
[B, BLOCK_N]; the last program of block j to arrive (an atomic counter per block, reset to 0 by
that program, so the next call or CUDA-graph replay starts clean) sums the S partials in split
order (deterministic), adds the bias and stores the output.  So wide blocks of output features
(x and its act-mul prologue re-read once per block: 2 B / BLOCK_N elements per weight element)
and narrow, long-K weights (a down projection) still get enough programs, with short K loops
each.  The RMSNorm prologue sums squares over the whole row in every program (the norm must be
known before the product), so splits help it less.

Plans (a GemvConfig or the composite PyTorch path) come from custom_ops/fused_linear_config.py:
the measured table `GEMV_CONFIGS` or `default_config`; no autotuning, so the launch is the same in
eager mode, under torch.compile and inside a CUDA graph.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import statically_known_true
from triton.runtime.jit import JITFunction

from custom_ops import counters as counters_mod
from custom_ops.pdl import launch_options as pdl_launch_options
from custom_ops.pdl import pdl_entry
# The kernel's per-row bodies (prologues, K loops).
from custom_ops.fused_linear_rows import _gemv_rows, _rms_norm_row
from custom_ops.fused_linear import act_linear_composite, rms_norm_linear_composite
# Re-exported: callers and tests use them from here.
from custom_ops.fused_linear_config import (COMPOSITE, GEMV_CONFIGS, GemvConfig,  # noqa: F401
                                            batch_bucket, default_config, fit_config,
                                            pick_config)

# Prologue of `_fused_gemv_kernel` (constexpr PROLOGUE), and its plan-table kind.
NONE, SILU_MUL, GELU_TANH_MUL, RMS_NORM = 0, 1, 2, 3
ACT_PROLOGUES = {"none": NONE, "silu_mul": SILU_MUL, "gelu_tanh_mul": GELU_TANH_MUL}
KIND_OF = {NONE: "none", SILU_MUL: "silu_mul", GELU_TANH_MUL: "gelu_tanh_mul", RMS_NORM: "rms_norm"}


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
def _fused_gemv_kernel(x_ptr, res_ptr, bn_ptr, norm_ptr, w_ptr, bias_ptr, out_ptr, rout_ptr,
                       ws_ptr, count_ptr, B, N, K, S, eps, norm_offset, PROLOGUE: tl.constexpr,
                       HAS_RES: tl.constexpr, HAS_BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                       EVEN_K: tl.constexpr, DOT_IEEE: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PREFETCH: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr):
    """out [B, N] = prologue(x) [B, K] @ weight[N, K]^T (+ bias [N]), fp32 accumulation.

    Inputs: x [B, K] ([B, 2K] = [gate | up] for the act-mul prologues), weight [N, K] and out in
    one dtype (bf16/fp16/fp32); bias [N] that dtype (HAS_BIAS); RMS_NORM also reads residual
    [B, K] (HAS_RES), branch_norm [K] (HAS_BN) and norm [K] (any float dtype) and writes
    residual_out [B, K] (program (0, 0) only); pointers of absent tensors are never read.
    Prologues (fp32 math, rounded to x's dtype where the reference rounds):
      RMS_NORM: b = x or round(rms(x) * (norm_offset + branch_norm)); r = round(b + residual) or
        b -> residual_out; input = round(rms(r) * (norm_offset + norm)), rms(v) = v / sqrt(mean
        (v^2) + eps).  Each program first sums r^2 over all of K per row (and x^2 before it with
        HAS_BN), then normalizes each chunk of its K range in the main loop; ONE_PASS (plans
        with one_pass: FMA rows without splits, `_rms_norm_row`) applies the norms' scales
        after the sums instead, in a single pass that does not round the input.
      SILU_MUL / GELU_TANH_MUL: input = round(act(gate) * up); NONE: input = x.
    Grid (cdiv(N, BLOCK_N), S).  SPLIT (S > 1): program (j, s) covers K columns [s c, (s + 1) c)
    with c = ceil(ceil(K / S) / BLOCK_K) BLOCK_K, stores fp32 partials to ws [S, B, N], and the
    last of block j's S programs (count [cdiv(N, BLOCK_N)] int32, zero on entry and on exit) sums
    them in split order, so results do not depend on arrival order.  Every element of out (and
    residual_out) is written; rows are independent (no ties).  DOT_IEEE: fp32 products in tl.dot
    (fp32 weights), not TF32.
    Cost: N * K * elt bytes of weight read once from HBM for B <= BLOCK_B (the floor: 55 MB for
    the 1.5B model's gate/up, 12.8 us at 4.3 TB/s); per program B * (its K range) * elt of x for
    the act prologues (2x for act-mul), B * K * elt * (2-3 passes) for RMS_NORM, from L1/L2;
    SPLIT adds 2 * S * B * N * 4 bytes of partials (L2).  PREFETCH (BLOCK_B = 1 only): the next
    weight tile is requested before the current one is used (one tile more in flight per
    program, in registers), as Triton pipelines only the tl.dot loop.  Speed per shape and plan:
    benchmarks/gemv_sweep.py (first H200 sweep, before split-K: in the 1.5B's down projection at
    B = 1, 17.2 us vs cuBLAS 12.5 us, too few programs with long K loops; at B = 16, 116 us, the
    act-mul re-read per 8-wide block).
    PDL: programmatic dependent launch (custom_ops/pdl.py): each program waits for the previous
    kernel's writes before its first load, then lets the next kernel start launching.
    """
    pdl_entry(PDL, PDL)
    pid = tl.program_id(0)
    s = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K                       # [BLOCK_N, 1]
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(K, S), BLOCK_K) * BLOCK_K
        k_lo = s * chunk
        k_hi = tl.minimum(k_lo + chunk, K)
    else:
        k_lo = 0
        k_hi = K
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        if ONE_PASS:
            write_rows = tl.where(pid == 0, B, 0)               # one program writes residual_out
            y = _rms_norm_row(x_ptr, res_ptr, bn_ptr, norm_ptr, rout_ptr, w_rows, n_ok, rows,
                              row_ok, K, eps, norm_offset, write_rows, HAS_RES, HAS_BN, EVEN_K,
                              BLOCK_N, BLOCK_K, PREFETCH)
        else:
            y = _gemv_rows(x_ptr, res_ptr, bn_ptr, norm_ptr, rout_ptr, w_rows, n_ok, rows, row_ok,
                           pid, s, B, K, k_lo, k_hi, eps, norm_offset, PROLOGUE, HAS_RES, HAS_BN,
                           EVEN_K, DOT_IEEE, BLOCK_B, BLOCK_N, BLOCK_K, PREFETCH)
        out = rows[:, None].to(tl.int64) * N + n[None, :]
        out_mask = row_ok[:, None] & n_ok[None, :]
        if SPLIT:                                   # partial of split s: ws[s, rows, n]
            tl.store(ws_ptr + s.to(tl.int64) * B * N + out, y, mask=out_mask)
        else:
            if HAS_BIAS:
                y += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + out, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    if SPLIT:
        # The barrier orders every thread's partial stores before the counter's release; the
        # last program's acquire orders its partial loads (.cg: from L2, past the SM's L1,
        # which is not coherent with other SMs' stores) after every other program's release.
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if done == S - 1:
            _sum_splits(ws_ptr, bias_ptr, out_ptr, n, n_ok, B, N, S, HAS_BIAS, BLOCK_B, BLOCK_N)
            tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed")          # clean for the next call


@triton.jit
def _sum_splits(ws_ptr, bias_ptr, out_ptr, n, n_ok, B, N, S, HAS_BIAS: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[:, n] = round(sum over s = 0..S-1 in order of ws[s, :, n] (+ bias[n]))."""
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        out = rows[:, None].to(tl.int64) * N + n[None, :]
        out_mask = (rows < B)[:, None] & n_ok[None, :]
        y = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        part = ws_ptr + out                     # split t's partial: a pointer step of B * N each
        for t in range(0, S):
            y += tl.load(part, mask=out_mask, other=0.0, cache_modifier=".cg")
            part += B * N
        if HAS_BIAS:
            y += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out, y.to(out_ptr.dtype.element_ty), mask=out_mask)


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, prologue: int, *,
               residual: Optional[torch.Tensor] = None,
               branch_norm: Optional[torch.Tensor] = None, norm: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 0.0, norm_offset: float = 0.0,
               config: Union[GemvConfig, str, None] = None,
               counters: Optional[torch.Tensor] = None, pdl: bool = False
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run one plan: (out [B, N], residual_out [B, K] for RMS_NORM else None).

    Inputs already checked (custom_ops.fused_linear): weight [N, K] contiguous; x [B, K]
    ([B, 2K] for the act-mul prologues) contiguous, weight's dtype.  config: a GemvConfig
    (launched as given: fit it with `fit_config`), COMPOSITE, or None to pick the plan of
    custom_ops/fused_linear_config.py from the shapes and dtype.  counters: a caller-held
    zeroed int32 buffer for split-K plans (custom_ops.counters.workspace), else the pool.  No
    host sync.  pdl: launch with programmatic dependent launch (custom_ops/pdl.py; sm_90+, not
    under Inductor's tracing).
    """
    N, K = weight.shape
    B = x.shape[0]
    dev, dt = x.device, x.dtype
    plan = config if config is not None else pick_config(KIND_OF[prologue], N, K, B, dt)
    if plan == COMPOSITE:
        if prologue == RMS_NORM:
            assert norm is not None
            return rms_norm_linear_composite(x, residual, branch_norm, norm, weight, bias, eps,
                                             norm_offset)
        return act_linear_composite(x, weight, KIND_OF[prologue]), None
    assert isinstance(plan, GemvConfig), plan
    launch_pdl = pdl_launch_options(_fused_gemv_kernel, dev, pdl)
    out = _empty((B, N), dt, dev)                                       # out: [B, N]
    rout = _empty((B, K), dt, dev) if prologue == RMS_NORM else None    # residual_out: [B, K]
    if statically_known_true(B == 0):
        return out, rout
    nb, S = triton.cdiv(N, plan.block_n), plan.splits
    prefetch = plan.block_b == 1 and plan.num_stages > 1
    ws = _empty((S, B, N), torch.float32, dev) if S > 1 else out        # ws: [S, B, N] fp32
    count = (counters_mod.workspace(counters, nb, dev, counters_mod.is_traced(x)) if S > 1
             else out)                                                  # count: [>= nb] int32
    # Absent tensors: the kernel never touches their pointers; read-only stand-ins are x and
    # the written one is out (a tensor both read and written would look aliased to Inductor).
    # EVEN_K only where K is known to divide (a symbolic K takes the masked loads).
    _launch(_fused_gemv_kernel, (nb, S))(
        x, residual if residual is not None else x, branch_norm if branch_norm is not None else x,
        norm if norm is not None else x, weight, bias if bias is not None else x, out,
        rout if rout is not None else out, ws, count, B, N, K, S, eps, norm_offset,
        PROLOGUE=prologue, HAS_RES=residual is not None, HAS_BN=branch_norm is not None,
        HAS_BIAS=bias is not None, EVEN_K=statically_known_true(K % plan.block_k == 0),
        DOT_IEEE=dt == torch.float32, SPLIT=S > 1, BLOCK_B=plan.block_b,
        BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, PREFETCH=prefetch,
        ONE_PASS=prologue == RMS_NORM and plan.one_pass, PDL=pdl,
        num_warps=plan.num_warps, num_stages=1 if prefetch else plan.num_stages,
        **launch_pdl)
    return out, rout


def rms_norm_linear_triton(x: torch.Tensor, residual: Optional[torch.Tensor],
                           branch_norm: Optional[torch.Tensor], norm: torch.Tensor,
                           weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                           norm_offset: float, config: Union[GemvConfig, str, None] = None,
                           counters: Optional[torch.Tensor] = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """custom_ops.fused_linear.rms_norm_linear_reference's contract on CUDA (any plan)."""
    out, rout = fused_gemv(x, weight, RMS_NORM, residual=residual, branch_norm=branch_norm,
                           norm=norm, bias=bias, eps=eps, norm_offset=norm_offset,
                           config=config, counters=counters)
    assert rout is not None
    return out, rout


def act_linear_triton(x: torch.Tensor, weight: torch.Tensor, act: str,
                      config: Union[GemvConfig, str, None] = None,
                      counters: Optional[torch.Tensor] = None) -> torch.Tensor:
    """custom_ops.fused_linear.act_linear_reference's contract on CUDA (any plan)."""
    return fused_gemv(x, weight, ACT_PROLOGUES[act], config=config, counters=counters)[0]
