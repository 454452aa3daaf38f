"""rms_norm_linear / act_linear on CUDA (the Triton GEMV kernel, split-K, the composite plan)
against the PyTorch reference, on the real decode shapes; every tile kind; CUDA graphs;
torch.compile; opcheck (dynamic shapes included) for every plan.

Runs on the GPU machine:  pytest -m cuda tests/custom_ops/test_fused_linear_cuda.py
Outputs are poisoned (NaN) before every launch, so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

import custom_ops
from benchmarks.gemv_sweep import SHAPES, call, make_inputs, reference
from custom_ops import counters
from custom_ops import fused_linear_triton as flt
from custom_ops.fused_linear_triton import GemvConfig
from triton_poison import poisoned_empty

pytestmark = pytest.mark.cuda
# Kernel and reference both compute in fp32 from the same rounded inputs and round the output;
# summation order (and a rare one-ulp flip of a rounded intermediate) is all that differs, so
# the gap is about one ulp of the O(1) outputs.
TOL = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=4e-3, atol=4e-3),
       torch.float32: dict(rtol=1e-4, atol=1e-4)}
LAYER_SHAPES = [s for s in SHAPES if "lm_head" not in s.name]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(flt, "_empty", poisoned_empty)
    torch.backends.cuda.matmul.allow_tf32 = False       # the reference's fp32 matmuls


def check(shape, d, dtype, cfg=None) -> None:
    w = d["weights"][0]
    out = call(shape, d, w, cfg)
    ref = reference(shape, d, w)
    assert out.shape == ref.shape and out.dtype == dtype
    assert not bool(out.isnan().any()), "every output element written"
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 16, 64])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: s.name)
def test_layer_shapes(fresh_seed, shape, B, dtype) -> None:
    d = make_inputs(shape, B, 1, seed=fresh_seed, dtype=dtype)
    check(shape, d, dtype)
    if shape.op == "rms_norm_linear":       # residual_out, through the registered op
        out, rout = torch.ops.flashhead.rms_norm_linear(
            d["x"], d["residual"], d["branch_norm"], d["norm"], d["weights"][0], d["bias"],
            1e-6, shape.norm_offset)
        ref_out, ref_rout = custom_ops.rms_norm_linear_reference(
            d["x"], d["residual"], d["branch_norm"], d["norm"], d["weights"][0], d["bias"],
            1e-6, shape.norm_offset)
        torch.testing.assert_close(out, ref_out, **TOL[dtype])
        if shape.branch_norm:    # rms of x summed in another order: a rare one-ulp flip
            torch.testing.assert_close(rout, ref_rout, **TOL[dtype])
        else:                    # an elementwise add: exact
            assert torch.equal(rout, ref_rout)


@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("shape", [s for s in SHAPES if "lm_head" in s.name], ids=lambda s: s.name)
def test_lm_heads(fresh_seed, shape, B) -> None:
    d = make_inputs(shape, B, 1, seed=fresh_seed)
    check(shape, d, torch.bfloat16)


# Every tile kind at a narrow and a wide shape: FMA rows at B > 1 (a loop over rows), padded
# tl.dot tiles at B = 1, 16-64-row tiles, B = 130 (loops over 64-row blocks), masked K tails.
CONFIGS = [GemvConfig(1, 2, 2048, 4, 1), GemvConfig(1, 16, 512, 8, 1), GemvConfig(1, 4, 1024, 4, 2),
           GemvConfig(16, 8, 256),
           GemvConfig(16, 64, 128, 4, 3), GemvConfig(32, 16, 256, 4, 3),
           GemvConfig(64, 8, 128, 8, 3), GemvConfig(16, 16, 1024, 4, 2)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("name", ["qwen1.5b/qkv", "gemma3-270m/gate_up", "gemma3-270m/down"])
def test_every_tile_kind(fresh_seed, name, cfg) -> None:
    shape = next(s for s in SHAPES if s.name == name)
    for B in (1, 130):
        check(shape, make_inputs(shape, B, 1, seed=fresh_seed + B), torch.bfloat16, cfg)


@pytest.mark.parametrize("B", [1, 5, 40])
def test_fp32_and_odd_shapes(fresh_seed, B) -> None:
    # fp32 (tl.dot in IEEE mode), K with a masked tail, N not a multiple of any block.
    g = torch.Generator(device="cuda").manual_seed(fresh_seed)
    K, N = 1000, 333
    x, res = (torch.randn(B, K, generator=g, device="cuda") for _ in range(2))
    bn, nw = (torch.randn(K, generator=g, device="cuda") * 0.2 for _ in range(2))
    w = torch.randn(N, K, generator=g, device="cuda") / K ** 0.5
    bias = torch.randn(N, generator=g, device="cuda")
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        args = (x.to(dt), res.to(dt), bn, nw, w.to(dt), bias.to(dt), 1e-6, 1.0)
        for got, want in zip(custom_ops.rms_norm_linear(*args),
                             custom_ops.rms_norm_linear_reference(*args)):
            torch.testing.assert_close(got, want, **TOL[dt])
        x2 = torch.randn(B, 2 * K, generator=g, device="cuda").to(dt)
        for act in ("silu_mul", "gelu_tanh_mul"):
            torch.testing.assert_close(custom_ops.act_linear(x2, w.to(dt), act),
                                       custom_ops.act_linear_reference(x2, w.to(dt), act),
                                       **TOL[dt])


def test_opcheck(fresh_seed) -> None:
    shape = next(s for s in SHAPES if s.name == "gemma3-270m/qkv")
    d = make_inputs(shape, 3, 1, seed=fresh_seed)
    torch.library.opcheck(torch.ops.flashhead.rms_norm_linear.default,
                          (d["x"], d["residual"], d["branch_norm"], d["norm"], d["weights"][0],
                           None, 1e-6, 1.0))
    torch.library.opcheck(torch.ops.flashhead.act_linear.default,
                          (torch.randn(3, 2 * 640, device="cuda", dtype=torch.bfloat16),
                           d["weights"][0], "silu_mul"))


def _mlp(x, residual, norm, w13, w2):
    gu, residual = custom_ops.rms_norm_linear(x, residual, None, norm, w13, None, 1e-6, 0.0)
    return custom_ops.act_linear(gu, w2, "silu_mul"), residual


def _mlp_weights(seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    D, intermediate = 1536, 8960
    norm = (torch.randn(D, generator=g, device="cuda") * 0.2 + 1).bfloat16()
    w13 = (torch.randn(2 * intermediate, D, generator=g, device="cuda") / D ** 0.5).bfloat16()
    w2 = (torch.randn(D, intermediate, generator=g, device="cuda") / intermediate ** 0.5)
    return norm, w13, w2.bfloat16()


@pytest.mark.parametrize("B", [1, 16])
def test_cuda_graph_replay_with_new_inputs(fresh_seed, B) -> None:
    norm, w13, w2 = _mlp_weights(fresh_seed)
    x, res = (torch.randn(B, 1536, device="cuda").bfloat16() for _ in range(2))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                 # warm up (Triton compiles) off the graph
        _mlp(x, res, norm, w13, w2)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, r = _mlp(x, res, norm, w13, w2)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        res.copy_(torch.randn_like(res))
        graph.replay()
        want = _mlp(x.clone(), res.clone(), norm, w13, w2)
        assert torch.equal(out, want[0]) and torch.equal(r, want[1])   # same kernel, same bits


@pytest.mark.parametrize("mode", [None, "max-autotune-no-cudagraphs", "reduce-overhead"])
def test_fullgraph_compile(fresh_seed, mode) -> None:
    norm, w13, w2 = _mlp_weights(fresh_seed)
    compiled = torch.compile(_mlp, fullgraph=True, mode=mode)
    for B in (1, 16):
        x, res = (torch.randn(B, 1536, device="cuda").bfloat16() for _ in range(2))
        eager = _mlp(x, res, norm, w13, w2)
        for _ in range(2):              # reduce-overhead records a graph on the second call
            got = [t.clone() for t in compiled(x, res, norm, w13, w2)]
        # Inductor launches the same kernel and config; only its own specialization of the
        # integer arguments may differ, so allow the reference tolerance, not bit equality.
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, **TOL[torch.bfloat16])


# -- split-K and the composite plan -----------------------------------------------------------

def split_configs(B: int) -> list[GemvConfig]:
    """K-split tiles of each kind for a batch of B rows: FMA rows at B = 1, tl.dot tiles above
    (a 64- and a 128-wide block), several splits each."""
    if B == 1:
        return [GemvConfig(1, 8, 512, 4, 1, splits=4), GemvConfig(1, 16, 256, 4, 1, splits=9),
                GemvConfig(1, 8, 512, 4, 2, splits=4)]
    bb = 16 if B <= 16 else 32 if B <= 32 else 64
    return [GemvConfig(bb, 64, 128, 4, 3, splits=6), GemvConfig(bb, 128, 128, 8, 3, splits=3)]


def counters_clean() -> bool:
    return all(not bool(buf.any()) for buf in counters.POOL.values())


@pytest.fixture
def fresh_dynamo():
    """Compiled graphs bake the plan in: none may leak between tests that change the table."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("B", [1, 16, 64])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: s.name)
