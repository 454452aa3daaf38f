"""flashhead::decode_attention on CPU: the op (= the SDPA reference) against an independent
per-row float64 softmax, registration (opcheck), fullgraph compile, export, AOTInductor, errors."""

from __future__ import annotations

import math

import pytest
import torch

import custom_ops
from custom_ops import AttentionInputError, decode_attention, decode_attention_reference

# Both sides start from the same dtype-rounded inputs; the op rounds its fp32 result once.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def naive(q, k, v, starts, fill, scale, window=0, softcap=0.0) -> torch.Tensor:
    """Slices each row's valid range and does the softmax in float64: no mask, no SDPA."""
    B, Hq, _, Dh = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    f = min(int(fill), L)
    out = torch.zeros(B, Hq, 1, Dh, dtype=torch.float64)
    for b in range(B):
        lo = max(int(starts[b]), 0, f - window if window > 0 else 0)
        if lo >= f:
            continue
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            kk, vv = k[b, kv, lo:f].double(), v[b, kv, lo:f].double()      # [n, Dh]
            s = (kk @ q[b, h, 0].double()) * scale                         # [n]
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            out[b, h, 0] = torch.softmax(s, 0) @ vv
    return out


def inputs(B, Hq, Hkv, L, Dh, dtype, fill, starts=None):
    q = torch.randn(B, Hq, 1, Dh).to(dtype)
    k = torch.randn(B, Hkv, L, Dh).to(dtype)
    v = torch.randn(B, Hkv, L, Dh).to(dtype)
    if starts is None:
        starts = torch.randint(0, max(L // 3, 1), (B,))                 # left padding
    return q, k, v, torch.as_tensor(starts, dtype=torch.int64), torch.tensor(fill)


def check(args, scale, window=0, softcap=0.0) -> torch.Tensor:
    q = args[0]
    out = decode_attention(*args, scale, window, softcap)
    assert out.shape == q.shape and out.dtype == q.dtype
    want = naive(*args, scale, window, softcap)
    torch.testing.assert_close(out.double(), want, rtol=TOL[q.dtype], atol=TOL[q.dtype])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv", [(12, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("Dh", [64, 128])
def test_matches_independent_softmax(fresh_seed, dtype, Hq, Hkv, Dh) -> None:
    L = 53
    for fill in (0, 1, L - 1, L):
        args = inputs(3, Hq, Hkv, L, Dh, dtype, fill)
        out = check(args, Dh ** -0.5)
        if fill == 0:
            assert not out.any(), "fill 0: every row is empty, output exactly 0"


@pytest.mark.parametrize("Dh", [256, 96, 80])
def test_other_head_sizes(fresh_seed, Dh) -> None:
    check(inputs(3, 8, 2, 40, Dh, torch.bfloat16, 33), Dh ** -0.5)


def test_left_padding_empty_rows_and_windows(fresh_seed) -> None:
    L = 64
    args = inputs(3, 12, 2, L, 64, torch.float32, 20, starts=[0, 7, 20])
    out = check(args, 0.125)
    assert not out[2].any() and out[:2].abs().sum() > 0, "row 2 starts at the fill: empty"
    for window in (1, 5, 13, 100):
        out = check(args, 0.125, window=window)
        if window == 1:       # only the current slot: softmax of one score is 1
            torch.testing.assert_close(out[:2, :, 0], args[2][:2, :, 19].repeat_interleave(6, 1))
    # A window drops old slots: changing a slot outside it changes nothing.
    q, k, v, starts, fill = args
    k2 = k.clone()
    k2[:, :, :10] = 100.0
    torch.testing.assert_close(decode_attention(q, k2, v, starts, fill, 0.125, 10),
                               decode_attention(q, k, v, starts, fill, 0.125, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap(fresh_seed, dtype) -> None:
    args = inputs(3, 4, 1, 30, 64, dtype, 25)
    a = check(args, 1.0, softcap=2.0)           # scale 1: raw scores ~8, well past the cap
    b = check(args, 1.0)
    assert (a.float() - b.float()).abs().max() > 1e-2, "soft-capping must matter here"
    check(args, 1.0, window=6, softcap=30.0)


def test_reference_masks_like_the_op_and_fill_past_capacity(fresh_seed) -> None:
    args = inputs(2, 4, 2, 16, 32, torch.float32, 16)
    past = (*args[:4], torch.tensor([40]))      # fill > L reads as L; [1] shape accepted
    torch.testing.assert_close(decode_attention(*past, 0.2), decode_attention(*args, 0.2))
    negative = (*args[:3], torch.tensor([-3, 2]), args[4])
    torch.testing.assert_close(decode_attention_reference(*negative, 0.2),
                               naive(*negative, 0.2).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck(fresh_seed, dtype) -> None:
    args = inputs(3, 12, 2, 24, 64, dtype, 17)
    torch.library.opcheck(torch.ops.flashhead.decode_attention.default, (*args, 0.125))
    torch.library.opcheck(torch.ops.flashhead.decode_attention.default, (*args, 0.125, 5, 30.0))


class Layers(torch.nn.Module):
    """Two 'layers' reading two caches, the fill and starts as buffers (a decode step's shape)."""

    def __init__(self, args) -> None:
        super().__init__()
        q, k, v, starts, fill = args
        for i in range(2):
            self.register_buffer(f"k{i}", k.clone())
            self.register_buffer(f"v{i}", v.clone())
        self.register_buffer("starts", starts)
        self.register_buffer("fill", fill)

    def forward(self, q):
        h = torch.ops.flashhead.decode_attention(q, self.k0, self.v0, self.starts, self.fill, 0.1)
        return torch.ops.flashhead.decode_attention(h * 2, self.k1, self.v1, self.starts,
                                                    self.fill, 0.1, 7)


def test_fullgraph_compile_and_export_one_node_per_layer(fresh_seed) -> None:
    args = inputs(3, 12, 2, 40, 64, torch.float32, 30)
    model = Layers(args)
    q = args[0]
    eager = model(q)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(q), eager)
    model.fill.fill_(12)                       # the fill is data: same graph, new result
    torch.testing.assert_close(compiled(q), model(q))
    model.fill.fill_(30)

    ep = torch.export.export(model, (q,))
    nodes = [n for n in ep.graph.nodes if n.target is torch.ops.flashhead.decode_attention.default]
    assert len(nodes) == 2
    torch.testing.assert_close(ep.module()(q), eager)


@pytest.mark.slow
def test_aoti_cpu_package(fresh_seed, tmp_path) -> None:
    args = inputs(3, 12, 2, 40, 64, torch.float32, 30)
    model = Layers(args)
    q = args[0]
    ep = torch.export.export(model, (q,))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "a.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    torch.testing.assert_close(loaded(q), model(q))


def test_bad_inputs_raise_documented_errors() -> None:
    q, k, v, starts, fill = inputs(2, 4, 2, 8, 16, torch.float32, 3)

    def call(*a, **kw):
        base = dict(q=q, k_cache=k, v_cache=v, starts=starts, fill=fill, scale=0.25)
        base.update(kw)
        return decode_attention(**base)

    with pytest.raises(AttentionInputError, match=r"\[B, Hq, 1, Dh\]"):
        call(q=torch.randn(2, 4, 2, 16))
    with pytest.raises(AttentionInputError, match="same B and Dh"):
        call(q=torch.randn(2, 4, 1, 8))
    with pytest.raises(AttentionInputError, match="cache's dtype"):
        call(q=q.half())
    with pytest.raises(AttentionInputError, match="multiple of kv heads"):
        call(q=torch.randn(2, 3, 1, 16))
    with pytest.raises(AttentionInputError, match="both be"):
        call(v_cache=v[:, :1])
    with pytest.raises(AttentionInputError, match="share one of"):
        call(k_cache=k.double(), v_cache=v.double(), q=q.double())
    with pytest.raises(AttentionInputError, match="contiguous"):
        call(k_cache=k.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(AttentionInputError, match="starts must be int64"):
        call(starts=starts.int())
    with pytest.raises(AttentionInputError, match="fill must be one int64"):
        call(fill=torch.tensor([3, 3]))
    with pytest.raises(AttentionInputError, match="window must be"):
        call(window=-1)
    with pytest.raises(AttentionInputError, match="softcap must be"):
        call(softcap=math.nan)
    with pytest.raises(AttentionInputError, match="head size"):
        big = torch.randn(1, 1, 2, 264)
        call(q=torch.randn(1, 1, 1, 264), k_cache=big, v_cache=big, starts=starts[:1])
    assert issubclass(AttentionInputError, ValueError)


def test_front_is_exported() -> None:
    assert {"decode_attention", "AttentionInputError", "rope_kv_write"} <= set(custom_ops.__all__)
