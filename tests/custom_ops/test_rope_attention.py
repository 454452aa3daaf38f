"""flashhead::rope_decode_attention on CPU: equal to rope_kv_write then decode_attention (the ops
and the references) on odd shapes, both dtypes, fills at the edges, left padding, windows,
soft-capping, q/k norms; the caches as the rope op leaves them; opcheck, a fullgraph compile, an
export round trip with one node, errors."""

from __future__ import annotations

import pytest
import torch

from custom_ops import (AttentionInputError, rope_decode_attention,
                        rope_decode_attention_reference)

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


def inv_freq(Dh: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, Dh, 2).float() / Dh))


def setup(B, Hq, Hkv, L, Dh, dtype, starts):
    qkv = torch.randn(B, (Hq + 2 * Hkv) * Dh).to(dtype)
    k = torch.randn(B, Hkv, L, Dh).to(dtype)
    v = torch.randn(B, Hkv, L, Dh).to(dtype)
    return qkv, k, v, torch.tensor(starts, dtype=torch.int64)


def unfused(qkv, k, v, starts, fill, freq, scaling, Hq, qn, kn, eps, offset, scale, window,
            softcap):
    q = torch.ops.flashhead.rope_kv_write(qkv, k, v, starts, fill, freq, scaling, Hq, qn, kn, eps,
                                          offset)
    return torch.ops.flashhead.decode_attention(q, k, v, starts, fill, scale, window, softcap)