def test_split_k_and_composite_at_real_shapes(fresh_seed, shape, B) -> None:
    d = make_inputs(shape, B, 1, seed=fresh_seed)
    w = d["weights"][0]
    for cfg in split_configs(B):
        cfg = flt.fit_config(cfg, shape.K, torch.bfloat16)
        check(shape, d, torch.bfloat16, cfg)
        assert counters_clean()
        # partials summed in split order: the same inputs give the same bits
        assert torch.equal(call(shape, d, w, cfg), call(shape, d, w, cfg))
    check(shape, d, torch.bfloat16, flt.COMPOSITE)


@pytest.mark.parametrize("B", [1, 5, 130])
def test_split_k_fp32_and_odd_shapes(fresh_seed, B) -> None:
    # K = 1000 (masked tails, a last chunk K does not fill), N = 333, fp32 IEEE dots, B > 64.
    g = torch.Generator(device="cuda").manual_seed(fresh_seed)
    K, N = 1000, 333
    x, res = (torch.randn(B, K, generator=g, device="cuda") for _ in range(2))
    nw = torch.randn(K, generator=g, device="cuda") * 0.2 + 1
    w = torch.randn(N, K, generator=g, device="cuda") / K ** 0.5
    bias = torch.randn(N, generator=g, device="cuda")
    x2 = torch.randn(B, 2 * K, generator=g, device="cuda")
    cfgs = [GemvConfig(1, 8, 256, 4, 1, splits=3), GemvConfig(16, 32, 64, 4, 3, splits=5),
            GemvConfig(64, 64, 128, 4, 3, splits=4), flt.COMPOSITE]
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        args = (x.to(dt), res.to(dt), None, nw, w.to(dt), bias.to(dt), 1e-6, 0.0)
        want = custom_ops.rms_norm_linear_reference(*args)
        want_act = custom_ops.act_linear_reference(x2.to(dt), w.to(dt), "gelu_tanh_mul")
        for cfg in cfgs:
            cfg = cfg if cfg == flt.COMPOSITE else flt.fit_config(cfg, K, dt)
            got = flt.rms_norm_linear_triton(*args, config=cfg)
            torch.testing.assert_close(got[0], want[0], **TOL[dt])
            assert torch.equal(got[1], want[1])
            got = flt.act_linear_triton(x2.to(dt), w.to(dt), "gelu_tanh_mul", config=cfg)
            torch.testing.assert_close(got, want_act, **TOL[dt])
        assert counters_clean()


