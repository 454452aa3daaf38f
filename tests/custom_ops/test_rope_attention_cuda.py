"""flashhead::rope_decode_attention on CUDA (the fused Triton kernel) against the unfused Triton
ops (rope_kv_write, then decode_attention): bf16/fp16, B in {1, 16}, fills up to 32K, Qwen-like
GQA and Gemma shapes (q/k norms, windows, soft-capping), two head tiles, split counts up to 64
(the cache writer a middle split), CUDA-graph capture replayed while the fill grows, a compiled
step (reduce-overhead); the caller's counters are all zero after every call.

Runs on the GPU machine:  pytest -m cuda tests/custom_ops/test_rope_attention_cuda.py
Outputs and partials are poisoned (NaN) so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

import custom_ops  # noqa: F401  (registers the ops)
from custom_ops import counters
from custom_ops import decode_attention_triton as dat
from custom_ops import rope_attention_triton as rat
from custom_ops import rope_cache_triton

pytestmark = pytest.mark.cuda
# The fused kernel adds the new slot to the softmax outside the block loop (another summation
# order) and may round q / k one ulp apart (another RMS reduction order): within the unfused
# kernel's own tolerance against the fp32 reference.
ATOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
K_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def poisoned_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    for module in (dat, rat, rope_cache_triton):
        monkeypatch.setattr(module, "_empty", poisoned_empty)


class Layer:
    """One attention layer's inputs: caches (two copies: fused / unfused), rotary, norms."""

    def __init__(self, B, Hq, Hkv, L, Dh, dtype, norm_offset=None, window=0, softcap=0.0):
        self.Hq, self.Dh, self.dtype = Hq, Dh, dtype
        self.k = torch.randn(B, Hkv, L, Dh, device="cuda", dtype=dtype)
        self.v = torch.randn_like(self.k)
        self.k2, self.v2 = self.k.clone(), self.v.clone()
        self.starts = torch.randint(0, 100, (B,), device="cuda")
        self.starts[0] = 0
        self.inv_freq = 1.0 / (1e4 ** (torch.arange(0, Dh, 2, device="cuda").float() / Dh))
        norms = (None, None)
        if norm_offset is not None:
            norms = tuple((torch.randn(Dh, device="cuda") * 0.3 + 1.0 - norm_offset).to(dtype)
                          for _ in range(2))
        self.rope = (self.inv_freq, 0.95, Hq, *norms, 1e-6, norm_offset or 0.0)
        self.attn = (Dh ** -0.5, window, softcap)
        self.ws = counters.new_workspace("cuda")

    def qkv(self):
        B, Hkv = self.k.shape[:2]
        return 2 * torch.randn(B, (self.Hq + 2 * Hkv) * self.Dh, device="cuda").to(self.dtype)

    def fused(self, qkv, fill_t, **kw):
        if kw:
            return rat.triton_rope_decode_attention(qkv, self.k, self.v, self.starts, fill_t,
                                                    *self.rope, *self.attn, self.ws, **kw)
        return torch.ops.flashhead.rope_decode_attention(qkv, self.k, self.v, self.starts,
                                                         fill_t, *self.rope, *self.attn, self.ws)

    def unfused(self, qkv, fill_t):
        q = torch.ops.flashhead.rope_kv_write(qkv, self.k2, self.v2, self.starts, fill_t,
                                              *self.rope)
        return torch.ops.flashhead.decode_attention(q, self.k2, self.v2, self.starts, fill_t,
                                                    *self.attn)

    def check(self, got, want):
        assert got.dtype == self.dtype and got.shape == want.shape
        tol = ATOL[self.dtype]
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(self.k.float(), self.k2.float(), rtol=K_TOL[self.dtype],
                                   atol=K_TOL[self.dtype])
        assert torch.equal(self.v, self.v2)
        assert not self.ws.any(), "the last programs leave the counters at zero"

    def step(self, fill, **kw):
        qkv, fill_t = self.qkv(), torch.tensor(fill, device="cuda")
        got = self.fused(qkv, fill_t, **kw)
        self.check(got, self.unfused(qkv, fill_t))
        return got


# Qwen2.5-like GQA; Gemma 3 1B (q/k norms with offset 1, window 512); Gemma 2 (soft-capping,
# window 4096, no q/k norms).
SHAPES = {"qwen": dict(Hq=12, Hkv=2, Dh=128),
          "gemma3": dict(Hq=4, Hkv=1, Dh=256, norm_offset=1.0, window=512),
          "gemma2": dict(Hq=8, Hkv=4, Dh=256, window=4096, softcap=50.0)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_unfused_ops(fresh_seed, dtype, B, shape) -> None:
    L = 32768
    layer = Layer(B, L=L, dtype=dtype, **SHAPES[shape])
    for fill in (0, 1, 2, 99, 128, 1000, 4097, 8192, L - 1, L, L + 1):
        out = layer.step(fill)
        if fill == 0:
            assert not out.any()


@pytest.mark.parametrize("Hq,Hkv,Dh", [(40, 2, 96), (32, 8, 64), (14, 2, 80)])
def test_other_heads_and_sizes(fresh_seed, Hq, Hkv, Dh) -> None:
    """40 / 2: two head tiles per kv head (tile 0 writes the slot, tile 1 must not read it)."""
    layer = Layer(5, Hq, Hkv, 3000, Dh, torch.bfloat16, norm_offset=0.0)
    for fill in (1, 700, 2999, 3000):
        layer.step(fill)


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_split_counts(fresh_seed, splits) -> None:
    """64 splits of >= 64 slots: at fill 3000 the slot's split (the writer) is split 46 of 47
    active ones, a middle split of the grid."""
    layer = Layer(3, 12, 2, 16384, 128, torch.bfloat16)
    blk = dat.DecodeBlocks(splits, 64, 128, 64, 4, 2)
    for fill in (64, 65, 3000, 16383, 16384):
        layer.step(fill, blocks=blk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graph_replays_while_fill_grows(fresh_seed, dtype) -> None:
    B, L = 16, 32768
    layer = Layer(B, 12, 2, L, 128, dtype)
    qkv = layer.qkv()
    fill = torch.tensor(1, device="cuda")
    out = torch.empty(B, 12, 1, 128, device="cuda", dtype=dtype)

    def step():
        fill.add_(1)
        out.copy_(layer.fused(qkv, fill))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):              # compile outside the capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    layer.unfused(qkv, torch.tensor(2, device="cuda"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):                # recorded, not run
        step()
    for f in [3, 4, 5, 100, 129, 1000, 8192, 20000, L - 1, L, L + 1]:
        fill.fill_(f - 1)                        # the step adds the new token
        qkv.copy_(layer.qkv())
        graph.replay()
        assert int(fill) == f
        layer.check(out, layer.unfused(qkv, torch.tensor(f, device="cuda")))


def test_compiled_reduce_overhead(fresh_seed) -> None:
    layer = Layer(16, 4, 1, 8192, 256, torch.bfloat16, norm_offset=1.0, window=512)
    fill = torch.tensor(10, device="cuda")
    for t in (layer.k, layer.v, layer.starts, fill, layer.ws, *layer.rope[:1]):
        torch._dynamo.mark_static_address(t)

    def attn(qkv):
        return layer.fused(qkv, fill) * 1.0

    compiled = torch.compile(attn, mode="reduce-overhead", fullgraph=True)
    for f in (10, 11, 12, 500, 8000, 8192):
        fill.fill_(f)
        qkv = layer.qkv()
        got = compiled(qkv).clone()
        layer.check(got, layer.unfused(qkv, fill))