# (Hq, Hkv, Dh, q/k norms with norm_offset, window, softcap): Qwen-like GQA, MHA, Gemma-like.
CASES = [(12, 2, 64, None, 0, 0.0), (4, 4, 128, None, 5, 0.0), (4, 1, 256, 1.0, 7, 30.0),
         (4, 1, 256, 0.0, 0, 0.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,Dh,offset,window,softcap", CASES)
def test_equals_rope_then_attention(fresh_seed, dtype, Hq, Hkv, Dh, offset, window,
                                    softcap) -> None:
    B, L = 3, 19
    qkv, k, v, starts = setup(B, Hq, Hkv, L, Dh, dtype, [0, 3, 17])    # left padding
    norms = (None, None)
    if offset is not None:
        norms = tuple((torch.randn(Dh) * 0.3 + 1.0 - offset).to(dtype) for _ in range(2))
    freq, scale = inv_freq(Dh), Dh ** -0.5
    for fill in (1, 2, L - 1, L):
        args = (starts, torch.tensor(fill), freq, 0.9, Hq, *norms, 1e-6, offset or 0.0)
        k1, v1, k2, v2, k3, v3 = k.clone(), v.clone(), k.clone(), v.clone(), k.clone(), v.clone()
        got = rope_decode_attention(qkv, k1, v1, *args, scale=scale, window=window,
                                    softcap=softcap)
        want = unfused(qkv, k2, v2, *args, scale, window, softcap)
        assert got.dtype == dtype and got.shape == (B, Hq, 1, Dh)
        assert torch.equal(got, want), "the CPU kernel is the two ops' CPU kernels in turn"
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
        ref = rope_decode_attention_reference(qkv, k3, v3, *args, scale, window, softcap)
        torch.testing.assert_close(got, ref, rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(k1, k3) and torch.equal(v1, v3)
        changed = (k1 != k).any(-1).any(1).any(0).nonzero().flatten().tolist()   # [L] slots
        assert changed == [fill - 1], "the new k goes to slot fill - 1 only"
        if fill <= 17:
            assert not got[2].any(), "row 2 starts at slot 17: nothing to attend yet"


@pytest.mark.parametrize("fill", [0, 20, 25])
def test_fill_outside_the_cache(fresh_seed, fill) -> None:
    """fill 0: nothing written, output 0; fill > L: nothing written, attention over all L."""
    qkv, k, v, starts = setup(3, 4, 2, 20, 32, torch.float32, [0, 1, 2])
    k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
    args = (starts, torch.tensor(fill), inv_freq(32), 1.0, 4)
    got = rope_decode_attention(qkv, k1, v1, *args, scale=0.2)
    assert torch.equal(got, unfused(qkv, k2, v2, *args, None, None, 1e-6, 0.0, 0.2, 0, 0.0))
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    if fill != 20:
        assert torch.equal(k1, k) and torch.equal(v1, v)
    if fill == 0:
        assert not got.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(fresh_seed, dtype) -> None:
    qkv, k, v, starts = setup(3, 12, 2, 16, 64, dtype, [0, 1, 4])
    w = torch.randn(64).to(dtype)
    op = torch.ops.flashhead.rope_decode_attention.default
    torch.library.opcheck(op, (qkv, k, v, starts, torch.tensor(9), inv_freq(64), 1.0, 12, None,
                               None, 1e-6, 0.0, 0.125, 0, 0.0, None))
    torch.library.opcheck(op, (qkv, k, v, starts, torch.tensor([16]), inv_freq(64), 0.9, 12, w,
                               w, 1e-5, 1.0, 0.125, 4, 20.0,
                               torch.zeros(64, dtype=torch.int32)))


class Step(torch.nn.Module):
    """Cache, fill and starts as buffers, as in a decode step; the fill advances in the graph."""

    def __init__(self, L: int = 24) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(3, 2, L, 64))
        self.register_buffer("v", torch.zeros(3, 2, L, 64))
        self.register_buffer("starts", torch.tensor([0, 2, 5]))
        self.register_buffer("fill", torch.tensor(4))
        self.register_buffer("inv_freq", inv_freq(64))
        self.register_buffer("norm", torch.linspace(0.5, 1.5, 64))
        self.register_buffer("counters", torch.zeros(16, dtype=torch.int32))

    def forward(self, qkv):
        self.fill.add_(1)
        return torch.ops.flashhead.rope_decode_attention(
            qkv, self.k, self.v, self.starts, self.fill, self.inv_freq, 1.0, 4, self.norm,
            self.norm, 1e-6, 0.0, 0.125, 3, 0.0, self.counters)


def test_fullgraph_compile_and_export_round_trip(fresh_seed) -> None:
    eager, compiled_step = Step(), Step()
    compiled = torch.compile(compiled_step, fullgraph=True)
    for _ in range(3):
        qkv = torch.randn(3, 8 * 64)
        torch.testing.assert_close(compiled(qkv), eager(qkv))
    assert int(compiled_step.fill) == 7 and compiled_step.k[:, :, 4:7].abs().sum() > 0
    torch.testing.assert_close(compiled_step.k, eager.k)
    torch.testing.assert_close(compiled_step.v, eager.v)

    ep = torch.export.export(Step(), (torch.randn(3, 8 * 64),))
    targets = [n.target for n in ep.graph.nodes]
    assert targets.count(torch.ops.flashhead.rope_decode_attention.default) == 1, targets
    module, fresh = ep.module(), Step()
    for _ in range(2):
        qkv = torch.randn(3, 8 * 64)
        torch.testing.assert_close(module(qkv), fresh(qkv))
    torch.testing.assert_close(module.k, fresh.k)
    torch.testing.assert_close(module.v, fresh.v)
    assert int(module.fill) == 6


def test_bad_inputs_raise_documented_errors() -> None:
    qkv, k, v, starts = setup(2, 4, 2, 8, 16, torch.float32, [0, 0])

    def call(**kw):
        base = dict(qkv=qkv, k_cache=k, v_cache=v, starts=starts, fill=torch.tensor(3),
                    inv_freq=torch.ones(8), attn_scaling=1.0, num_q_heads=4, scale=0.25)
        base.update(kw)
        return rope_decode_attention(**base)

    with pytest.raises(AttentionInputError, match=r"qkv must be \[B, \(Hq \+ 2 \* Hkv\) \* Dh\]"):
        call(qkv=torch.randn(2, 100))
    with pytest.raises(AttentionInputError, match="multiple of the cache's 2 kv heads"):
        call(num_q_heads=3)
    with pytest.raises(AttentionInputError, match="inv_freq must be fp32"):
        call(inv_freq=torch.ones(16))
    with pytest.raises(AttentionInputError, match="k_norm must be"):
        call(k_norm=torch.ones(8))
    with pytest.raises(AttentionInputError, match="window must be an int >= 0"):
        call(window=-1)
    with pytest.raises(AttentionInputError, match="softcap must be >= 0"):
        call(softcap=-1.0)
    with pytest.raises(AttentionInputError, match="scale must be > 0"):
        call(scale=0.0)
    with pytest.raises(AttentionInputError, match="head size must be in"):
        big = torch.zeros(2, 2, 8, 258)
        call(k_cache=big, v_cache=big.clone(), qkv=torch.randn(2, 8 * 258),
             inv_freq=torch.ones(129))
