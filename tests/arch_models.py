"""Tiny random decoders of every architecture the pipeline is checked on (CPU, fp32).

`tiny_arch(name)` builds a 2-layer model of that model_type with a 275-token vocabulary (the same
as tests/tiny_models.py), weights drawn with std 0.2 so the logits have some spread.  Sliding-window
architectures get a window of 8 slots, so a 12-token prompt already crosses it.
"""

from __future__ import annotations

import torch

VOCAB, HIDDEN, WINDOW = 275, 64, 8
ARCHS = ("qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "gemma2", "gemma3_text", "phi3",
         "olmo2", "granite", "smollm3")
FAST = ("qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3_text")


def tiny_config(name: str):
    from transformers import AutoConfig

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=VOCAB - 1, bos_token_id=None, pad_token_id=VOCAB - 3,
                  tie_word_embeddings=False)
    extra: dict = {}
    if name == "qwen3":
        extra = dict(head_dim=16)
    elif name == "qwen3_moe":
        extra = dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     decoder_sparse_step=1)
    elif name == "mistral":
        extra = dict(sliding_window=WINDOW, head_dim=16)
    elif name in ("gemma2", "gemma3_text"):
        extra = dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                     layer_types=["sliding_attention", "full_attention"],
                     tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")
        if name == "gemma2":
            extra.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
        else:
            extra.update(final_logit_softcapping=None)
    elif name == "smollm3":
        extra = dict(no_rope_layers=[1, 0])
    return AutoConfig.for_model(name, **{**common, **extra})


def tiny_arch(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():   # HF's init is tiny (std 0.02); give the logits some spread
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            elif "norm" in n:   # RMSNorm weights (Gemma's are offsets from 1)
                p.normal_(0.0, 0.1).add_(0.0 if name.startswith("gemma") else 1.0)
    return model.eval()
