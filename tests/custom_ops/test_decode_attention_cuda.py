"""flashhead::decode_attention and flashhead::rope_kv_write on CUDA (the Triton kernels) against
the PyTorch references: bf16/fp16 (fp32 once), B in {1, 16, 64}, fills up to 32K, GQA head tiles,
CUDA-graph capture replayed while the fill grows, torch.compile (reduce-overhead).

Runs on the GPU machine:  pytest -m cuda tests/custom_ops/test_decode_attention_cuda.py
Outputs and partials are poisoned (NaN) so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

import custom_ops  # noqa: F401  (registers the ops)
from custom_ops import counters
from custom_ops import decode_attention_triton as dat
from custom_ops import rope_cache_triton
from custom_ops.decode_attention import decode_attention_reference
from custom_ops.rope_cache import rope_kv_write_reference

pytestmark = pytest.mark.cuda
# p is rounded to the cache dtype for P @ V (as in FlashAttention) and the output once.
ATOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def poisoned_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(dat, "_empty", poisoned_empty)
    monkeypatch.setattr(rope_cache_triton, "_empty", poisoned_empty)


def reference(q, k, v, starts, fill, scale, window=0, softcap=0.0):
    """The fp32 reference row by row on the GPU, over the slots below the fill only (the rest is
    masked anyway), so 32K-slot caches fit."""
    f = max(min(int(fill), k.shape[2]), 1)
    rows = [decode_attention_reference(q[b:b + 1], k[b:b + 1, :, :f].contiguous(),
                                       v[b:b + 1, :, :f].contiguous(), starts[b:b + 1], fill,
                                       scale, window, softcap) for b in range(q.shape[0])]
    return torch.cat(rows)


def draw(B, Hq, Hkv, L, Dh, dtype):
    q = (2 * torch.randn(B, Hq, 1, Dh, device="cuda")).to(dtype)   # peaky softmax
    k = torch.randn(B, Hkv, L, Dh, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, L, Dh, device="cuda", dtype=dtype)
    starts = torch.randint(0, 100, (B,), device="cuda")
    starts[0] = 0
    return q, k, v, starts


def check(q, k, v, starts, fill, window=0, softcap=0.0, **kw):
    Dh = q.shape[-1]
    fill_t = torch.tensor(fill, device="cuda")
    got = (dat.triton_decode_attention(q, k, v, starts, fill_t, Dh ** -0.5, window, softcap, **kw)
           if kw else torch.ops.flashhead.decode_attention(q, k, v, starts, fill_t, Dh ** -0.5,
                                                           window, softcap))
    want = reference(q, k, v, starts, fill_t, Dh ** -0.5, window, softcap)
    assert got.dtype == q.dtype and got.shape == q.shape
    tol = ATOL[q.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L", [(1, 32768), (16, 32768), (64, 4096)])
@pytest.mark.parametrize("Hq,Hkv,Dh", [(12, 2, 128), (4, 1, 256)])
def test_matches_reference(fresh_seed, dtype, B, L, Hq, Hkv, Dh) -> None:
    q, k, v, starts = draw(B, Hq, Hkv, L, Dh, dtype)
    for fill in (0, 1, 99, 128, 1000, 4095, 8192, L - 1, L):
        if fill <= L:
            out = check(q, k, v, starts, fill)
            if fill == 0:
                assert not out.any()


@pytest.mark.parametrize("Hq,Hkv,Dh", [(40, 2, 96), (32, 8, 64), (14, 2, 80), (8, 8, 128)])
def test_other_heads_and_sizes(fresh_seed, Hq, Hkv, Dh) -> None:
    q, k, v, starts = draw(5, Hq, Hkv, 3000, Dh, torch.bfloat16)   # 40/2: two head tiles
    for fill in (1, 700, 3000):
        check(q, k, v, starts, fill)


def test_fp32_windows_softcap_and_empty_rows(fresh_seed) -> None:
    q, k, v, starts = draw(4, 12, 2, 5000, 128, torch.float32)
    starts[3] = 4000                                        # empty while fill <= 4000
    for fill, window, softcap in ((3000, 0, 0.0), (3000, 512, 0.0), (5000, 0, 50.0),
                                  (4999, 4096, 30.0), (4000, 0, 0.0)):
        out = check(q, k, v, starts, fill, window, softcap)
        if fill <= 4000:
            assert not out[3].any()


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_split_counts_and_counters_left_zero(fresh_seed, splits) -> None:
    q, k, v, starts = draw(3, 12, 2, 16384, 128, torch.bfloat16)
    blk = dat.DecodeBlocks(splits, 64, 128, 64, 4, 2)
    for fill in (64, 3000, 16384):
        first = check(q, k, v, starts, fill, blocks=blk)
        assert torch.equal(first, check(q, k, v, starts, fill, blocks=blk)), "deterministic"
    assert not counters.POOL[q.device].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graph_replays_while_fill_grows(fresh_seed, dtype) -> None:
    L = 32768
    q, k, v, starts = draw(16, 12, 2, L, 128, dtype)
    fill = torch.tensor(1, device="cuda")
    out = torch.empty_like(q)

    def step():
        out.copy_(torch.ops.flashhead.decode_attention(q, k, v, starts, fill, 128 ** -0.5))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                       # compile + counters outside capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for f in (1, 2, 100, 129, 1000, 8192, 20000, L - 1, L):
        fill.fill_(f)
        q.copy_(2 * torch.randn_like(q))
        graph.replay()
        want = reference(q, k, v, starts, fill, 128 ** -0.5)
        torch.testing.assert_close(out.float(), want.float(), rtol=ATOL[dtype], atol=ATOL[dtype])
    assert not counters.POOL[q.device].any()


def test_compiled_reduce_overhead(fresh_seed) -> None:
    q, k, v, starts = draw(16, 12, 2, 8192, 128, torch.bfloat16)
    fill = torch.tensor(10, device="cuda")
    for t in (k, v, starts, fill):
        torch._dynamo.mark_static_address(t)

    def attn(q):
        return torch.ops.flashhead.decode_attention(q, k, v, starts, fill, 128 ** -0.5) * 1.0

    compiled = torch.compile(attn, mode="reduce-overhead", fullgraph=True)
    for f in (10, 11, 500, 8000, 8192):
        fill.fill_(f)
        got = compiled(q).clone()
        torch.testing.assert_close(got.float(),
                                   reference(q, k, v, starts, fill, 128 ** -0.5).float(),
                                   rtol=ATOL[q.dtype], atol=ATOL[q.dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,Hq,Hkv,Dh", [(1, 12, 2, 128), (16, 4, 1, 256), (64, 16, 8, 64)])
def test_rope_kv_write_matches_reference(fresh_seed, dtype, B, Hq, Hkv, Dh) -> None:
    L = 4096
    qkv = torch.randn(B, (Hq + 2 * Hkv) * Dh, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, L, Dh, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    starts = torch.randint(0, 50, (B,), device="cuda")
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, Dh, 2, device="cuda").float() / Dh))
    w = torch.randn(Dh, device="cuda", dtype=dtype) * 0.3
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    for fill, norms, offset in ((3000, (None, None), 0.0), (4096, (w, w), 1.0), (1, (w, None), 0.0),
                                (0, (None, None), 0.0), (4097, (None, w), 0.0)):
        fill_t = torch.tensor(fill, device="cuda")
        k2, v2 = k.clone(), v.clone()
        got = torch.ops.flashhead.rope_kv_write(qkv, k, v, starts, fill_t, inv_freq, 0.9, Hq,
                                                *norms, 1e-6, offset)
        want = rope_kv_write_reference(qkv, k2, v2, starts, fill_t, inv_freq, 0.9, Hq, *norms,
                                       1e-6, offset)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(k.float(), k2.float(), rtol=tol, atol=tol)
        assert torch.equal(v, v2)


def test_rope_then_attention_in_one_graph(fresh_seed) -> None:
    B, Hq, Hkv, L, Dh = 16, 12, 2, 32768, 128
    dt = torch.bfloat16
    k = torch.zeros(B, Hkv, L, Dh, device="cuda", dtype=dt)
    v = torch.zeros_like(k)
    starts = torch.zeros(B, dtype=torch.int64, device="cuda")
    fill = torch.tensor(0, device="cuda")
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, Dh, 2, device="cuda").float() / Dh))
    qkv = torch.randn(B, (Hq + 2 * Hkv) * Dh, device="cuda", dtype=dt)
    out = torch.empty(B, Hq, 1, Dh, device="cuda", dtype=dt)

    def step():
        fill.add_(1)
        q = torch.ops.flashhead.rope_kv_write(qkv, k, v, starts, fill, inv_freq, 1.0, Hq)
        out.copy_(torch.ops.flashhead.decode_attention(q, k, v, starts, fill, Dh ** -0.5))

    step()                                  # eager warm-up: slot 0 written, fill 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):           # recorded, not run
        step()
    k_ref, v_ref = k.clone(), v.clone()
    for i in range(20):
        qkv.copy_(torch.randn_like(qkv))
        graph.replay()
        f = torch.tensor(2 + i, device="cuda")
        q = rope_kv_write_reference(qkv, k_ref, v_ref, starts, f, inv_freq, 1.0, Hq)
        want = reference(q, k_ref, v_ref, starts, f, Dh ** -0.5)
        assert int(fill) == 2 + i
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