def force(monkeypatch, plans: dict) -> None:
    """Put plans {(kind, N, K, B): GemvConfig or COMPOSITE} into the table the ops read."""
    for (kind, N, K, B), plan in plans.items():
        value = plan if plan == flt.COMPOSITE else (plan.block_b, plan.block_n, plan.block_k,
                                                   plan.num_warps, plan.num_stages, plan.splits)
        monkeypatch.setitem(flt.GEMV_CONFIGS, (kind, N, K, flt.batch_bucket(B)), value)


def mlp_plans(B: int, split: bool) -> dict:
    """Split-K (or composite) plans for both linears of `_mlp` at B rows."""
    kinds = (("rms_norm", 2 * 8960, 1536), ("silu_mul", 1536, 8960))
    return {(kind, N, K, B): (split_configs(B)[0] if split else flt.COMPOSITE)
            for kind, N, K in kinds}


@pytest.mark.parametrize("B,split", [(1, True), (16, True), (16, False)])
def test_plans_in_cuda_graph_replays(fresh_seed, monkeypatch, B, split) -> None:
    force(monkeypatch, mlp_plans(B, split))
    norm, w13, w2 = _mlp_weights(fresh_seed)
    x, res = (torch.randn(B, 1536, device="cuda").bfloat16() for _ in range(2))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _mlp(x, res, norm, w13, w2)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, r = _mlp(x, res, norm, w13, w2)
    for _ in range(3):                  # each replay starts from clean counters
        x.copy_(torch.randn_like(x))
        res.copy_(torch.randn_like(res))
        graph.replay()
        want = custom_ops.act_linear_reference(
            custom_ops.rms_norm_linear_reference(x, res, None, norm, w13, None, 1e-6, 0.0)[0],
            w2, "silu_mul")
        torch.testing.assert_close(out, want, **TOL[torch.bfloat16])
        if split:                       # the same kernels eagerly: the same bits
            assert torch.equal(out, _mlp(x.clone(), res.clone(), norm, w13, w2)[0])
    assert counters_clean()


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("B,split", [(1, True), (16, True), (16, False)])
def test_plans_under_fullgraph_compile(fresh_seed, monkeypatch, fresh_dynamo, mode, B,
                                       split) -> None:
    force(monkeypatch, mlp_plans(B, split))
    norm, w13, w2 = _mlp_weights(fresh_seed)
    compiled = torch.compile(_mlp, fullgraph=True, mode=mode)
    x, res = (torch.randn(B, 1536, device="cuda").bfloat16() for _ in range(2))
    eager = _mlp(x, res, norm, w13, w2)
    for _ in range(3):                  # reduce-overhead records a graph, then replays it
        got = [t.clone() for t in compiled(x, res, norm, w13, w2)]
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, **TOL[torch.bfloat16])


