"""Plans of the fused decode linears on CPU (custom_ops/fused_linear_config.py): config validation,
the table and the default heuristic, K splits, symbolic sizes (the dynamic-shape opcheck failure
"unhashable type: non-nested SymInt", reproduced by tracing the CUDA bodies on fake CUDA tensors),
and the composite plan (PyTorch prologue + F.linear) against the reference."""

from __future__ import annotations

import pytest
import torch
import triton

from custom_ops import fused_linear_config as cfgm
from custom_ops import fused_linear_triton as flt
from custom_ops.fused_linear import (act_linear_composite, act_linear_reference,
                                     rms_norm_linear_composite, rms_norm_linear_reference)
from custom_ops.fused_linear_config import COMPOSITE, GemvConfig, pick_config

B, K, N = 5, 96, 40     # odd shapes, as in test_fused_linear.py
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# F.linear in x's dtype vs the reference's fp32 product of the same rounded inputs: accumulation
# order and, for 16-bit dtypes, the final rounding of O(1) outputs differ.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
VARIANTS = [(res, bn, bias) for res in (False, True) for bn in (False, True)
            for bias in (False, True)]

# The decode shapes of the sweep: (kind, N, K).
DECODE = [("rms_norm", 2048, 1536), ("none", 1536, 1536), ("rms_norm", 17920, 1536),
          ("silu_mul", 1536, 8960), ("none", 151936, 1536), ("rms_norm", 1536, 640),
          ("none", 640, 1024), ("gelu_tanh_mul", 640, 2048), ("none", 40, 96)]


def rms_args(dtype, res=True, bn=False, bias=True, b=B):
    """(x, residual, branch_norm, norm, weight, bias, eps, norm_offset); outputs O(1)."""
    x, r = torch.randn(b, K).to(dtype), torch.randn(b, K).to(dtype) if res else None
    bnw = (torch.randn(K) * 0.2).to(dtype) if bn else None
    nw = (torch.randn(K) * 0.2 + (0.0 if bn else 1.0)).to(dtype)
    w = (torch.randn(N, K) / K ** 0.5).to(dtype)
    bi = (torch.randn(N) * 0.1).to(dtype) if bias else None
    return x, r, bnw, nw, w, bi, 1e-6, 1.0 if bn else 0.0


def act_args(dtype, act, b=B):
    x = torch.randn(b, K if act == "none" else 2 * K) * 2
    return x.to(dtype), (torch.randn(N, K) / K ** 0.5).to(dtype), act


def composed_rms_norm_linear(x, residual, branch_norm, norm, weight, bias, eps, offset):
    """F.rms_norm + F.linear in fp32, written independently of the reference's prologue."""
    F, dt, shape = torch.nn.functional, x.dtype, (x.shape[-1],)
    b = x
    if branch_norm is not None:
        b = F.rms_norm(x.float(), shape, offset + branch_norm.float(), eps).to(dt)
    r = (b.float() + residual.float()).to(dt) if residual is not None else b
    y = F.rms_norm(r.float(), shape, offset + norm.float(), eps).to(dt)
    return F.linear(y.float(), weight.float(), None if bias is None else bias.float()).to(dt)


def composed_act_linear(x, weight, act):
    F = torch.nn.functional
    h = x
    if act != "none":
        gate, up = x.float().split(x.shape[-1] // 2, dim=-1)
        a = F.silu(gate) if act == "silu_mul" else F.gelu(gate, approximate="tanh")
        h = (a * up).to(x.dtype)
    return F.linear(h.float(), weight.float()).to(x.dtype)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="power of two"):
        GemvConfig(1, 12, 256)
    with pytest.raises(ValueError, match="block_b must be 1, 16, 32 or 64"):
        GemvConfig(8, 16, 256)
    with pytest.raises(ValueError, match="need block_n >= 8 and block_k >= 16"):
        GemvConfig(16, 4, 256)
    with pytest.raises(ValueError, match="splits must be in"):
        GemvConfig(1, 16, 256, splits=0)
    with pytest.raises(ValueError, match="splits must be in"):
        GemvConfig(1, 16, 256, splits=cfgm.MAX_SPLITS + 1)
    with pytest.raises(ValueError, match="one_pass needs FMA rows without splits"):
        GemvConfig(16, 16, 256, one_pass=True)
    with pytest.raises(ValueError, match="one_pass needs FMA rows without splits"):
        GemvConfig(1, 16, 256, splits=2, one_pass=True)
    with pytest.raises(ValueError, match="kind must be one of"):
        pick_config("relu", 64, 64, 1, torch.bfloat16)
    with pytest.raises(ValueError, match="config tuple or 'composite'"):
        cfgm.plan_of_entry("cublas")


