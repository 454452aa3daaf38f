"""The fused decode linears: torch.ops.flashhead.rms_norm_linear and torch.ops.flashhead.act_linear.

Layout of this file: input checks, the torch.library registrations (`triton_op`, so Inductor sees
the Triton kernels of custom_ops/fused_linear_triton.py on CUDA; on CPU the body runs the PyTorch
reference), then the references and the composite plan (PyTorch prologue + F.linear).  Output
shapes depend only on input shapes, so the ops trace with fake tensors, export, and are CUDA-graph
safe (no host sync, no .item()).

Dimensions: B rows, K input features, N output features.  Math is fp32; `_round` marks where the
result is rounded to the activation dtype (the ▸ of the design notes), and the kernels round at
the same places.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.library import triton_op

from custom_ops.flashhead import FLOAT_DTYPES, FlashHeadInputError

ACTS = ("none", "silu_mul", "gelu_tanh_mul")


class FusedLinearInputError(FlashHeadInputError):
    """Bad input to rms_norm_linear / act_linear; the message says what to change."""


def _fail(msg: str) -> None:
    raise FusedLinearInputError(msg)


def _check_common(op: str, x: torch.Tensor, weight: torch.Tensor, k_in: int,
                  named: dict[str, Optional[torch.Tensor]]) -> None:
    """x [B, k_in] and weight [N, K] of one float dtype, one device, contiguous."""
    if x.dim() != 2:
        _fail(f"{op}: x must be [B, {k_in if k_in else 'K'}], got shape {tuple(x.shape)}; "
              f"flatten leading dims first")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        _fail(f"{op}: weight must be a non-empty [N, K] matrix, got shape {tuple(weight.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        _fail(f"{op}: x must be bf16, fp16 or fp32, got {x.dtype}")
    if weight.dtype != x.dtype:
        _fail(f"{op}: weight must have x's dtype {x.dtype}, got {weight.dtype}; convert the "
              f"weight once with .to({x.dtype})")
    if x.shape[1] != k_in:
        _fail(f"{op}: x has {x.shape[1]} features but weight {tuple(weight.shape)} needs "
              f"{k_in}; pass the matching weight")
    devices = {t.device for t in (x, weight, *named.values()) if t is not None}
    if len(devices) != 1:
        _fail(f"{op}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    for name, t in (("x", x), ("weight", weight), *named.items()):
        if t is not None and not t.is_contiguous():
            _fail(f"{op}: {name} must be contiguous; call .contiguous() on it")


def check_rms_norm_linear_inputs(x: torch.Tensor, residual: Optional[torch.Tensor],
                                 branch_norm: Optional[torch.Tensor], norm: torch.Tensor,
                                 weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                                 norm_offset: float) -> None:
    """Raise FusedLinearInputError for anything rms_norm_linear cannot take.  Static checks."""
    op = "rms_norm_linear"
    K = weight.shape[1] if weight.dim() == 2 else -1
    _check_common(op, x, weight, K, dict(residual=residual, branch_norm=branch_norm, norm=norm,
                                         bias=bias))
    N = weight.shape[0]
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        _fail(f"{op}: residual must match x ({x.dtype} {tuple(x.shape)}), got {residual.dtype} "
              f"{tuple(residual.shape)}")
    for name, t in (("norm", norm), ("branch_norm", branch_norm)):
        if t is not None and (t.shape != (K,) or t.dtype not in FLOAT_DTYPES):
            _fail(f"{op}: {name} must be a [K] = [{K}] bf16/fp16/fp32 vector, got {t.dtype} "
                  f"{tuple(t.shape)}")
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        _fail(f"{op}: bias must be [N] = [{N}] in x's dtype {x.dtype}, got {bias.dtype} "
              f"{tuple(bias.shape)}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0.0):
        _fail(f"{op}: eps must be a finite float >= 0 (the model's rms_norm_eps), got {eps!r}")
    if not (isinstance(norm_offset, (int, float)) and math.isfinite(norm_offset)):
        _fail(f"{op}: norm_offset must be a finite float (0.0 Llama/Qwen/Mistral, 1.0 Gemma), "
              f"got {norm_offset!r}")


def check_act_linear_inputs(x: torch.Tensor, weight: torch.Tensor, act: str) -> None:
    """Raise FusedLinearInputError for anything act_linear cannot take.  Static checks."""
    if act not in ACTS:
        _fail(f"act_linear: act must be one of {ACTS}, got {act!r}")
    K = weight.shape[1] if weight.dim() == 2 else -1
    _check_common(f"act_linear({act!r})", x, weight, K if act == "none" else 2 * K, {})


@triton_op("flashhead::rms_norm_linear", mutates_args=())
def rms_norm_linear_op(x: torch.Tensor, residual: Optional[torch.Tensor],
                       branch_norm: Optional[torch.Tensor], norm: torch.Tensor,
                       weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                       norm_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, N], residual_out [B, K]); see custom_ops.rms_norm_linear.  CPU: the reference
    (fp32), or for 16-bit weights the composite (the same prologue, then F.linear in the weight's
    dtype with fp32 accumulation: the reference's per-call fp32 copy of every weight made eager
    CPU decoding of a bf16 model 4x slower); CUDA: the plan of custom_ops/fused_linear_config.py
    (Triton kernel or composite)."""
    return _rms_norm_linear(x, residual, branch_norm, norm, weight, bias, eps, norm_offset, None)


