"""flashhead::rms_norm_linear and flashhead::act_linear on CPU: op == reference, reference == an
independent composition of torch ops, opcheck, fullgraph compile, export, input errors.  Plans
(configs, K splits, the composite path, symbolic sizes): test_fused_linear_plans.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import custom_ops
from custom_ops import (FusedLinearInputError, act_linear, act_linear_reference, rms_norm_linear,
                        rms_norm_linear_reference)
from custom_ops.fused_linear import act_linear_composite, rms_norm_linear_composite

B, K, N = 3, 96, 40     # odd shapes: N is no multiple of any block, K no power of two
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# reference vs composition: both fp32 math from the same rounded inputs; a rounding step may
# flip one ulp of an intermediate (y, h), which moves an O(1) output by far less than this.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
VARIANTS = [(res, bn, bias) for res in (False, True) for bn in (False, True)
            for bias in (False, True)]


def rms_args(dtype, res=True, bn=False, bias=True, b=B, norm_dtype=None, offset=None):
    """(x, residual, branch_norm, norm, weight, bias, eps, norm_offset); outputs O(1)."""
    nd = norm_dtype or dtype
    t = (torch.randn(b, K), torch.randn(b, K) if res else None,
         torch.randn(K) * 0.2 if bn else None, torch.randn(K) * 0.2 + (0.0 if bn else 1.0),
         torch.randn(N, K) / K ** 0.5, torch.randn(N) * 0.1 if bias else None)
    x, r, bnw, nw, w, bi = (None if v is None else v.to(nd if i in (2, 3) else dtype)
                            for i, v in enumerate(t))
    return x, r, bnw, nw, w, bi, 1e-6, (1.0 if bn else 0.0) if offset is None else offset


def act_args(dtype, act, b=B):
    x = torch.randn(b, K if act == "none" else 2 * K) * 2
    return x.to(dtype), (torch.randn(N, K) / K ** 0.5).to(dtype), act


def composed_rms_norm_linear(x, residual, branch_norm, norm, weight, bias, eps, offset):
    """The same semantics from F.rms_norm and F.linear, written independently of the reference."""
    dt, shape = x.dtype, (x.shape[-1],)
    b = x
    if branch_norm is not None:
        b = F.rms_norm(x.float(), shape, offset + branch_norm.float(), eps).to(dt)
    r = (b.float() + residual.float()).to(dt) if residual is not None else b
    y = F.rms_norm(r.float(), shape, offset + norm.float(), eps).to(dt)
    out = F.linear(y.float(), weight.float(), None if bias is None else bias.float())
    return out.to(dt), r


def composed_act_linear(x, weight, act):
    if act == "none":
        h = x
    else:
        gate, up = x.float().split(x.shape[-1] // 2, dim=-1)
        a = F.silu(gate) if act == "silu_mul" else F.gelu(gate, approximate="tanh")
        h = (a * up).to(x.dtype)
    return F.linear(h.float(), weight.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("res,bn,bias", VARIANTS)
def test_rms_norm_linear_op_reference_and_composition(fresh_seed, dtype, res, bn, bias) -> None:
    args = rms_args(dtype, res, bn, bias)
    out, rout = rms_norm_linear(*args)
    ref_out, ref_rout = rms_norm_linear_reference(*args)
    assert out.shape == (B, N) and rout.shape == (B, K)
    assert out.dtype == dtype and rout.dtype == dtype
    # The CPU kernel: the reference in fp32, the composite (F.linear in the weight's dtype) for
    # 16-bit weights, which agrees with the reference to the dtype's tolerance.
    cpu_out, cpu_rout = (rms_norm_linear_reference if dtype == torch.float32
                         else rms_norm_linear_composite)(*args)
    assert torch.equal(out, cpu_out) and torch.equal(rout, cpu_rout)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    assert torch.equal(rout, ref_rout)                                 # same prologue
    assert rout.data_ptr() != args[0].data_ptr(), "residual_out is a new tensor, never x"
    comp_out, comp_rout = composed_rms_norm_linear(*args)
    torch.testing.assert_close(ref_out, comp_out, **TOL[dtype])
    torch.testing.assert_close(ref_rout, comp_rout, **TOL[dtype])
    if not bn:      # b + residual (or x itself): elementwise, so exactly equal
        assert torch.equal(ref_rout, comp_rout)


def test_rms_norm_linear_norm_weights_in_fp32_and_gemma_offset(fresh_seed) -> None:
    args = rms_args(torch.bfloat16, bn=True, norm_dtype=torch.float32, offset=1.0)
    torch.testing.assert_close(rms_norm_linear(*args).out, composed_rms_norm_linear(*args)[0],
                               **TOL[torch.bfloat16])
    # norm_offset = 1 with weight w is norm_offset = 0 with weight 1 + w
    a0 = rms_args(torch.float32, res=True, bn=False, offset=1.0)
    shifted = (*a0[:3], a0[3] + 1.0, *a0[4:7], 0.0)
    torch.testing.assert_close(rms_norm_linear(*a0).out, rms_norm_linear(*shifted).out,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["none", "silu_mul", "gelu_tanh_mul"])
def test_act_linear_op_reference_and_composition(fresh_seed, dtype, act) -> None:
    args = act_args(dtype, act)
    out = act_linear(*args)
    assert out.shape == (B, N) and out.dtype == dtype
    cpu = act_linear_reference if dtype == torch.float32 else act_linear_composite
    assert torch.equal(out, cpu(*args))                                # the CPU kernel
    torch.testing.assert_close(out, act_linear_reference(*args), **TOL[dtype])
    torch.testing.assert_close(out, composed_act_linear(*args), **TOL[dtype])


def test_empty_batch() -> None:
    out, rout = rms_norm_linear(*rms_args(torch.float32, b=0))
    assert out.shape == (0, N) and rout.shape == (0, K)
    assert act_linear(*act_args(torch.float32, "silu_mul", b=0)).shape == (0, N)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(fresh_seed, dtype) -> None:
    for res, bn, bias in ((False, False, False), (True, True, True)):
        torch.library.opcheck(torch.ops.flashhead.rms_norm_linear.default,
                              rms_args(dtype, res, bn, bias))
    for act in ("none", "gelu_tanh_mul"):
        torch.library.opcheck(torch.ops.flashhead.act_linear.default, act_args(dtype, act))


class Block(torch.nn.Module):
    """norm + gate/up, then silu-mul + down: the MLP half of a decode layer."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.Parameter(torch.randn(K) * 0.2 + 1)
        self.w13 = torch.nn.Parameter(torch.randn(2 * N, K) / K ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(K, N) / N ** 0.5)

    def forward(self, x, residual):
        gu, residual = rms_norm_linear(x, residual, None, self.norm, self.w13, None, 1e-6, 0.0)
        return act_linear(gu, self.w2, "silu_mul"), residual


