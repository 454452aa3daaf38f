"""Random-weight models of real architectures, for speed (which does not depend on the values).

    model = random_model("r1-1.5b")          # DeepSeek-R1-Distill-Qwen-1.5B's architecture
    model = random_model("gemma3-270m")      # Gemma-3-270M's architecture (tied 262,144 x 640 head)
"""

from __future__ import annotations

import torch

ARCHS = ("r1-1.5b", "gemma3-270m")


def arch_config(name: str, layers: int | None = None):
    """The transformers config of `name` (`layers`: cut short)."""
    from transformers import Gemma3TextConfig, Qwen2Config

    if name == "r1-1.5b":     # qwen2, untied head, 12/2 heads of 128
        return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                           num_hidden_layers=layers or 28, num_attention_heads=12,
                           num_key_value_heads=2, max_position_embeddings=131072,
                           tie_word_embeddings=False, rms_norm_eps=1e-6, use_sliding_window=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if name == "gemma3-270m":  # from the GGUF's metadata: 18 layers, every 6th full attention
        n = layers or 18
        return Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                num_hidden_layers=n, num_attention_heads=4, num_key_value_heads=1,
                                head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                                layer_types=["full_attention" if (i + 1) % 6 == 0
                                             else "sliding_attention" for i in range(n)],
                                max_position_embeddings=32768, rms_norm_eps=1e-6,
                                tie_word_embeddings=True)
    raise ValueError(f"unknown architecture {name!r}; choose from {ARCHS}")


def random_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                 layers: int | None = None) -> torch.nn.Module:
    """`name`'s architecture with seeded random weights (`layers`: cut short, for diagnostics)."""
    from transformers import AutoModelForCausalLM

    cfg = arch_config(name, layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def r1_distill_qwen_1p5b(dtype: torch.dtype = torch.bfloat16, layers: int = 28) -> torch.nn.Module:
    """DeepSeek-R1-Distill-Qwen-1.5B's architecture with seeded random weights, on the GPU."""
    return random_model("r1-1.5b", dtype, "cuda", layers)
