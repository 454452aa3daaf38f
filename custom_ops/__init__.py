"""FlashHead operators: the stable, typed front.

Callers use these functions or `torch.ops.flashhead.topk`, never the kernels directly.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from custom_ops import flashhead as _flashhead  # registers torch.ops.flashhead.*
from custom_ops.flashhead import FlashHeadInputError, check_inputs
from custom_ops.reference import dense_reference, flashhead_reference
from custom_ops import fused_linear as _fused_linear  # registers rms_norm_linear, act_linear
from custom_ops.fused_linear import (FusedLinearInputError, act_linear_reference,
                                     rms_norm_linear_reference)
from custom_ops import decode_attention as _decode_attention  # registers decode_attention
from custom_ops import rope_cache as _rope_cache  # registers rope_kv_write
from custom_ops.decode_attention import AttentionInputError, decode_attention_reference
from custom_ops.rope_cache import rope_kv_write_reference
from custom_ops import rope_attention as _rope_attention  # registers rope_decode_attention
from custom_ops.rope_attention import rope_decode_attention_reference

__all__ = ["FlashHeadTopK", "FlashHeadInputError", "flashhead_topk", "check_inputs",
           "dense_reference", "flashhead_reference",
           "NormLinearOut", "FusedLinearInputError", "rms_norm_linear", "act_linear",
           "rms_norm_linear_reference", "act_linear_reference",
           "AttentionInputError", "decode_attention", "decode_attention_reference",
           "rope_kv_write", "rope_kv_write_reference",
           "rope_decode_attention", "rope_decode_attention_reference"]


class FlashHeadTopK(NamedTuple):
    ids: torch.Tensor     # [B, k] int64 vocabulary ids, best first
    logits: torch.Tensor  # [B, k] fp32 exact logits of those ids


def flashhead_topk(h: torch.Tensor, centroids: torch.Tensor, weight: torch.Tensor,
                   offsets: torch.Tensor, token_ids: torch.Tensor, *, probes: int,
                   cluster_size: int, k: int = 1,
                   centroid_noise: Optional[torch.Tensor] = None,
                   always_ids: Optional[torch.Tensor] = None,
                   always_rows: Optional[torch.Tensor] = None) -> FlashHeadTopK:
    """Approximate LM head: the k best tokens among the `probes` best clusters (and the
    always-scored tokens), exactly scored.

    h [B, D] bf16/fp16/fp32; centroids [K, D]; weight [V, D] (rows reordered by cluster);
    offsets [K + 1] int64 (CSR: cluster c owns rows offsets[c]:offsets[c + 1]); token_ids [V]
    int64 (vocabulary id of each row); centroid_noise [B, K] or None (added to centroid scores:
    Gumbel noise gives stochastic probing); always_ids [A] int64 vocabulary ids scored at every
    step whatever the probes (end-of-turn / eos tokens; A <= 64; None or empty: none);
    always_rows [A] int64 their rows in `weight` (token_ids[always_rows] == always_ids), or None
    to look them up in every call (O(V); FlashHeadLMHead passes both, so the always ids cost
    O(A * D) bytes).  All on one device, contiguous.

    Returns FlashHeadTopK(ids [B, k] int64, logits [B, k] fp32), best first, equal logits by
    smallest id; every id at most once (an always id in a probed cluster is scored once).  With
    probes == K, ids[:, 0] is the dense head's argmax.
    Raises FlashHeadInputError on bad dtypes, devices, shapes, probes, k or always ids.
    """
    ids, logits = torch.ops.flashhead.topk(h, centroids, weight, offsets, token_ids, probes,
                                           cluster_size, k, centroid_noise, always_ids,
                                           always_rows)
    return FlashHeadTopK(ids, logits)


class NormLinearOut(NamedTuple):
    out: torch.Tensor       # [B, N] x's dtype: the linear's output
    residual: torch.Tensor  # [B, K] x's dtype: the residual stream after the add (r)


def rms_norm_linear(x: torch.Tensor, residual: Optional[torch.Tensor],
                    branch_norm: Optional[torch.Tensor], norm: torch.Tensor,
                    weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                    norm_offset: float, *,
                    counters: Optional[torch.Tensor] = None) -> NormLinearOut:
    """Residual add + RMSNorm + linear in one kernel on CUDA (a memory-bound GEMV).

    x [B, K]; residual [B, K] or None; branch_norm [K] or None (Gemma: post-norm of the branch x
    before the add); norm [K]; weight [N, K]; bias [N] or None; one dtype (bf16/fp16/fp32; the
    norm weights may be any of them).  fp32 math, rounded to the dtype at each ▸:
      b = x, or ▸(rms(x) * (norm_offset + branch_norm));  r = ▸(b + residual) or b
      out = ▸(▸(rms(r) * (norm_offset + norm)) @ weight^T + bias),  rms(v) = v * rsqrt(mean(v^2)
      + eps);  norm_offset is 0.0 for Llama/Qwen/Mistral, 1.0 for Gemma (scale 1 + w).
    counters: a zeroed int32 buffer the caller keeps (custom_ops.counters.new_workspace) for the
    split-K kernels, which leave it zeroed: a compiled step then needs no fill kernel per call
    (the op flashhead::rms_norm_linear_ws, which declares it mutated); None: an internal one
    (flashhead::rms_norm_linear).
    Returns NormLinearOut(out [B, N], residual [B, K] = r), a tuple.
    Raises FusedLinearInputError on bad shapes, dtypes, devices or layouts.
    """
    args = (x, residual, branch_norm, norm, weight, bias, eps, norm_offset)
    if counters is None:
        out, residual_out = torch.ops.flashhead.rms_norm_linear(*args)
    else:
        out, residual_out = torch.ops.flashhead.rms_norm_linear_ws(*args, counters)
    return NormLinearOut(out, residual_out)


def act_linear(x: torch.Tensor, weight: torch.Tensor, act: str = "none", *,
               counters: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Activation-mul + linear in one kernel on CUDA (a memory-bound GEMV).

    act "none": x [B, K], out = ▸(x @ weight^T).  act "silu_mul" / "gelu_tanh_mul": x [B, 2K] =
    [gate | up] (gate first), out = ▸(▸(act(gate) * up) @ weight^T), gelu with the tanh
    approximation.  weight [N, K] in x's dtype (bf16/fp16/fp32); fp32 math.  counters as for
    rms_norm_linear.  Returns out [B, N].
    Raises FusedLinearInputError on an unknown act or bad shapes, dtypes, devices or layouts.
    """
    if counters is None:
        return torch.ops.flashhead.act_linear(x, weight, act)
    return torch.ops.flashhead.act_linear_ws(x, weight, act, counters)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     starts: torch.Tensor, fill: torch.Tensor, scale: float, window: int = 0,
                     softcap: float = 0.0, *,
                     counters: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of one new token per row over a static KV cache read in place (decode step).

    q [B, Hq, 1, Dh]; k_cache, v_cache [B, Hkv, L, Dh] contiguous, q's dtype (bf16/fp16/fp32),
    Dh <= 256, Hq a multiple of Hkv (query head h reads kv head h // (Hq // Hkv)); starts [B]
    int64 (first valid slot of each row: left padding); fill one int64 (0-dim or [1]): slots
    0..fill-1 are written, the current token is at fill - 1.  Row b attends to slots j with
    max(starts[b], fill - window if window > 0 else 0) <= j < fill; scores (q . k) * scale, then
    softcap * tanh(scores / softcap) if softcap > 0; softmax in fp32.
    Returns out [B, Hq, 1, Dh] in q's dtype; a row with no valid slot gets exactly 0.
    CUDA: one split-K Triton launch that reads only the valid slots, no host sync (CUDA-graph
    safe while fill grows); counters as for rms_norm_linear.
    Raises AttentionInputError on bad shapes, dtypes or devices.
    """
    if counters is None:
        return torch.ops.flashhead.decode_attention(q, k_cache, v_cache, starts, fill, scale,
                                                    window, softcap)
    return torch.ops.flashhead.decode_attention_ws(q, k_cache, v_cache, starts, fill, scale,
                                                   window, softcap, counters)


def rope_kv_write(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  starts: torch.Tensor, fill: torch.Tensor, inv_freq: torch.Tensor,
                  attn_scaling: float, num_q_heads: int, q_norm: Optional[torch.Tensor] = None,
                  k_norm: Optional[torch.Tensor] = None, eps: float = 1e-6,
                  norm_offset: float = 0.0) -> torch.Tensor:
    """Rotary (+ optional per-head q/k RMSNorm) of one new token, written into the KV cache.

    qkv [B, (Hq + 2 * Hkv) * Dh] (q heads, k heads, v heads: a fused QKV projection, bias added)
    in the caches' dtype; k_cache, v_cache [B, Hkv, L, Dh] contiguous, mutated: slot fill - 1 of
    every row gets the roped k and the raw v; starts [B] int64, fill one int64 as for
    decode_attention (rotary position of row b: fill - 1 - starts[b]); inv_freq [Dh // 2] fp32
    (transformers' rotary inv_freq, scaling already applied); attn_scaling multiplies cos and
    sin; q_norm / k_norm [Dh] or None: x = rmsnorm(x) * (norm_offset + w) first (norm_offset 1.0
    for Gemma).  fp32 math, rounded once to the cache dtype (transformers rounds between norm
    and rotary: bf16 results may differ by one rounding).
    Returns q_out [B, Hq, 1, Dh] (normed, roped) in the caches' dtype.
    Raises AttentionInputError on bad shapes, dtypes or devices.
    """
    return torch.ops.flashhead.rope_kv_write(qkv, k_cache, v_cache, starts, fill, inv_freq,
                                             attn_scaling, num_q_heads, q_norm, k_norm, eps,
                                             norm_offset)


def rope_decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          starts: torch.Tensor, fill: torch.Tensor, inv_freq: torch.Tensor,
                          attn_scaling: float, num_q_heads: int,
                          q_norm: Optional[torch.Tensor] = None,
                          k_norm: Optional[torch.Tensor] = None, eps: float = 1e-6,
                          norm_offset: float = 0.0, *, scale: float, window: int = 0,
                          softcap: float = 0.0,
                          counters: Optional[torch.Tensor] = None) -> torch.Tensor:
    """rope_kv_write then decode_attention of its q, in one kernel on CUDA (a decode step's
    attention: one launch per layer instead of two).

    Arguments as for rope_kv_write (qkv [B, (Hq + 2 * Hkv) * Dh], the caches [B, Hkv, L, Dh],
    mutated at slot fill - 1, starts, fill, inv_freq, attn_scaling, num_q_heads, q_norm, k_norm,
    eps, norm_offset) and decode_attention (scale, window, softcap, counters).  Same results as
    the two ops in turn, with the same roundings (q in qkv's dtype, k in the cache's).
    Returns out [B, Hq, 1, Dh] in qkv's dtype; a row with no valid slot gets exactly 0.
    CUDA: one split-K Triton launch, no host sync (CUDA-graph safe while fill grows).
    Raises AttentionInputError on bad shapes, dtypes or devices.
    """
    return torch.ops.flashhead.rope_decode_attention(qkv, k_cache, v_cache, starts, fill,
                                                     inv_freq, attn_scaling, num_q_heads, q_norm,
                                                     k_norm, eps, norm_offset, scale, window,
                                                     softcap, counters)