@triton_op("flashhead::rms_norm_linear_ws", mutates_args=("counters",))
def rms_norm_linear_ws_op(x: torch.Tensor, residual: Optional[torch.Tensor],
                          branch_norm: Optional[torch.Tensor], norm: torch.Tensor,
                          weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                          norm_offset: float, counters: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_linear_op with the caller's counters (custom_ops.counters.workspace): split-K
    plans count in them and leave them zeroed.  Declared mutated, so a compiled graph keeps
    them as the caller's state and runs no fill kernel for them.  (A separate op: a mutable
    argument would put the plain op under auto_functionalized, which the ONNX exporter cannot
    translate.)"""
    return _rms_norm_linear(x, residual, branch_norm, norm, weight, bias, eps, norm_offset,
                            counters)


def _rms_norm_linear(x: torch.Tensor, residual: Optional[torch.Tensor],
                     branch_norm: Optional[torch.Tensor], norm: torch.Tensor,
                     weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                     norm_offset: float, counters: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    check_rms_norm_linear_inputs(x, residual, branch_norm, norm, weight, bias, eps, norm_offset)
    if x.device.type != "cuda":
        cpu = rms_norm_linear_reference if x.dtype == torch.float32 else rms_norm_linear_composite
        return cpu(x, residual, branch_norm, norm, weight, bias, eps, norm_offset)
    from custom_ops.fused_linear_triton import rms_norm_linear_triton

    return rms_norm_linear_triton(x, residual, branch_norm, norm, weight, bias, eps, norm_offset,
                                  counters=counters)


@triton_op("flashhead::act_linear", mutates_args=())
def act_linear_op(x: torch.Tensor, weight: torch.Tensor, act: str) -> torch.Tensor:
    """out [B, N]; see custom_ops.act_linear.  CPU: the reference (fp32), or the composite for
    16-bit weights (see rms_norm_linear_op); CUDA: the plan of custom_ops/fused_linear_config.py
    (Triton kernel or composite)."""
    return _act_linear(x, weight, act, None)


@triton_op("flashhead::act_linear_ws", mutates_args=("counters",))
def act_linear_ws_op(x: torch.Tensor, weight: torch.Tensor, act: str,
                     counters: torch.Tensor) -> torch.Tensor:
    """act_linear_op with the caller's counters (see rms_norm_linear_ws_op)."""
    return _act_linear(x, weight, act, counters)


def _act_linear(x: torch.Tensor, weight: torch.Tensor, act: str,
                counters: Optional[torch.Tensor]) -> torch.Tensor:
    check_act_linear_inputs(x, weight, act)
    if x.device.type != "cuda":
        cpu = act_linear_reference if x.dtype == torch.float32 else act_linear_composite
        return cpu(x, weight, act)
    from custom_ops.fused_linear_triton import act_linear_triton

    return act_linear_triton(x, weight, act, counters=counters)


