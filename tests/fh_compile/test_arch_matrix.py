"""Every architecture through the whole pipeline on CPU: compile_model (fullgraph) + generate must
give transformers' own greedy tokens (FlashHead at probes = K, fp32 tiny models, a batch with one
left-padded row).  The fast forward serves FAST; the others keep transformers' forward and say why.
"""

from __future__ import annotations

import pytest
import torch

import fh_compile
from arch_models import ARCHS, FAST, VOCAB, WINDOW, tiny_arch
from export.modules import _StateAsInputs
from fh_compile.arch import UnsupportedArchitecture
from fh_compile.decode import DecodeStep

PROMPT, NEW = 12, 40     # the prompt alone crosses the sliding window of 8


def prompt_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 5, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                                   # row 1: left padding
    return ids, mask


def hf_greedy(model, ids, mask) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                          pad_token_id=0, eos_token_id=None)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_generate_equals_transformers(arch, tmp_path):
    assert WINDOW < PROMPT
    model = tiny_arch(arch)
    ids, mask = prompt_batch()
    expected = hf_greedy(model, ids, mask)
    K = -(-VOCAB // 16)
    fh_compile.compile_model(model, probes=K, k=4, mode="default", max_batch_size=2,
                             max_cache_len=64, fuse=True, dense_above_rows=2, cache_dir=tmp_path)
    info = model.fh_compiled.info
    out = fh_compile.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(out.sequences, expected)
    assert out.path == "flashhead"
    if arch in FAST:
        assert (info.forward, info.attention, info.fallback) == (
            "fast", "flashhead::rope_decode_attention", None)
    else:   # transformers' forward, with the decode op through its attention interface
        assert info.forward == "hf" and arch in info.fallback
        assert info.attention.startswith("flashhead::decode_attention")


def test_fast_forward_is_refused_with_the_reason():
    with pytest.raises(UnsupportedArchitecture, match="phi3"):
        fh_compile.compile_model(tiny_arch("phi3"), flashhead=False, mode=None, forward="fast",
                                 max_cache_len=32)
    with pytest.raises(ValueError, match="attention='hf'"):
        fh_compile.compile_model(tiny_arch("qwen2"), flashhead=False, mode=None, forward="fast",
                                 attention="hf", max_cache_len=32)


def test_attention_hf_keeps_transformers_forward_and_attention():
    model = tiny_arch("llama")
    ids, mask = prompt_batch(2)
    expected = hf_greedy(model, ids, mask)
    fh_compile.compile_model(model, flashhead=False, mode=None, attention="hf", max_batch_size=2,
                             max_cache_len=64)
    assert (model.fh_compiled.info.forward, model.fh_compiled.info.attention) == ("hf", "sdpa")
    out = fh_compile.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_unfused_decode_kernels_give_the_same_tokens(arch):
    """decode_kernels="ops-unfused" (rope_kv_write + decode_attention, the A/B baseline of the
    fused rope_decode_attention) decodes transformers' greedy tokens too; a bad value is refused."""
    model = tiny_arch(arch)
    ids, mask = prompt_batch(2)
    expected = hf_greedy(model, ids, mask)
    fh_compile.compile_model(model, flashhead=False, mode=None, max_batch_size=2,
                             max_cache_len=64, decode_kernels="ops-unfused")
    assert model.fh_compiled.step.fast.kernels == "ops-unfused"
    out = fh_compile.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(out.sequences, expected)
    with pytest.raises(ValueError, match="decode_kernels must be one of"):
        fh_compile.compile_model(model, flashhead=False, mode=None, decode_kernels="fused")
    with pytest.raises(ValueError, match="kernels must be one of"):   # transformers' forward too
        DecodeStep(tiny_arch("phi3"), max_cache_len=32, forward="hf", kernels="fused")


def test_gemma2_logits_are_soft_capped_like_the_dense_head(tmp_path):
    model = tiny_arch("gemma2")
    cap = model.config.final_logit_softcapping
    ids, mask = prompt_batch(3)
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits[:, -1]          # [B, V], capped by HF
    assert dense.abs().max() <= cap
    fh_compile.compile_model(model, probes=-(-VOCAB // 16), k=8, mode=None, max_batch_size=2,
                             max_cache_len=32, dense_above_rows=2, cache_dir=tmp_path)
    assert model.fh_compiled.info.path == "flashhead"
    top = model.fh_compiled.step.prefill(ids, mask)
    assert torch.equal(top.ids[:, 0], dense.argmax(-1))
    torch.testing.assert_close(top.logits, dense.gather(1, top.ids), rtol=1e-5, atol=1e-5)


def test_fast_forward_shares_weights_and_uncompile_undoes_it(tmp_path):
    model, other = tiny_arch("qwen3"), tiny_arch("qwen3")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    other_ptrs = {n: p.data_ptr() for n, p in other.named_parameters()}
    ids, mask = prompt_batch(4)
    expected = hf_greedy(model, ids, mask)
    fh_compile.compile_model(model, flashhead=False, mode=None, max_batch_size=2, max_cache_len=64)
    fast = model.fh_compiled.step.fast
    q = model.model.layers[0].self_attn.q_proj.weight
    assert fast.shared and q.data_ptr() == fast.layers[0].wqkv.data_ptr()   # one copy in memory
    assert torch.equal(hf_greedy(model, ids, mask), expected)    # transformers' forward unchanged
    fh_compile.uncompile_model(model)
    assert not hasattr(model, "fh_compiled") and not fast.shared
    assert q.data_ptr() != fast.layers[0].wqkv.data_ptr()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert {n: p.data_ptr() for n, p in other.named_parameters()} == other_ptrs
    assert torch.equal(hf_greedy(model, ids, mask), expected)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_transformers_generate_with_flashhead_on_gemma(arch):
    """model.generate (transformers' own loop, sliding-window cache, soft-capping) with the
    FlashHead head swapped in gives the dense head's greedy tokens at probes = K."""
    model = tiny_arch(arch)
    ids, mask = prompt_batch(5)
    expected = hf_greedy(model, ids, mask)
    assets = fh_compile.build_assets(model.get_output_embeddings().weight.detach(),
                                     cluster_size=16, coarse_iters=2, fine_iters=2)
    fh_compile.swap_head(model, assets, probes=assets.num_clusters, k=4, dense_above_rows=2)
    assert torch.equal(hf_greedy(model, ids, mask), expected)


@pytest.mark.parametrize("arch", ["gemma3_text", "mistral"])
def test_transformers_forward_compiles_over_sliding_window_caches(arch):
    """forward='hf' on sliding-window models (the A/B baseline of the fast forward): transformers'
    forward and attention over its ring buffers, compiled, give transformers' greedy tokens.
    The window's fill count, a Python int, becomes dynamic: the step compiles twice, not once a
    step (a third compile would hit the limit, a hard error with fullgraph=True).  CUDA-graph
    modes become their no-graph twins, and transformers' attention replaces the decode op; the
    info says both."""
    model = tiny_arch(arch)
    ids, mask = prompt_batch(6)
    expected = hf_greedy(model, ids, mask)
    fh_compile.compile_model(model, flashhead=False, mode="reduce-overhead", forward="hf",
                             max_batch_size=2, max_cache_len=64)
    info = model.fh_compiled.info
    assert (info.forward, info.attention, info.mode) == ("hf", "sdpa", "default")
    assert "sliding-window" in info.fallback and "'default', not 'reduce-overhead'" in info.fallback
    with torch._dynamo.config.patch(recompile_limit=2):
        out = fh_compile.generate(model, ids, attention_mask=mask, max_new_tokens=NEW,
                                  eos_token_id=[])
    assert torch.equal(out.sequences, expected)
    with pytest.raises(ValueError, match="Python int"):
        _StateAsInputs(model.fh_compiled.step)
    fh_compile.compile_model(model, flashhead=False, mode=None, forward="hf", max_batch_size=2,
                             max_cache_len=64)            # attention="auto": the op cannot serve
    assert model.fh_compiled.info.attention == "sdpa"
    assert "not flashhead::decode_attention" in model.fh_compiled.info.fallback
    out = fh_compile.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(out.sequences, expected)
