"""fh_compile.hf_attention: tiny Qwen2 / Llama / Mistral models decoding over a transformers
StaticCache with the flashhead decode attention give the same greedy tokens as with SDPA (fp32,
48 steps, with and without left padding); one compiled decode step without graph breaks;
sliding-window models are refused; enable / disable restore the instance's implementation.
GPU (marker cuda): the R1-1.5B architecture, 64 greedy steps equal to SDPA's (fp32)."""

from __future__ import annotations

import inspect

import pytest
import torch

import custom_ops  # noqa: F401  (registers torch.ops.flashhead.decode_attention)
from fh_compile import hf_attention

STEPS, L = 48, 80


def tiny(arch: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=275, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=274)
    extra = {"qwen2": {}, "llama": dict(num_attention_heads=8, head_dim=16),
             "mistral": dict(num_key_value_heads=1, head_dim=32, sliding_window=None)}[arch]
    config = AutoConfig.for_model(arch, **{**common, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation="sdpa")
    with torch.no_grad():          # HF's init is tiny (std 0.02); give the logits some spread
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def cache_kw(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"   # 5.24 / 5.17


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, mask: torch.Tensor, ours: bool, steps: int = STEPS,
           max_cache_len: int = L):
    """Prefill, then `steps` one-token decode calls over a StaticCache (as fh_compile.decode
    drives it: a [B, L] padding mask, per-row positions).  Returns (tokens [B, steps + 1],
    last logits [B, V])."""
    from transformers import StaticCache

    config = model.config
    B, T = prompt.shape
    weight = next(model.parameters())
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    heads = config.num_key_value_heads
    dh = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache.early_initialization(B, heads, dh, weight.dtype, weight.device)
    attn = torch.zeros(B, max_cache_len, dtype=torch.int64, device=weight.device)
    attn[:, :T] = mask
    starts = T - mask.sum(1)                                           # [B] left padding
    kw = {cache_kw(model): cache, "use_cache": True}
    out = model(prompt, attention_mask=attn, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                **kw)
    valid = attn.bool()[:, None, :, None]          # as DecodeStep: no NaN left in pad slots
    for layer in cache.layers:
        layer.keys.masked_fill_(~valid, 0)
        layer.values.masked_fill_(~valid, 0)
    tok = out.logits[:, -1].argmax(-1)
    tokens, pos = [tok], mask.sum(1)
    for _ in range(steps):
        fill = cache.layers[0].cumulative_length
        attn[:, int(fill)] = 1
        extra = dict(fh_starts=starts, fh_fill=fill) if ours else {}
        out = model(tok[:, None], attention_mask=attn, position_ids=pos[:, None], **kw, **extra)
        tok = out.logits[:, -1].argmax(-1)
        tokens.append(tok)
        pos = pos + 1
    return torch.stack(tokens, 1), out.logits[:, -1]


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
@pytest.mark.parametrize("padded", [False, True])
def test_greedy_tokens_equal_sdpa(fresh_seed, arch, padded) -> None:
    model = tiny(arch)
    prompt = torch.randint(0, 270, (3, 9))
    mask = torch.ones_like(prompt)
    if padded:
        mask[1, :4] = 0
        mask[2, :8] = 0                                                   # a one-token prompt
    want, want_logits = greedy(model, prompt, mask, ours=False)
    prev = hf_attention.enable(model)
    try:
        got, got_logits = greedy(model, prompt, mask, ours=True)
    finally:
        hf_attention.disable(model, prev)
    assert model.config._attn_implementation == prev == "sdpa"
    assert len(set(want.flatten().tolist())) > 5, "degenerate generation: rerun"
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_counters", [False, True])
def test_decode_call_compiles_without_graph_breaks(fresh_seed, with_counters) -> None:
    """fullgraph compile of a one-token call; with fh_counters (a DecodeStep's scratch state)
    the adapter runs flashhead::decode_attention_ws, which leaves them zero."""
    from transformers import StaticCache

    from torch._dynamo.testing import EagerAndRecordGraphs

    from custom_ops.counters import new_workspace

    model = tiny("qwen2")
    hf_attention.enable(model)
    B = 2
    cache = StaticCache(config=model.config, max_cache_len=32)
    cache.early_initialization(B, 2, 16, torch.float32, torch.device("cpu"))
    attn = torch.ones(B, 32, dtype=torch.int64)
    starts = torch.zeros(B, dtype=torch.int64)
    kw = {cache_kw(model): cache, "use_cache": True}
    fill = cache.layers[0].cumulative_length
    counters = new_workspace("cpu", 64) if with_counters else None

    def step(tok, pos):
        return model(tok, attention_mask=attn, position_ids=pos, fh_starts=starts, fh_fill=fill,
                     fh_counters=counters, **kw).logits

    compiled = torch.compile(step, fullgraph=True)
    with torch.no_grad():
        model(torch.randint(0, 270, (B, 5)), attention_mask=attn[:, :5].clone(), **kw)
        tok = torch.randint(0, 270, (B, 1))
        for i in range(3):
            pos = torch.full((B, 1), 5 + i)
            got = compiled(tok, pos)
            fill.sub_(1)                       # rerun the same step eagerly on the same slot
            want = step(tok, pos)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            tok = want[:, -1].argmax(-1, keepdim=True)
        rec = EagerAndRecordGraphs()                    # which op the traced graph calls
        torch.compile(step, backend=rec, fullgraph=True)(tok, torch.full((B, 1), 8))
    code = "".join(g.code for g in rec.graphs)
    assert ("flashhead.decode_attention_ws" in code) == with_counters, code[-2000:]
    if with_counters:
        assert not counters.any()


def test_sliding_window_models_are_refused() -> None:
    model = tiny("mistral", sliding_window=16)
    assert "sliding-window" in hf_attention.unsupported_reason(model)
    with pytest.raises(hf_attention.DecodeAttentionUnsupported, match="keep its own attention"):
        hf_attention.enable(model)
    assert model.config._attn_implementation == "sdpa"
    assert hf_attention.unsupported_reason(tiny("qwen2")) is None


def test_one_token_call_without_ranges_is_an_error(fresh_seed) -> None:
    model = tiny("qwen2")
    hf_attention.enable(model)
    assert hf_attention.ATTENTION_NAME == model.config._attn_implementation
    with pytest.raises(ValueError, match="fh_starts"), torch.no_grad():
        model(torch.randint(0, 270, (1, 1)))
    hf_attention.register()                    # idempotent
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface()[hf_attention.ATTENTION_NAME] is (
        hf_attention.flashhead_decode_attention)
    assert AttentionMaskInterface()[hf_attention.ATTENTION_NAME] is (
        hf_attention.flashhead_decode_mask)


@pytest.mark.cuda
def test_r1_1p5b_architecture_greedy_tokens_equal_sdpa_on_gpu() -> None:
    """DeepSeek-R1-Distill-Qwen-1.5B's architecture (random weights, fp32, 28 layers, 12/2 heads
    of 128): 64 greedy steps with the Triton decode attention equal transformers' SDPA."""
    from benchmarks.random_models import random_model

    model = random_model("r1-1.5b", dtype=torch.float32, device="cuda")
    torch.manual_seed(1)
    prompt = torch.randint(0, 151000, (4, 100), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :37] = 0
    mask[3, :99] = 0
    want, want_logits = greedy(model, prompt, mask, ours=False, steps=64, max_cache_len=4096)
    prev = hf_attention.enable(model)
    got, got_logits = greedy(model, prompt, mask, ours=True, steps=64, max_cache_len=4096)
    hf_attention.disable(model, prev)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-3, atol=1e-3)