def _round(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 v rounded to the activation dtype and back: the ▸ of the op's semantics."""
    return v.to(dtype).float()


def _rms(v: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """fp32 v * rsqrt(mean(v^2) + eps) * (offset + w) over the last dim."""
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * (offset + w.float())


def rms_norm_prologue(x: torch.Tensor, residual: Optional[torch.Tensor],
                      branch_norm: Optional[torch.Tensor], norm: torch.Tensor, eps: float,
                      norm_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r): rms_norm_linear's product input y [B, K] and residual_out r [B, K], both new
    tensors in x's dtype (formulas: `rms_norm_linear_reference`)."""
    dt = x.dtype
    b = x.float()
    if branch_norm is not None:
        b = _round(_rms(b, branch_norm, eps, norm_offset), dt)
    r = _round(b + residual.float(), dt) if residual is not None else b
    return _rms(r, norm, eps, norm_offset).to(dt), r.to(dt, copy=True)


def act_prologue(x: torch.Tensor, act: str) -> torch.Tensor:
    """act_linear's product input h [B, K] in x's dtype: x itself for "none", else
    round(act(gate) * up) of x [B, 2K] = [gate | up]."""
    if act == "none":
        return x
    gate, up = x.float().chunk(2, dim=-1)
    a = (torch.nn.functional.silu(gate) if act == "silu_mul"
         else torch.nn.functional.gelu(gate, approximate="tanh"))
    return (a * up).to(x.dtype)


def rms_norm_linear_reference(x: torch.Tensor, residual: Optional[torch.Tensor],
                              branch_norm: Optional[torch.Tensor], norm: torch.Tensor,
                              weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                              norm_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm + linear in plain PyTorch, fp32 math.

    x [B, K]; residual [B, K] or None; branch_norm [K] or None (Gemma's post-norm of the branch
    x); norm [K]; weight [N, K]; bias [N] or None; all x's dtype (norms any float dtype).
      b = x, or round(rms(x) * (norm_offset + branch_norm)) with branch_norm
      r = round(b + residual) with residual, else b                  -> residual_out [B, K]
      y = round(rms(r) * (norm_offset + norm)),  rms(v) = v * rsqrt(mean(v^2) + eps)
      out = round(y @ weight^T + bias)                                -> out [B, N]
    round: to x's dtype.  Returns (out, residual_out), new tensors in x's dtype.
    """
    y, r = rms_norm_prologue(x, residual, branch_norm, norm, eps, norm_offset)
    out = y.float() @ weight.float().t()                                # [B, N] fp32
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype), r


def act_linear_reference(x: torch.Tensor, weight: torch.Tensor, act: str) -> torch.Tensor:
    """Activation-mul + linear in plain PyTorch, fp32 math.

    act "none": x [B, K], out = round(x @ weight^T).  "silu_mul" / "gelu_tanh_mul": x [B, 2K] =
    [gate | up], h = round(act(gate) * up) with act = silu or gelu's tanh approximation,
    out = round(h @ weight^T).  weight [N, K]; round: to x's dtype.  Returns out [B, N].
    """
    return (act_prologue(x, act).float() @ weight.float().t()).to(x.dtype)


# The COMPOSITE plan of the CUDA ops (custom_ops/fused_linear_config.py): the prologue in PyTorch
# ops and the product by F.linear in x's dtype (fp32 accumulation).  Called from the triton_op
# body, so under torch.compile Inductor traces them: one fused prologue kernel (the residual add
# and norm with their rounding, or the activation-mul) and cuBLAS or Inductor's own mm.

def rms_norm_linear_composite(x: torch.Tensor, residual: Optional[torch.Tensor],
                              branch_norm: Optional[torch.Tensor], norm: torch.Tensor,
                              weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                              norm_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_linear_reference's contract: (out [B, N], residual_out [B, K]); weight read
    once by F.linear (bias added in its epilogue)."""
    y, r = rms_norm_prologue(x, residual, branch_norm, norm, eps, norm_offset)
    return torch.nn.functional.linear(y, weight, bias), r


def act_linear_composite(x: torch.Tensor, weight: torch.Tensor, act: str) -> torch.Tensor:
    """act_linear_reference's contract: out [B, N] = F.linear(act_prologue(x, act), weight)."""
    return torch.nn.functional.linear(act_prologue(x, act), weight)