def test_table_entries_win(monkeypatch) -> None:
    assert [cfgm.batch_bucket(b) for b in (1, 2, 4, 5, 16, 17, 32, 33, 64, 65)] == [
        "b1", "b4", "b4", "b16", "b16", "b32", "b32", "b64", "b64", "b64"]
    monkeypatch.setitem(cfgm.GEMV_CONFIGS, ("silu_mul", 1536, 8960, "b1"), (1, 4, 2048, 8, 3))
    monkeypatch.setitem(cfgm.GEMV_CONFIGS, ("silu_mul", 1536, 8960, "b16"),
                        (16, 64, 128, 4, 3, 8))
    monkeypatch.setitem(cfgm.GEMV_CONFIGS, ("rms_norm", 2048, 1536, "b1"), COMPOSITE)
    monkeypatch.setitem(cfgm.GEMV_CONFIGS, ("rms_norm", 1536, 640, "b1"), (1, 4, 1024, 4, 1, 1, 1))
    assert flt.GEMV_CONFIGS is cfgm.GEMV_CONFIGS        # the re-exported table is the same dict
    assert pick_config("silu_mul", 1536, 8960, 1, torch.bfloat16) == GemvConfig(1, 4, 2048, 8, 3)
    assert pick_config("silu_mul", 1536, 8960, 1, torch.float32).block_k == 1024  # same bytes
    # 8 splits of 70 steps of 128: 9 steps each, so 8 splits (none empty)
    assert pick_config("silu_mul", 1536, 8960, 9, torch.bfloat16) == GemvConfig(16, 64, 128, 4, 3,
                                                                                8)
    assert pick_config("rms_norm", 2048, 1536, 1, torch.float16) == COMPOSITE
    # a 7-tuple ends with one_pass (the table writes 1); fitting keeps it
    assert pick_config("rms_norm", 1536, 640, 1, torch.bfloat16) == GemvConfig(
        1, 4, 1024, 4, 1, 1, one_pass=True)
    # other kinds of the same N x K, or other buckets, fall back to the default
    assert pick_config("gelu_tanh_mul", 1536, 8960, 1, torch.bfloat16) != GemvConfig(
        1, 4, 2048, 8, 3)


def test_measured_table_entries_are_valid_plans() -> None:
    for (kind, N, K, bucket), entry in cfgm.GEMV_CONFIGS.items():
        assert kind in cfgm.KINDS and bucket in ("b1", "b4", "b16", "b32", "b64")
        plan = cfgm.plan_of_entry(entry)
        if plan != COMPOSITE:
            assert (plan.block_b == 1) == (bucket == "b1"), (kind, N, K, bucket, entry)
            for dt in (torch.bfloat16, torch.float32):
                fitted = cfgm.fit_config(plan, K, dt)
                assert 1 <= fitted.splits <= triton.cdiv(K, fitted.block_k)


@pytest.mark.parametrize("B", [1, 2, 3, 4, 7, 16, 40, 64, 200])
def test_default_plans(B, monkeypatch) -> None:
    monkeypatch.setattr(cfgm, "GEMV_CONFIGS", {})      # the defaults, not the measured table
    for kind, N, K in DECODE:
        for dt in (torch.bfloat16, torch.float32):
            plan = pick_config(kind, N, K, B, dt)
            composite = (kind == "rms_norm" and B >= 4) or (kind.endswith("_mul") and B >= 16)
            assert (plan == COMPOSITE) == composite, (kind, N, K, B, plan)
            if plan == COMPOSITE:
                continue
            assert (plan.block_b == 1) == (B == 1)
            assert plan.block_k <= max(16, triton.next_power_of_2(K))
            steps = triton.cdiv(K, plan.block_k)
            assert 1 <= plan.splits <= steps
            # splits are evened out: each of them gets at least one K step
            chunk = triton.cdiv(triton.cdiv(K, plan.splits), plan.block_k) * plan.block_k
            assert triton.cdiv(K, chunk) == plan.splits
    # the narrow, long-K down projection is split at B = 1 and at small batches; the wide LM
    # head is not
    assert pick_config("silu_mul", 1536, 8960, 1, torch.bfloat16).splits > 1
    assert pick_config("silu_mul", 1536, 8960, 2, torch.bfloat16).splits > 1
    assert pick_config("none", 151936, 1536, B, torch.bfloat16).splits == 1


@pytest.mark.parametrize("K,block_k,splits", [(96, 32, 8), (8960, 128, 11), (1000, 64, 3),
                                              (640, 512, 4), (17, 16, 64)])
def test_fit_config_evens_splits(K, block_k, splits) -> None:
    cfg = cfgm.fit_config(GemvConfig(16, 16, block_k, splits=splits), K, torch.bfloat16)
    chunk = triton.cdiv(triton.cdiv(K, cfg.splits), cfg.block_k) * cfg.block_k
    assert cfg.splits <= splits and triton.cdiv(K, chunk) == cfg.splits      # none empty
    assert (cfg.splits - 1) * chunk < K <= cfg.splits * chunk