def test_fullgraph_compile_and_export(fresh_seed) -> None:
    block = Block().requires_grad_(False)
    x, res = torch.randn(B, K), torch.randn(B, K)
    eager = block(x, res)
    compiled = torch.compile(block, fullgraph=True)(x, res)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    ep = torch.export.export(block, (x, res))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.flashhead.rms_norm_linear.default) == 1
    assert targets.count(torch.ops.flashhead.act_linear.default) == 1
    x2, res2 = torch.randn(B, K), torch.randn(B, K)
    for a, b in zip(ep.module()(x2, res2), block(x2, res2)):
        assert torch.equal(a, b)


def test_bad_inputs_raise_documented_errors() -> None:
    x, res, bn, nw, w, bias, eps, off = rms_args(torch.float32, bn=True)

    def rms(**kw):
        a = dict(x=x, residual=res, branch_norm=bn, norm=nw, weight=w, bias=bias, eps=eps,
                 norm_offset=off)
        a.update(kw)
        return rms_norm_linear(**a)

    assert issubclass(FusedLinearInputError, ValueError)
    with pytest.raises(FusedLinearInputError, match=r"x must be \[B, "):
        rms(x=x[None])
    with pytest.raises(FusedLinearInputError, match="bf16, fp16 or fp32"):
        rms(x=x.double(), residual=None)
    with pytest.raises(FusedLinearInputError, match="weight must have x's dtype"):
        rms(weight=w.half())
    with pytest.raises(FusedLinearInputError, match="needs 96"):
        rms(x=torch.randn(B, K + 1), residual=None)
    with pytest.raises(FusedLinearInputError, match="residual must match x"):
        rms(residual=res[:2])
    with pytest.raises(FusedLinearInputError, match=r"norm must be a \[K\]"):
        rms(norm=nw[:-1])
    with pytest.raises(FusedLinearInputError, match=r"branch_norm must be a \[K\]"):
        rms(branch_norm=bn.to(torch.int32))
    with pytest.raises(FusedLinearInputError, match=r"bias must be \[N\]"):
        rms(bias=bias[:-1])
    with pytest.raises(FusedLinearInputError, match="eps must be a finite float"):
        rms(eps=-1.0)
    with pytest.raises(FusedLinearInputError, match="contiguous"):
        rms(weight=torch.randn(K, N).t())
    with pytest.raises(FusedLinearInputError, match="non-empty"):
        rms(weight=torch.randn(0, K), bias=None)
    xa, wa, _ = act_args(torch.float32, "silu_mul")
    with pytest.raises(FusedLinearInputError, match="act must be one of"):
        act_linear(xa, wa, "relu")
    with pytest.raises(FusedLinearInputError, match=r"needs 192"):
        act_linear(xa[:, :K], wa, "gelu_tanh_mul")
    with pytest.raises(FusedLinearInputError, match=r"needs 96"):
        act_linear(xa, wa, "none")
    if torch.cuda.is_available():
        with pytest.raises(FusedLinearInputError, match="one device"):
            act_linear(xa.cuda(), wa, "silu_mul")


def test_front_is_exported() -> None:
    assert set(custom_ops.__all__) >= {"rms_norm_linear", "act_linear", "NormLinearOut",
                                       "FusedLinearInputError", "rms_norm_linear_reference",
                                       "act_linear_reference"}
    out = rms_norm_linear(*rms_args(torch.float32))
    assert isinstance(out, custom_ops.NormLinearOut) and isinstance(out, tuple)
