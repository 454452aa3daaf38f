"""Launch plans of the fused decode linears (custom_ops/fused_linear_triton.py).

A plan is either a `GemvConfig` (the Triton GEMV kernel: tile sizes, launch options and the number
of K splits) or `COMPOSITE`: the prologue (residual add + RMSNorm, or the activation-mul) in
PyTorch ops and the product by F.linear (cuBLAS eagerly; under torch.compile, Inductor traces the
op body, fuses the prologue into one kernel and calls cuBLAS or its own mm template).

The plan depends on the op's prologue kind, the weight's N and K, the batch's bucket and the dtype,
never on values, so the launch is the same in eager mode, under torch.compile and in a CUDA graph.
Traced with symbolic sizes (dynamic shapes, torch.export Dims), the plan is chosen from the sizes'
example values without adding guards: every plan computes the same result for any size, so a graph
reused at other sizes stays correct (it may be slower there).

Dimensions: B rows, N output features, K input features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import triton

# The op's prologue, the first element of a GEMV_CONFIGS key.
KINDS = ("rms_norm", "none", "silu_mul", "gelu_tanh_mul")
COMPOSITE = "composite"         # a plan (and a GEMV_CONFIGS value): PyTorch prologue + F.linear
MAX_SPLITS = 64
_SMS = 132          # programs per wave on an H100/H200

# Measured best plans: (kind, N, K, batch bucket) -> (block_b, block_n, block_k, num_warps,
# num_stages[, splits[, one_pass]]) or "composite"; block_k counts 16-bit elements (fp32
# weights use half as many, the same bytes).  Buckets: "b1" (B = 1), "b4" (B <= 4), "b16"
# (B <= 16), "b32" (B <= 32), "b64" (B > 32; B > 64 loops over 64-row blocks): a bucket's entry
# is measured at its largest B (the sweep's batches).  Paste the dict that
# `python -m benchmarks.gemv_sweep` prints.
# Entries below: the winners of `gemv_sweep --quick --batch 1 16` on an NVIDIA H200 (torch 2.11,
# triton 3.6, 2026-11-30; the run stopped at its time limit after Gemma's gate/up at B = 1, so
# Gemma's down projection and its B = 16 gate/up keep `default_config`).  us, best vs cuBLAS:
#   R1-1.5B  qkv 5.4 vs 5.5 | o 4.1 vs 6.5 | gate/up 18.2 vs 17.2 | down 11.9 vs 12.0 (B = 1);
#            B = 16: composite 7.4 / 5.2 / 19.7 / 14.0 vs cuBLAS 5.5 / 5.2 / 17.7 / 12.3
#   Gemma    qkv 4.4 vs 4.1 | o 2.3 vs 4.4 | gate/up 5.5 vs 4.4 (B = 1)
# Then `gemv_sweep --quick --batch 1` (same card, 2026-11-30, evening), with weight tiles
# requested ahead (num_stages 2 of FMA plans): R1 qkv 5.2 vs 5.5, o 3.9 vs 6.4 (both prefetching,
# 4 x 1024 tiles); gate/up and down unchanged (17.9, 12.2: prefetching did not help them);
# Gemma qkv 4.0 vs 4.1 (prefetching), down 3.7 vs 6.3, head 84.5 vs cuBLAS 80.2.
# Then (same card, 2026-11-30, late) the RMSNorm prologue in one pass (one_pass): QKV R1 4.7 us
# vs cuBLAS 5.5, Gemma 3.7 vs 3.9 (one pass, no prefetch); gate/up slower in one pass (R1 19.2,
# Gemma 5.9 vs cuBLAS 16.2, 4.4), so they keep two passes.
GEMV_CONFIGS: dict[tuple[str, int, int, str], Union[tuple[int, ...], str]] = {
    # DeepSeek-R1-Distill-Qwen-1.5B / Qwen2.5-1.5B: D 1536, 12 + 2 + 2 heads of 128, I 8960
    ("rms_norm", 2048, 1536, "b1"): (1, 4, 1024, 4, 1, 1, 1),
    ("rms_norm", 2048, 1536, "b16"): COMPOSITE,
    ("none", 1536, 1536, "b1"): (1, 4, 1024, 4, 2, 1),
    ("none", 1536, 1536, "b16"): COMPOSITE,
    ("rms_norm", 17920, 1536, "b1"): (1, 8, 512, 4, 1, 1),
    ("rms_norm", 17920, 1536, "b16"): COMPOSITE,
    ("silu_mul", 1536, 8960, "b1"): (1, 8, 512, 4, 1, 3),
    ("silu_mul", 1536, 8960, "b16"): COMPOSITE,
    ("none", 151936, 1536, "b1"): (1, 8, 512, 4, 1, 1),
    ("none", 151936, 1536, "b16"): (16, 64, 128, 4, 3, 1),
    # Gemma-3-270M: D 640, 4 + 1 + 1 heads of 256, I 2048
    ("rms_norm", 1536, 640, "b1"): (1, 4, 1024, 4, 1, 1, 1),
    ("rms_norm", 1536, 640, "b16"): COMPOSITE,
    ("none", 640, 1024, "b1"): (1, 2, 1024, 4, 1, 1),
    ("none", 640, 1024, "b16"): (16, 8, 128, 4, 4, 1),
    ("rms_norm", 4096, 640, "b1"): (1, 8, 512, 4, 1, 1),
    ("gelu_tanh_mul", 640, 2048, "b1"): (1, 2, 2048, 4, 1, 1),
    ("none", 262144, 640, "b1"): (1, 16, 256, 4, 1, 1),
}


@dataclass(frozen=True)
class GemvConfig:
    """Launch config of `_fused_gemv_kernel`.

    block_b: rows of x per tile, 1 (elementwise FMA) or 16/32/64 (tl.dot); block_n: output
    features per program (>= 8 for tl.dot: 16 x 8 x 16 mma tiles); block_k: K chunk per loop step
    (elements of the weight's dtype); num_warps, num_stages: Triton's launch options (num_stages
    pipelines only the tl.dot loop; for FMA rows, num_stages >= 2 instead requests each weight
    tile one loop step ahead, in registers); splits: programs along K per block of output
    features, each reducing a contiguous chunk of K into an fp32 partial that the last of them
    sums (1: none); one_pass: the RMSNorm prologue of FMA rows without splits in a single pass
    over K, the norms' scales applied after the sums (no rounding of the input; other prologues
    ignore it).  Measured both ways per shape (benchmarks/gemv_sweep.py): one pass won on the
    narrow QKV weights, two passes on the wide gate/up ones."""
    block_b: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    splits: int = 1
    one_pass: bool = False

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
        if not 1 <= self.splits <= MAX_SPLITS:
            raise ValueError(f"GemvConfig.splits must be in [1, {MAX_SPLITS}], got {self.splits}")
        object.__setattr__(self, "one_pass", bool(self.one_pass))   # a table's 1 or 0
        if self.one_pass and (self.block_b != 1 or self.splits != 1):
            raise ValueError(f"GemvConfig.one_pass needs FMA rows without splits (block_b 1, "
                             f"splits 1), got block_b={self.block_b}, splits={self.splits}")


Plan = Union[GemvConfig, str]       # a GemvConfig or COMPOSITE


def static_size(v: Union[int, torch.SymInt]) -> int:
    """A size as a Python int; a symbolic size's example value, without adding a guard (plans
    change speed only).  A size without one (data-dependent) counts as 64."""
    if isinstance(v, torch.SymInt):
        hint = v.node.hint
        return int(hint) if hint is not None else 64
    return int(v)


def batch_bucket(B: int) -> str:
    """The GEMV_CONFIGS bucket of a batch of B rows."""
    return ("b1" if B <= 1 else "b4" if B <= 4 else "b16" if B <= 16 else "b32" if B <= 32
            else "b64")


def _splits(N: int, K: int, block_n: int, block_k: int, min_steps: int) -> int:
    """K splits for grids of few output blocks: enough for ~4 programs per SM, each split still
    at least min_steps loop steps long (a long sequential K loop per program is what leaves a
    narrow, long-K weight like a down projection latency bound)."""
    programs = triton.cdiv(N, block_n)
    if programs >= 4 * _SMS:
        return 1
    return max(1, min(triton.cdiv(4 * _SMS, programs), triton.cdiv(K, block_k) // min_steps,
                      MAX_SPLITS))


def default_config(kind: str, N: int, K: int, B: int) -> Plan:
    """Plan for shapes the table lacks.

    B = 1: FMA rows; the widest block of output features that still gives >= 2 waves of
    programs, steps of 8 KB of weight (16-bit; an fp32 accumulator of 32 registers a thread),
    split along K where the grid is small (`_splits`).
    B >= 4 with the RMSNorm prologue, B >= 16 with an activation-mul: COMPOSITE.  Every Triton
    program recomputes its prologue from x, re-reading ~2-5 B * K elements per block of output
    features; at these batches that traffic rivals the weight (first H200 sweep, 8-32 wide tiles
    at B = 16: 1.5-2.1x cuBLAS's time with RMSNorm, 6-10x with an act-mul), while one fused
    prologue kernel + cuBLAS costs about one extra launch.  RMSNorm's threshold B >= 4 is
    interpolated between the measured B = 1 (Triton at par) and B = 16, not measured.
    Otherwise tl.dot tiles: 64 output features wide for the act prologues (x re-read per weight
    element: 2 B / 64) with K splits for small grids; 8-32 wide for RMSNorm at B < 4.  Tiles
    chosen free of register spills in sm_90 builds (triton 3.9, ptxas -v: 168 registers for
    16 x 64 x 128 at 4 warps with silu_mul, 216 for 32 x 64 x 256 at 8 warps; 204 for the
    RMSNorm 16 x 32 x 128; the 128-wide and 64-row tiles of the act prologues spill)."""
    if B <= 1:
        block_n = next((bn for bn in (16, 8, 4, 2) if triton.cdiv(N, bn) >= 2 * _SMS), 1)
        block_k = min(2048, 4096 // block_n)
        return GemvConfig(1, block_n, block_k, 4, 1, _splits(N, K, block_n, block_k, 2))
    if (kind == "rms_norm" and B >= 4) or (kind in ("silu_mul", "gelu_tanh_mul") and B >= 16):
        return COMPOSITE
    block_b = 16 if B <= 16 else 32 if B <= 32 else 64
    if kind == "rms_norm":
        block_n = next((bn for bn in (32, 16) if triton.cdiv(N, bn) >= 2 * _SMS), 8)
        return GemvConfig(block_b, block_n, 128 if block_n == 32 else 256, 4, 3)
    if block_b == 16:
        return GemvConfig(16, 64, 128, 4, 3, _splits(N, K, 64, 128, 2))
    return GemvConfig(block_b, 64, 256, 8, 2, _splits(N, K, 64, 256, 2))


def fit_config(cfg: GemvConfig, K: int, dtype: torch.dtype) -> GemvConfig:
    """cfg with block_k in elements of dtype (table block_k counts 16-bit ones), <= K's next
    power of two, and at most as many splits as K steps, evened out so none is empty
    (splits s of chunk = ceil(ceil(K / S) / block_k) block_k elements)."""
    block_k = cfg.block_k // 2 if dtype == torch.float32 else cfg.block_k
    block_k = max(16, min(block_k, triton.next_power_of_2(K)))
    steps = triton.cdiv(K, block_k)
    splits = min(cfg.splits, steps)
    splits = triton.cdiv(steps, triton.cdiv(steps, splits))
    return GemvConfig(cfg.block_b, cfg.block_n, block_k, cfg.num_warps, cfg.num_stages, splits,
                      cfg.one_pass)


def plan_of_entry(entry: Union[tuple[int, ...], str]) -> Plan:
    """A GEMV_CONFIGS value as a plan (5-tuples have no splits: 1; 7-tuples end with one_pass)."""
    if entry == COMPOSITE:
        return COMPOSITE
    if isinstance(entry, str):
        raise ValueError(f"a GEMV_CONFIGS value is a config tuple or {COMPOSITE!r}, got {entry!r}")
    return GemvConfig(*entry)


def pick_config(kind: str, N: Union[int, torch.SymInt], K: Union[int, torch.SymInt],
                B: Union[int, torch.SymInt], dtype: torch.dtype) -> Plan:
    """The GEMV_CONFIGS entry of (kind, N, K, B's bucket), else `default_config`; configs are
    fitted to K and dtype.  Symbolic sizes: their example values (`static_size`)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    N, K, B = static_size(N), static_size(K), static_size(B)
    entry = GEMV_CONFIGS.get((kind, N, K, batch_bucket(B)))
    plan = plan_of_entry(entry) if entry is not None else default_config(kind, N, K, B)
    return plan if plan == COMPOSITE else fit_config(plan, K, dtype)
