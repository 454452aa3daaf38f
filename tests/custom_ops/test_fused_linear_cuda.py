"""rms_norm_linear / act_linear on CUDA (the Triton GEMV kernel) against the PyTorch reference, on
the real decode shapes; every tile kind; CUDA graphs; torch.compile.

Runs on the GPU machine:  pytest -m cuda tests/custom_ops/test_fused_linear_cuda.py
Outputs are poisoned (NaN) before every launch, so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

import custom_ops
from benchmarks.gemv_sweep import SHAPES, call, make_inputs, reference
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
CONFIGS = [GemvConfig(1, 2, 2048, 4, 1), GemvConfig(1, 16, 512, 8, 1), GemvConfig(16, 8, 256),
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
