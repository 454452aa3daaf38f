"""flashhead::rope_kv_write on CPU: against transformers' own rotary / RMSNorm functions (fp32),
the cache writes (one slot per row, nothing else touched), opcheck, compile, export, errors."""

from __future__ import annotations

import pytest
import torch

from custom_ops import AttentionInputError, rope_kv_write, rope_kv_write_reference

TOL = 2e-6     # fp32 against transformers' fp32 functions


def rotary(kind: str, Dh: int):
    """A transformers rotary module: default (Qwen3), llama3 frequencies, or yarn (whose
    attention_scaling is not 1)."""
    from transformers import LlamaConfig, Qwen3Config
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    if kind == "default":
        return Qwen3RotaryEmbedding(Qwen3Config(head_dim=Dh, hidden_size=2 * Dh,
                                                num_attention_heads=2, num_key_value_heads=1))
    params = {"llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64),
              "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                           original_max_position_embeddings=64)}[kind]
    cfg = LlamaConfig(hidden_size=2 * Dh, num_attention_heads=2, head_dim=Dh,
                      max_position_embeddings=4096, rope_parameters=params)
    return LlamaRotaryEmbedding(cfg)


def setup(B, Hq, Hkv, L, Dh, dtype, fill, starts):
    qkv = torch.randn(B, (Hq + 2 * Hkv) * Dh).to(dtype)
    k = torch.randn(B, Hkv, L, Dh).to(dtype)
    v = torch.randn(B, Hkv, L, Dh).to(dtype)
    return qkv, k, v, torch.tensor(starts, dtype=torch.int64), torch.tensor(fill)


def transformers_step(qkv, rot, Hq, Hkv, Dh, pos, q_norm=None, k_norm=None):
    """q, k [B, H, 1, Dh] as transformers makes them: its RMSNorm modules, then its rotary."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    B = qkv.shape[0]
    heads = qkv.view(B, 1, Hq + 2 * Hkv, Dh)
    q, k = heads[:, :, :Hq], heads[:, :, Hq:Hq + Hkv]
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    cos, sin = rot(qkv, pos[:, None])                                    # [B, 1, Dh]
    return apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


@pytest.mark.parametrize("kind", ["default", "llama3", "yarn"])
@pytest.mark.parametrize("norm", [None, "qwen3", "gemma3"])
def test_matches_transformers_fp32(fresh_seed, kind, norm) -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    B, Hq, Hkv, L, Dh = 3, 12, 2, 700, 64
    qkv, k, v, starts, fill = setup(B, Hq, Hkv, L, Dh, torch.float32, 650, [0, 5, 600])
    rot = rotary(kind, Dh)
    q_norm = k_norm = None
    offset = 0.0
    if norm is not None:
        cls, offset = (Qwen3RMSNorm, 0.0) if norm == "qwen3" else (Gemma3RMSNorm, 1.0)
        q_norm, k_norm = cls(Dh, eps=1e-6), cls(Dh, eps=1e-6)
        with torch.no_grad():
            q_norm.weight.normal_(1.0 - offset, 0.3)
            k_norm.weight.normal_(1.0 - offset, 0.3)
    k0, v0 = k.clone(), v.clone()
    q_out = rope_kv_write(qkv, k, v, starts, fill, rot.inv_freq, rot.attention_scaling, Hq,
                          q_norm and q_norm.weight.detach(), k_norm and k_norm.weight.detach(),
                          1e-6, offset)
    want_q, want_k = transformers_step(qkv, rot, Hq, Hkv, Dh, fill - 1 - starts, q_norm, k_norm)
    torch.testing.assert_close(q_out, want_q, rtol=TOL, atol=TOL)
    torch.testing.assert_close(k[:, :, 649:650], want_k, rtol=TOL, atol=TOL)
    v_new = qkv.view(B, Hq + 2 * Hkv, Dh)[:, Hq + Hkv:]
    assert torch.equal(v[:, :, 649], v_new)
    untouched = torch.ones(L, dtype=torch.bool)
    untouched[649] = False
    assert torch.equal(k[:, :, untouched], k0[:, :, untouched])
    assert torch.equal(v[:, :, untouched], v0[:, :, untouched])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_a_rounding_of_transformers(fresh_seed, dtype) -> None:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    B, Hq, Hkv, L, Dh = 3, 4, 1, 40, 128
    qkv, k, v, starts, fill = setup(B, Hq, Hkv, L, Dh, dtype, 30, [0, 2, 9])
    rot = rotary("default", Dh)
    norm = Qwen3RMSNorm(Dh)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    norm = norm.to(dtype)
    q_out = rope_kv_write(qkv, k, v, starts, fill, rot.inv_freq, 1.0, Hq, norm.weight.detach(),
                          norm.weight.detach())
    want_q, want_k = transformers_step(qkv, rot, Hq, Hkv, Dh, fill - 1 - starts, norm, norm)
    # transformers rounds after the norm, uses cos / sin rounded to the dtype and rounds each
    # product: a few ulps of the result (eps relative, plus eps absolute near 0).
    for got, want in ((q_out, want_q), (k[:, :, 29:30], want_k)):
        err = (got.float() - want.float()).abs()
        assert (err <= 4 * torch.finfo(dtype).eps * (want.float().abs() + 1)).all(), err.max()


@pytest.mark.parametrize("fill", [0, 41, 1, 40])
def test_slot_out_of_range_writes_nothing(fresh_seed, fill) -> None:
    qkv, k, v, starts, fill_t = setup(2, 4, 2, 40, 32, torch.float32, fill, [0, 3])
    inv_freq = rotary("default", 32).inv_freq
    k0, v0 = k.clone(), v.clone()
    q_out = rope_kv_write(qkv, k, v, starts, fill_t, inv_freq, 1.0, 4)
    assert q_out.shape == (2, 4, 1, 32) and q_out.isfinite().all()
    changed = (k != k0).any(-1).any(1).any(0)                            # [L] slots written
    if 1 <= fill <= 40:
        assert changed.nonzero().flatten().tolist() == [fill - 1]
        assert (v != v0).any(-1).any(1).any(0).nonzero().flatten().tolist() == [fill - 1]
    else:
        assert not changed.any() and torch.equal(v, v0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(fresh_seed, dtype) -> None:
    args = setup(3, 12, 2, 16, 64, dtype, 9, [0, 1, 4])
    inv_freq = rotary("default", 64).inv_freq
    w = torch.randn(64).to(dtype)
    torch.library.opcheck(torch.ops.flashhead.rope_kv_write.default,
                          (*args, inv_freq, 1.0, 12))
    torch.library.opcheck(torch.ops.flashhead.rope_kv_write.default,
                          (*args, inv_freq, 0.9, 12, w, w, 1e-5, 1.0))


class Step(torch.nn.Module):
    """Cache, fill and starts as buffers, as in a decode step; the fill advances in the graph."""

    def __init__(self, L: int = 24) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(3, 2, L, 64))
        self.register_buffer("v", torch.zeros(3, 2, L, 64))
        self.register_buffer("starts", torch.tensor([0, 2, 5]))
        self.register_buffer("fill", torch.tensor(4))
        self.register_buffer("inv_freq", rotary("default", 64).inv_freq.clone())

    def forward(self, qkv):
        self.fill.add_(1)
        q = torch.ops.flashhead.rope_kv_write(qkv, self.k, self.v, self.starts, self.fill,
                                              self.inv_freq, 1.0, 4)
        return torch.ops.flashhead.decode_attention(q, self.k, self.v, self.starts, self.fill,
                                                    0.125)


def test_fullgraph_compile_mutates_buffers_and_export_round_trip(fresh_seed) -> None:
    eager, compiled_step = Step(), Step()
    compiled = torch.compile(compiled_step, fullgraph=True)
    for _ in range(3):
        qkv = torch.randn(3, 8 * 64)
        torch.testing.assert_close(compiled(qkv), eager(qkv))
    assert int(compiled_step.fill) == 7 and compiled_step.k[:, :, 4:7].abs().sum() > 0
    torch.testing.assert_close(compiled_step.k, eager.k)
    torch.testing.assert_close(compiled_step.v, eager.v)

    exported_step = Step()
    ep = torch.export.export(exported_step, (torch.randn(3, 8 * 64),))
    targets = [n.target for n in ep.graph.nodes]
    assert targets.count(torch.ops.flashhead.rope_kv_write.default) == 1, targets
    module, fresh = ep.module(), Step()
    for _ in range(2):
        qkv = torch.randn(3, 8 * 64)
        torch.testing.assert_close(module(qkv), fresh(qkv))
    torch.testing.assert_close(module.k, fresh.k)
    assert int(module.fill) == 6


def test_bad_inputs_raise_documented_errors() -> None:
    qkv, k, v, starts, fill = setup(2, 4, 2, 8, 16, torch.float32, 3, [0, 0])
    inv = torch.ones(8)

    def call(**kw):
        base = dict(qkv=qkv, k_cache=k, v_cache=v, starts=starts, fill=fill, inv_freq=inv,
                    attn_scaling=1.0, num_q_heads=4)
        base.update(kw)
        return rope_kv_write(**base)

    with pytest.raises(AttentionInputError, match=r"qkv must be \[B, \(Hq \+ 2 \* Hkv\) \* Dh\]"):
        call(qkv=torch.randn(2, 100))
    with pytest.raises(AttentionInputError, match="multiple of the cache's 2 kv heads"):
        call(num_q_heads=3)
    with pytest.raises(AttentionInputError, match="inv_freq must be fp32"):
        call(inv_freq=torch.ones(16))
    with pytest.raises(AttentionInputError, match="q_norm must be"):
        call(q_norm=torch.ones(8))
    with pytest.raises(AttentionInputError, match="cache's dtype"):
        call(qkv=qkv.half())
    with pytest.raises(AttentionInputError, match="even head size"):
        odd = torch.zeros(2, 2, 8, 15)
        call(k_cache=odd, v_cache=odd.clone(), qkv=torch.randn(2, 8 * 15), inv_freq=torch.ones(7))
    with pytest.raises(AttentionInputError, match="starts must be int64"):
        call(starts=starts.int())
    with pytest.raises(AttentionInputError, match="contiguous"):
        call(qkv=torch.randn(2 * 128).view(128, 2).t())


def test_reference_is_the_cpu_kernel(fresh_seed) -> None:
    qkv, k, v, starts, fill = setup(2, 4, 2, 8, 16, torch.float32, 5, [0, 1])
    k2, v2 = k.clone(), v.clone()
    inv = rotary("default", 16).inv_freq
    a = rope_kv_write(qkv, k, v, starts, fill, inv, 1.0, 4)
    b = rope_kv_write_reference(qkv, k2, v2, starts, fill, inv, 1.0, 4)
    assert torch.equal(a, b) and torch.equal(k, k2) and torch.equal(v, v2)
