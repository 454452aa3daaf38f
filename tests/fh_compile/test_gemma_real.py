"""Gemma-3-270M (real weights: 18 layers, 15 of them sliding-window, a 262,144 x 640 tied head)
through the whole pipeline on CPU: fh_compile.load_model from the GGUF, the fast forward with
the dense head, and FlashHead at probes = K, each giving transformers' own first 16 greedy tokens.
"""

from __future__ import annotations

import pytest
import torch

import real_models
from fh_compile import compile_model, generate, load_model, uncompile_model

pytestmark = pytest.mark.slow
NEW = 16


def test_gemma3_270m_generates_transformers_tokens(tmp_path):
    model, tok = load_model(real_models.fetch("gemma270m"), dtype=torch.float32)
    assert model.config.get_text_config().model_type == "gemma3_text"
    prompt = tok("The capital of France is", return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=NEW, do_sample=False)[0, -NEW:]

    compile_model(model, flashhead=False, mode=None, max_cache_len=64)
    info = model.fh_compiled.info
    assert (info.forward, info.attention) == ("fast", "flashhead::rope_decode_attention")
    assert torch.equal(generate(model, prompt, max_new_tokens=NEW, eos_token_id=[]).new_tokens[0],
                       expected)
    uncompile_model(model)

    K = model.config.vocab_size // 16
    compile_model(model, probes=K, k=4, mode=None, max_cache_len=64, dense_above_rows=1,
                  cache_dir=tmp_path, build_kwargs=dict(coarse_iters=1, fine_iters=1,
                                                        refine_iters=0))
    out = generate(model, prompt, max_new_tokens=NEW, eos_token_id=[])
    assert out.path == "flashhead"
    assert torch.equal(out.new_tokens[0], expected), tok.decode(out.new_tokens[0])
    print("Gemma-3-270M:", repr(tok.decode(expected)))