@pytest.mark.parametrize("B,plan", [(1, "split"), (3, "split"), (16, "composite")])
def test_opcheck_every_plan(fresh_seed, monkeypatch, B, plan) -> None:
    # test_aot_dispatch_dynamic traces the body with symbolic sizes (the SymInt fix)
    shape = next(s for s in SHAPES if s.name == "gemma3-270m/qkv")
    d = make_inputs(shape, B, 1, seed=fresh_seed)
    cfg = split_configs(B)[0] if plan == "split" else flt.COMPOSITE
    force(monkeypatch, {("rms_norm", 1536, 640, B): cfg, ("silu_mul", 1536, 640, B): cfg})
    torch.library.opcheck(torch.ops.flashhead.rms_norm_linear.default,
                          (d["x"], d["residual"], d["branch_norm"], d["norm"], d["weights"][0],
                           None, 1e-6, 1.0))
    torch.library.opcheck(torch.ops.flashhead.act_linear.default,
                          (torch.randn(B, 2 * 640, device="cuda", dtype=torch.bfloat16),
                           d["weights"][0], "silu_mul"))


@pytest.mark.parametrize("arch", ["r1-1.5b", "gemma3-270m"])
def test_pdl_chain_equals_the_plain_launch_in_a_cuda_graph(arch) -> None:
    """The GEMV and rope-attention kernels with programmatic dependent launch
    (benchmarks.pdl_chain): two layers of the body, each kernel reading its predecessor's
    output, replayed in a CUDA graph, give the plain launches' outputs bit for bit (a missing
    wait would read stale inputs)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0 or newer")
    from benchmarks.pdl_chain import build_chain, capture

    for B in (1, 16):
        chain = build_chain(arch, B, layers=2, cache_len=1024, fill=700)
        outs = {}
        for pdl in (False, True):
            graph, outs[pdl] = capture(chain, pdl)
            for _ in range(3):
                graph.replay()
        torch.cuda.synchronize()
        eager = chain.run(False)
        for a, b, c in zip(outs[False], outs[True], eager):
            assert bool(c.isfinite().all())
            assert torch.equal(a, c) and torch.equal(b, c)
