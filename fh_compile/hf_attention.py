"""Decode attention for transformers' own forward, through its documented extension points.

For models that keep transformers' forward, a decode step over a StaticCache can run
`torch.ops.flashhead.decode_attention` (reads only the valid slots) instead of SDPA over the
whole capacity with a [B, 1, 1, L] mask per layer:

    prev = hf_attention.enable(model)      # this instance's config: attention "fh_decode"
    model(ids, attention_mask=mask_2d, position_ids=pos, cache=static_cache, use_cache=True,
          fh_starts=starts, fh_fill=static_cache.layers[0].cumulative_length)   # decode call
    model(prompt, attention_mask=mask_2d, position_ids=pos, cache=static_cache, use_cache=True)
    hf_attention.disable(model, prev)

(`past_key_values=` instead of `cache=` on transformers 5.17.)  Registered under
ATTENTION_NAME in transformers' `AttentionInterface` (the attention function) and
`AttentionMaskInterface` (the mask function); nothing is patched.
* Calls with one query token build no mask (the mask function returns None) and must carry the
  decode ranges as extra forward kwargs, which transformers passes down to the attention:
  fh_starts [B] int64 (each row's first valid slot: its left padding) and fh_fill (one int64:
  slots filled AFTER this step's cache update; layer 0's `cumulative_length` tensor is that
  value by the time any layer's attention runs).  The key / value transformers hands over are
  the StaticCache layer's full [B, Hkv, L, Dh] tensors, read in place.
* Calls with several query tokens (prefill) get transformers' SDPA mask and run its
  `sdpa_attention_forward` (a manual masked softmax when the layer soft-caps scores).
* Sliding-window layers are not supported: transformers' StaticCache keeps them in a ring
  buffer whose slots are not positions.  `unsupported_reason(model)` says why a model cannot
  use this path (the caller then keeps its attention), `enable` raises
  DecodeAttentionUnsupported for it, and a decode call on a sliding layer raises it too.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from custom_ops import decode_attention

# Not "flashhead_decode": transformers treats every implementation name containing "flash" as
# a flash-attention kernel (utils.generic.is_flash_attention_requested) and tries to load it.
ATTENTION_NAME = "fh_decode"


class DecodeAttentionUnsupported(ValueError):
    """The model (or layer) cannot use the flashhead decode attention; keep its own attention."""


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _softcapped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, mask: Optional[torch.Tensor], scaling: float,
                          softcap: float) -> torch.Tensor:
    """Prefill of a soft-capping layer (SDPA cannot cap): q [B, Hq, T, Dh], k / v [B, Hkv, L,
    Dh], mask [B, 1, T, L] bool (True = attend) or None (causal over the first T slots).
    Returns [B, T, Hq, Dh] in query's dtype."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1).float()
    v = value.repeat_interleave(group, dim=1).float()
    scores = (query.float() @ k.transpose(-1, -2)) * scaling                # [B, Hq, T, L]
    scores = softcap * torch.tanh(scores / softcap)
    T, L = scores.shape[-2:]
    if mask is None:
        mask = torch.ones(T, L, dtype=torch.bool, device=query.device).tril()
    elif mask.dtype != torch.bool:
        mask = mask == 0                        # a float additive mask: 0 where attended
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return (p @ v).to(query.dtype).transpose(1, 2).contiguous()


def flashhead_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                               dropout: float = 0.0, scaling: Optional[float] = None,
                               sliding_window: Optional[int] = None,
                               softcap: Optional[float] = None,
                               fh_starts: Optional[torch.Tensor] = None,
                               fh_fill: Optional[torch.Tensor] = None,
                               fh_counters: Optional[torch.Tensor] = None,
                               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function (AttentionInterface signature): query [B, Hq, T, Dh],
    key / value [B, Hkv, L, Dh] -> (attn_output [B, T, Hq, Dh], None).  T == 1 with fh_starts
    and fh_fill: the decode op (with fh_counters, the caller's zeroed int32 scratch state, its
    `_ws` variant: no fill kernel under torch.compile); T > 1: transformers' SDPA path.  See the
    module docstring."""
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    if query.shape[2] == 1:
        if fh_starts is None or fh_fill is None:
            raise ValueError(f"attention '{ATTENTION_NAME}' builds no mask for one-token calls: "
                             f"pass fh_starts=[B] int64 and fh_fill=<one int64, slots filled "
                             f"after this step> to the model's forward (see "
                             f"fh_compile.hf_attention)")
        if sliding_window is not None:
            raise DecodeAttentionUnsupported(
                f"layer {getattr(module, 'layer_idx', '?')} uses a sliding window "
                f"({sliding_window}); transformers' StaticCache keeps it in a ring buffer, which "
                f"the decode op does not read: keep the model's own attention")
        out = decode_attention(query, key, value, fh_starts, fh_fill, scale, 0,
                               float(softcap or 0.0), counters=fh_counters)
        return out.transpose(1, 2), None                                 # [B, 1, Hq, Dh]
    if softcap:
        return _softcapped_attention(module, query, key, value, attention_mask, scale,
                                     float(softcap)), None
    return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                   sliding_window=sliding_window, **kwargs)


def flashhead_decode_mask(*args: Any, **kwargs: Any) -> Optional[torch.Tensor]:
    """transformers mask function (AttentionMaskInterface signature, called with keywords): no
    mask for one-token calls (the decode op takes its ranges from fh_starts / fh_fill),
    transformers' SDPA boolean mask otherwise (always materialized for soft-capping layers)."""
    if kwargs.get("q_length") == 1:
        return None
    from transformers.masking_utils import sdpa_mask

    config = kwargs.get("config")
    if config is not None and getattr(config, "attn_logit_softcapping", None):
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register ATTENTION_NAME with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, flashhead_decode_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, flashhead_decode_mask)


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why `model` cannot use this attention (sliding-window or linear-attention layers in its
    StaticCache), or None."""
    from transformers import StaticCache

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return f"{type(model).__name__} is not a transformers model (no config)"
    cache = StaticCache(config=config.get_text_config(decoder=True), max_cache_len=2)
    if any(cache.is_sliding):
        return ("it has sliding-window layers (transformers' StaticCache keeps them in a ring "
                "buffer)")
    if any(getattr(cache, "is_linear", [])):
        return "it has linear-attention layers"
    return None


def enable(model: nn.Module) -> str:
    """Set THIS model instance's attention implementation to ATTENTION_NAME (through
    `model.set_attn_implementation`; the config object is the instance's own, shared with its
    submodules) and return the previous implementation name, for `disable`.
    Raises DecodeAttentionUnsupported when `unsupported_reason(model)` gives a reason or the
    model cannot switch its attention implementation."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise DecodeAttentionUnsupported(f"{type(model).__name__} cannot use '{ATTENTION_NAME}': "
                                         f"{reason}; keep its own attention")
    register()
    prev = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise DecodeAttentionUnsupported(
            f"{type(model).__name__} did not switch to '{ATTENTION_NAME}' (its attention does not "
            f"go through transformers' AttentionInterface); keep its own attention")
    return prev


def disable(model: nn.Module, prev: str) -> None:
    """Restore the attention implementation `enable` returned."""
    model.set_attn_implementation(prev)
