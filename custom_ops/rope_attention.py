"""Rotary + KV-cache write + decode attention of one new token in one op:
`torch.ops.flashhead.rope_decode_attention`.

Semantics: exactly `rope_kv_write` (custom_ops/rope_cache.py: q/k RMSNorm + rotary, the new k and
v written into slot fill - 1 of the caches, q returned in the activation dtype) followed by
`decode_attention` (custom_ops/decode_attention.py) of that q over the caches, with the same
roundings: the roped q and the written k are rounded to the activation / cache dtype before the
attention uses them.  Returns out [B, Hq, 1, Dh] in qkv's dtype and mutates the caches.

Layout of this file: input checks, the torch.library registration (mutates the caches and the
counters), whose body runs the composition of the two references on CPU and one Triton launch
(custom_ops/rope_attention_triton.py) on CUDA, then the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from custom_ops import rope_cache
from custom_ops.counters import is_traced
from custom_ops.decode_attention import check_inputs as check_attention
from custom_ops.decode_attention import decode_attention_reference
from custom_ops.rope_cache import rope_kv_write_reference


def check_inputs(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 starts: torch.Tensor, fill: torch.Tensor, inv_freq: torch.Tensor,
                 num_q_heads: int, q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor],
                 scale: float, window: int, softcap: float) -> None:
    """Raise AttentionInputError for anything either op cannot take.  Static checks only."""
    rope_cache.check_inputs(qkv, k_cache, v_cache, starts, fill, inv_freq, num_q_heads, q_norm,
                            k_norm)
    # decode_attention's checks on the q that rope_kv_write would return (a view of qkv's q
    # heads with its shape, dtype and device: nothing is read or copied).
    B, _, _, Dh = k_cache.shape
    q = qkv[:, :num_q_heads * Dh].view(B, num_q_heads, 1, Dh)
    check_attention(q, k_cache, v_cache, starts, fill, scale, window, softcap)


@triton_op("flashhead::rope_decode_attention", mutates_args=("k_cache", "v_cache", "counters"))
def rope_decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          starts: torch.Tensor, fill: torch.Tensor, inv_freq: torch.Tensor,
                          attn_scaling: float, num_q_heads: int, q_norm: Optional[torch.Tensor],
                          k_norm: Optional[torch.Tensor], eps: float, norm_offset: float,
                          scale: float, window: int, softcap: float,
                          counters: Optional[torch.Tensor]) -> torch.Tensor:
    """rope_kv_write then decode_attention: writes slot fill - 1 of the caches, returns out
    [B, Hq, 1, Dh] in qkv's dtype.

    See custom_ops.rope_decode_attention (the front).  CPU: the two references in turn (the
    attention over the slots below the fill only, as decode_attention's CPU kernel).  CUDA: one
    Triton launch.  counters: see custom_ops.counters.workspace (left zeroed; declared mutated
    so compiled graphs keep them as state).
    """
    check_inputs(qkv, k_cache, v_cache, starts, fill, inv_freq, num_q_heads, q_norm, k_norm,
                 scale, window, softcap)
    if qkv.device.type != "cuda":
        q = rope_kv_write_reference(qkv, k_cache, v_cache, starts, fill, inv_freq, attn_scaling,
                                    num_q_heads, q_norm, k_norm, eps, norm_offset)
        k, v = k_cache, v_cache
        if not is_traced(fill):   # eager on CPU: read only the slots up to the fill
            hi = max(1, min(int(fill.reshape(-1)[0]), k_cache.shape[2]))
            k, v = k_cache[:, :, :hi], v_cache[:, :, :hi]
        return decode_attention_reference(q, k, v, starts, fill, scale, window, softcap)
    from custom_ops.rope_attention_triton import triton_rope_decode_attention

    return triton_rope_decode_attention(qkv, k_cache, v_cache, starts, fill, inv_freq,
                                        attn_scaling, num_q_heads, q_norm, k_norm, eps,
                                        norm_offset, scale, window, softcap, counters)


@rope_decode_attention.register_fake
def _(qkv, k_cache, v_cache, starts, fill, inv_freq, attn_scaling, num_q_heads, q_norm, k_norm,
      eps, norm_offset, scale, window, softcap, counters):
    B, _, _, Dh = k_cache.shape
    return qkv.new_empty((B, num_q_heads, 1, Dh))


def rope_decode_attention_reference(qkv: torch.Tensor, k_cache: torch.Tensor,
                                    v_cache: torch.Tensor, starts: torch.Tensor,
                                    fill: torch.Tensor, inv_freq: torch.Tensor,
                                    attn_scaling: float, num_q_heads: int,
                                    q_norm: Optional[torch.Tensor] = None,
                                    k_norm: Optional[torch.Tensor] = None, eps: float = 1e-6,
                                    norm_offset: float = 0.0, scale: float = 1.0,
                                    window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """The oracle: rope_kv_write_reference (mutates the caches at slot fill - 1) then
    decode_attention_reference over the whole cache.  Returns out [B, Hq, 1, Dh], qkv.dtype."""
    q = rope_kv_write_reference(qkv, k_cache, v_cache, starts, fill, inv_freq, attn_scaling,
                                num_q_heads, q_norm, k_norm, eps, norm_offset)
    return decode_attention_reference(q, k_cache, v_cache, starts, fill, scale, window, softcap)