def test_symbolic_sizes_pick_a_plan_without_guards() -> None:
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    sizes = {}
    for name, v in (("B", 16), ("N", 1536), ("K", 8960)):
        sizes[name] = env.create_symintnode(env.create_symbol(v, source=ConstantSource(name)),
                                            hint=v)
    assert isinstance(sizes["N"], torch.SymInt)
    with pytest.raises(TypeError, match="unhashable"):      # what the old table lookup did
        {}.get((sizes["N"], sizes["K"], "b16"))
    for kind in cfgm.KINDS:
        plan = pick_config(kind, sizes["N"], sizes["K"], sizes["B"], torch.bfloat16)
        assert plan == pick_config(kind, 1536, 8960, 16, torch.bfloat16)
    assert not env.guards, "choosing a plan must not specialize the sizes"


def _fake_cuda(mode, *shape, dtype=torch.bfloat16):
    """A fake CUDA tensor with symbolic sizes (no GPU needed)."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * len(shape))
    meta = mode.from_tensor(torch.empty(*shape, dtype=dtype), symbolic_context=ctx)
    with mode:
        return torch.empty(meta.shape, device="cuda", dtype=dtype)


def _trace_symbolic(fn, *shapes):
    """fn's graph traced with symbolic sizes on fake CUDA tensors through Python
    functionalization, which decomposes a triton_op into its CUDA body as AOTAutograd does for
    opcheck's test_aot_dispatch_dynamic and torch.compile(dynamic=True)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    args = [_fake_cuda(mode, *s) for s in shapes]
    # Without a GPU driver the kernels' mutation analysis logs a warning and assumes every
    # tensor argument is written: harmless here.
    graph = make_fx(dispatch_functionalize(fn), tracing_mode="symbolic")(*args)
    return [str(n.target) for n in graph.graph.nodes if n.op == "call_function"], mode


def _plan_guards(mode) -> list[str]:
    """Guards added by the plan choice or the launch code (the input checks guard shape
    equalities, and torch's own allocation code may guard a size >= 2: both fine)."""
    return [f"{g.expr} at {g.sloc}" for g in mode.shape_env.guards
            if "fused_linear_config" in str(g.sloc) or "fused_linear_triton" in str(g.sloc)]


@pytest.mark.parametrize("B,plan", [(1, "split"), (3, "split"), (16, "composite")])
def test_act_linear_traces_with_symbolic_sizes(B, plan) -> None:
    targets, mode = _trace_symbolic(
        lambda x, w: torch.ops.flashhead.act_linear(x, w, "silu_mul"), (B, 2 * 8960),
        (1536, 8960))
    kernel = any("triton_kernel_wrapper" in t for t in targets)
    assert kernel == (plan == "split") and ("aten.mm.default" in targets) == (plan != "split")
    if plan == "split":          # the fresh zeroed counters of a traced split-K launch
        assert "aten.zeros.default" in targets
    assert not _plan_guards(mode)


@pytest.mark.parametrize("B,plan", [(1, "kernel"), (3, "kernel"), (16, "composite")])
def test_rms_norm_linear_traces_with_symbolic_sizes(B, plan) -> None:
    targets, mode = _trace_symbolic(
        lambda x, r, bn, nw, w, b: torch.ops.flashhead.rms_norm_linear(x, r, bn, nw, w, b, 1e-6,
                                                                       1.0),
        (B, 640), (B, 640), (640,), (640,), (1536, 640), (1536,))
    assert any("triton_kernel_wrapper" in t for t in targets) == (plan == "kernel")
    assert ("aten.addmm.default" in targets) == (plan == "composite")
    assert not _plan_guards(mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("res,bn,bias", VARIANTS)
def test_rms_norm_linear_composite(fresh_seed, dtype, res, bn, bias) -> None:
    args = rms_args(dtype, res, bn, bias)
    out, rout = rms_norm_linear_composite(*args)
    ref_out, ref_rout = rms_norm_linear_reference(*args)
    assert out.dtype == rout.dtype == dtype and out.shape == ref_out.shape
    assert torch.equal(rout, ref_rout)                  # the same prologue, elementwise
    assert rout.data_ptr() != args[0].data_ptr(), "residual_out is a new tensor, never x"
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(out, composed_rms_norm_linear(*args), **TOL[dtype])
    # the launcher runs the same plan when told to (CPU tensors: no kernel launched)
    got = flt.rms_norm_linear_triton(*args, config=COMPOSITE)
    assert torch.equal(got[0], out) and torch.equal(got[1], rout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["none", "silu_mul", "gelu_tanh_mul"])
def test_act_linear_composite(fresh_seed, dtype, act) -> None:
    args = act_args(dtype, act)
    out = act_linear_composite(*args)
    assert out.dtype == dtype and out.shape == (B, N)
    assert out.data_ptr() != args[0].data_ptr()
    torch.testing.assert_close(out, act_linear_reference(*args), **TOL[dtype])
    torch.testing.assert_close(out, composed_act_linear(*args), **TOL[dtype])
    assert torch.equal(flt.act_linear_triton(*args, config=COMPOSITE), out)


def test_composite_empty_batch() -> None:
    out, rout = rms_norm_linear_composite(*rms_args(torch.float32, b=0))
    assert out.shape == (0, N) and rout.shape == (0, K)
    assert act_linear_composite(*act_args(torch.float32, "silu_mul", b=0)).shape == (0, N)
