"""Tiny random causal LMs and one compiled model shared by the compile/generate test modules.

The compiled model is cached per process (lru_cache), so test_compile.py and test_generate.py
pay for torch.compile once.
"""

from __future__ import annotations

import copy
import functools
import tempfile

import torch
from torch import nn

VOCAB = 275           # not a multiple of the cluster size (16): K = 18, the last clusters short
CLUSTER = 16
K = -(-VOCAB // CLUSTER)
PROMPT_LEN, PAD = 9, 4


def tiny_lm(arch: str = "qwen2", tied: bool = False, seed: int = 0) -> nn.Module:
    """A 2-layer random causal LM (D=64, GQA 4/2 heads), fp32, eval mode, on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls_cfg = {"qwen2": (Qwen2ForCausalLM, Qwen2Config),
               "llama": (LlamaForCausalLM, LlamaConfig)}[arch]
    cfg = cls_cfg[1](vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=tied, eos_token_id=None, bos_token_id=None,
                     pad_token_id=None)
    torch.manual_seed(seed)
    model = cls_cfg[0](cfg)
    with torch.no_grad():  # HF's init (std 0.02) makes near-uniform logits; spread them
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def prompts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, mask [2, PROMPT_LEN]: row 1 is left padded by PAD tokens (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, PROMPT_LEN), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    return ids, mask


def hf_greedy_per_row(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                      new: int) -> list[torch.Tensor]:
    """Each row alone, without padding, through Hugging Face generate: [n] new tokens per row."""
    out = []
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()].unsqueeze(0)
        seq = model.generate(real, max_new_tokens=new, do_sample=False, pad_token_id=0)
        out.append(seq[0, real.shape[1]:])
    return out


@functools.lru_cache(maxsize=None)
def compiled_qwen() -> tuple[nn.Module, nn.Module]:
    """(FlashHead model compiled with mode='default', its dense twin).  probes == K, so FlashHead
    scores every cluster and must match the dense head exactly."""
    from fh_compile import compile_model

    model = tiny_lm("qwen2", tied=False)
    dense = copy.deepcopy(model)
    cache = tempfile.mkdtemp(prefix="fh-assets-")
    compile_model(model, probes=K, k=8, mode="default", max_batch_size=2, max_cache_len=40,
                  dense_above_rows=8, cache_dir=cache)
    return model, dense
