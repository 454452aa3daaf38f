"""What the fast decode forward needs to know about a Hugging Face decoder, read off the instance.

`arch_spec(model)` returns an ArchSpec for the architectures the fast forward serves (Llama, Mistral,
Qwen2 / DeepSeek-R1-Distill-Qwen, Qwen3, Gemma 2, Gemma 3 text) or raises UnsupportedArchitecture
with the reason, so the caller can keep transformers' forward and say why.  The differences between
these architectures are small named options, not copies of a layer:

* qk_norm: an RMSNorm over each head's q and k before rotary (Qwen3, Gemma 3);
* norm_offset: Gemma's RMSNorm scales by (1 + w) instead of w;
* post_norms: Gemma's extra RMSNorms on the attention and MLP outputs before the residual add;
* embed_scale: Gemma multiplies the embeddings by sqrt(D) (rounded to the model dtype);
* act: the MLP's gate activation (SiLU, or GELU with the tanh approximation for Gemma);
* per layer: the attention window (sliding layers), the rotary frequencies (Gemma 3 uses another
  base on its sliding layers), the softmax scale and attention logit soft-capping (Gemma 2).

Everything is taken from the modules and config of THIS instance (scales from the attention
modules, rotary frequencies from the rotary embedding module), so a checkpoint's own settings win.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FAST_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
_GEMMA = ("gemma2", "gemma3_text")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")   # frequencies fixed at load time


class UnsupportedArchitecture(ValueError):
    """The fast decode forward cannot serve this model; the message says what is missing."""


@dataclass(frozen=True)
class LayerSpec:
    """Per-layer attention settings.  window: attend to the last `window` slots (0: all);
    inv_freq: [Dh // 2] fp32 rotary frequencies; rope_scaling: transformers' attention_scaling
    (multiplies cos and sin); scale: softmax scale; softcap: attention logit soft-cap (0: none)."""

    window: int
    inv_freq: torch.Tensor
    rope_scaling: float
    scale: float
    softcap: float


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    num_layers: int
    hidden: int
    heads: int            # Hq
    kv_heads: int         # Hkv
    head_dim: int         # Dh
    intermediate: int     # I
    eps: float
    qkv_bias: bool
    qk_norm: bool
    norm_offset: float
    post_norms: bool
    embed_scale: float | None
    act: str              # "silu_mul" | "gelu_tanh_mul" (custom_ops.act_linear's names)
    final_softcap: float | None
    layers: tuple[LayerSpec, ...]

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


def _refuse(model_type: str, what: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(f"the fast decode forward does not serve this {model_type} model: "
                                   f"{what}; it keeps transformers' forward")


def _rope(body: nn.Module, layer: nn.Module, model_type: str) -> tuple[torch.Tensor, float]:
    """(inv_freq [Dh // 2] fp32, attention_scaling) of one layer, from the instance's rotary module."""
    rot = getattr(body, "rotary_emb", None)
    kind = getattr(layer.self_attn, "layer_type", None) or "full_attention"
    if rot is None:
        raise _refuse(model_type, "no rotary embedding module (model.model.rotary_emb)")
    if hasattr(rot, f"{kind}_inv_freq"):                  # Gemma 3: one table per layer type
        inv, scaling = getattr(rot, f"{kind}_inv_freq"), getattr(rot, f"{kind}_attention_scaling")
        rope_type = getattr(rot, "rope_type", {}).get(kind, "default")
    else:
        if kind == "sliding_attention" and hasattr(body, "rotary_emb_local"):  # older Gemma 3
            rot = body.rotary_emb_local
        inv, scaling = rot.inv_freq, getattr(rot, "attention_scaling", 1.0)
        rope_type = getattr(rot, "rope_type", "default")
    if rope_type not in _STATIC_ROPE:
        raise _refuse(model_type, f"rope type {rope_type!r} changes with the sequence length "
                                  f"(served: {', '.join(_STATIC_ROPE)})")
    return inv.detach().float().clone(), float(scaling)


def arch_spec(model: nn.Module) -> ArchSpec:
    """The fast forward's view of `model` (a *ForCausalLM); raises UnsupportedArchitecture."""
    config = model.config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in FAST_ARCHS:
        raise _refuse(model_type, f"architecture not in {FAST_ARCHS}")
    body = getattr(model, "base_model", None)
    layers = getattr(body, "layers", None)
    if layers is None or len(layers) == 0:
        raise _refuse(model_type, "no decoder layers at model.base_model.layers")
    first = layers[0]
    attn, mlp = first.self_attn, first.mlp
    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    Dh = getattr(config, "head_dim", None) or config.hidden_size // Hq
    if attn.q_proj.weight.shape[0] != Hq * Dh or attn.k_proj.weight.shape[0] != Hkv * Dh:
        raise _refuse(model_type, "q/k projections do not match heads x head_dim")
    if getattr(attn.o_proj, "bias", None) is not None:
        raise _refuse(model_type, "an output-projection bias")
    if any(getattr(getattr(mlp, n), "bias", None) is not None for n in ("gate_proj", "up_proj",
                                                                       "down_proj")):
        raise _refuse(model_type, "MLP biases")
    qkv_bias = attn.q_proj.bias is not None
    if qkv_bias != (attn.k_proj.bias is not None) or qkv_bias != (attn.v_proj.bias is not None):
        raise _refuse(model_type, "a bias on some but not all of q/k/v")
    act_name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    acts = {"silu": "silu_mul", "swish": "silu_mul", "gelu_pytorch_tanh": "gelu_tanh_mul"}
    if act_name not in acts:
        raise _refuse(model_type, f"MLP activation {act_name!r} (served: {sorted(acts)})")
    gemma = model_type in _GEMMA
    specs = []
    for layer in layers:
        window = (getattr(config, "sliding_window", None) if model_type == "mistral"
                  else getattr(layer.self_attn, "sliding_window", None)) or 0
        softcap = getattr(layer.self_attn, "attn_logit_softcapping", None) if model_type == "gemma2" \
            else None
        inv, scaling = _rope(body, layer, model_type)
        if inv.numel() != Dh // 2:
            raise _refuse(model_type, f"partial rotary ({2 * inv.numel()} of {Dh} dims)")
        specs.append(LayerSpec(window=int(window), inv_freq=inv, rope_scaling=scaling,
                               scale=float(layer.self_attn.scaling), softcap=float(softcap or 0.0)))
    embed_scale = None
    if gemma:
        embed_scale = float(getattr(body.embed_tokens, "scalar_embed_scale", config.hidden_size ** 0.5))
    return ArchSpec(model_type=model_type, num_layers=len(layers), hidden=config.hidden_size,
                    heads=Hq, kv_heads=Hkv, head_dim=Dh, intermediate=mlp.down_proj.weight.shape[1],
                    eps=float(config.rms_norm_eps), qkv_bias=qkv_bias,
                    qk_norm=hasattr(attn, "q_norm"), norm_offset=1.0 if gemma else 0.0,
                    post_norms=gemma, embed_scale=embed_scale, act=acts[act_name],
                    final_softcap=getattr(config, "final_logit_softcapping", None),
                    layers=tuple(specs))
