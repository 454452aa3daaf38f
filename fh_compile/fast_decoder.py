"""The fast decode forward: a decoder body rebuilt from THIS model instance's own weights.

    fast = FastDecoder(model, dtype=torch.bfloat16)     # fused weights; raises UnsupportedArchitecture
    h = fast.decode(x, kv_k, kv_v, starts, fill)         # one token per row: [B, D] -> [B, D]
    h = fast.forward_torch(x, kv_k, kv_v, ...)           # plain PyTorch, any T (prefill, reference)

Per layer the decode step (kernels="ops") is five custom ops (custom_ops/): rms_norm_linear
(residual add + RMSNorm + fused QKV projection), rope_decode_attention (q/k norm + rotary + the
cache write + attention over the filled slots, one launch), act_linear (output projection),
rms_norm_linear (residual add + RMSNorm + fused gate/up projection), act_linear (activation-mul +
down projection).  The residual add of each sub-block runs in the prologue of the next op, so no
kernel exists for it alone.  kernels="ops-unfused" runs rope_kv_write and decode_attention as
two ops instead (six a layer: the A/B baseline of the fused op); kernels="torch" runs
`forward_torch`.

Weights: q/k/v are concatenated into one [(Hq + 2 Hkv) Dh, D] matrix and gate/up into one [2I, D]
matrix; the Hugging Face modules' own parameters are then re-pointed to row slices of these
(`share_with_model=True`, when dtype and device match), so the model keeps working unchanged and
no weight is held twice.  Everything else (norms, o/down projections, embeddings) is used as is.

`forward_torch` is the same math in plain PyTorch in the model dtype, mirroring transformers'
rounding (RMSNorm, rotary and attention as in its modeling files); it runs prefill (T > 1) and
serves as the reference that the op path is tested against, and as the path for ONNX export.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import custom_ops
from fh_compile.arch import ArchSpec, arch_spec

# decode through the custom ops (rotary fused into attention, or not), or forward_torch (ONNX,
# reference)
KERNELS = ("ops", "ops-unfused", "torch")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """transformers' RMSNorm: Llama style (offset 0) rounds before the weight, Gemma style (offset
    1, weight 1 + w) after it."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (offset + w.float())).to(x.dtype)
    return w * normed.to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
         scaling: float) -> torch.Tensor:
    """Rotary ("rotate half") for x [B, H, T, Dh] at positions [B, T] int64."""
    freqs = positions[..., None].float() * inv_freq.to(x.device)            # [B, T, Dh / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(x.dtype)[:, None]                       # [B, 1, T, Dh]
    sin = (emb.sin() * scaling).to(x.dtype)[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float, softcap: float) -> torch.Tensor:
    """q [B, Hq, T, Dh], k/v [B, Hkv, S, Dh], allowed [B, 1, T, S] bool -> [B, Hq, T, Dh]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale                  # Gemma 2's eager path
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


class FastLayer(nn.Module):
    """One decoder layer's weights in the fast forward's layout (buffers: never trained here)."""

    def __init__(self, layer: nn.Module, spec: ArchSpec, i: int, dtype: torch.dtype,
                 device: torch.device, share: bool) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.window, self.scale = spec.layers[i].window, spec.layers[i].scale
        self.softcap, self.rope_scaling = spec.layers[i].softcap, spec.layers[i].rope_scaling
        cast = lambda t: t.detach().to(device=device, dtype=dtype)  # noqa: E731
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gu = [mlp.gate_proj, mlp.up_proj]
        self.register_buffer("wqkv", torch.cat([cast(m.weight) for m in qkv]), persistent=False)
        self.register_buffer("bqkv", torch.cat([cast(m.bias) for m in qkv]) if spec.qkv_bias
                             else None, persistent=False)
        self.register_buffer("w13", torch.cat([cast(m.weight) for m in gu]), persistent=False)
        self.register_buffer("wo", cast(attn.o_proj.weight), persistent=False)
        self.register_buffer("w2", cast(mlp.down_proj.weight), persistent=False)
        self.register_buffer("inv_freq", spec.layers[i].inv_freq.to(device), persistent=False)
        if spec.post_norms:   # Gemma: post_attention_layernorm is the attention output's norm
            norms = dict(in_norm=layer.input_layernorm, mlp_norm=layer.pre_feedforward_layernorm,
                         post_attn_norm=layer.post_attention_layernorm,
                         post_mlp_norm=layer.post_feedforward_layernorm)
        else:
            norms = dict(in_norm=layer.input_layernorm, mlp_norm=layer.post_attention_layernorm,
                         post_attn_norm=None, post_mlp_norm=None)
        if spec.qk_norm:
            norms.update(q_norm=attn.q_norm, k_norm=attn.k_norm)
        else:
            norms.update(q_norm=None, k_norm=None)
        for name, norm in norms.items():
            self.register_buffer(name, None if norm is None else cast(norm.weight), persistent=False)
        if share:
            _share(qkv, self.wqkv, self.bqkv)
            _share(gu, self.w13, None)


def _unshare(linears: list[nn.Module]) -> None:
    """Give each linear its own copy of its weight (and bias) again."""
    for m in linears:
        m.weight.data = m.weight.data.clone()
        if m.bias is not None:
            m.bias.data = m.bias.data.clone()


def _share(linears: list[nn.Module], fused_w: torch.Tensor, fused_b: torch.Tensor | None) -> None:
    """Re-point each linear's weight (and bias) to its rows of the fused tensor: same values, one
    copy in memory."""
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused_w[row:row + n]
        if fused_b is not None:
            m.bias.data = fused_b[row:row + n]
        row += n


class FastDecoder(nn.Module):
    """The fast forward of one model instance.  See the module docstring."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, share_with_model: bool = True,
                 kernels: str = "ops") -> None:
        super().__init__()
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.kernels = kernels
        self.spec = spec = arch_spec(model)
        body = model.base_model
        weight = body.embed_tokens.weight
        dtype = dtype or weight.dtype
        device = torch.device(device) if device is not None else weight.device
        share = share_with_model and all(
            p.dtype == dtype and p.device == device for p in body.layers.parameters())
        self.layers = nn.ModuleList(FastLayer(layer, spec, i, dtype, device, share)
                                    for i, layer in enumerate(body.layers))
        self._embed = [body.embed_tokens]        # a list: the model owns it
        self.register_buffer("final_norm", body.norm.weight.detach().to(device, dtype),
                             persistent=False)
        self.dtype, self.shared = dtype, share

    def unshare(self, model: nn.Module) -> None:
        """Undo the weight sharing on `model` (its q/k/v and gate/up linears own their weights
        again); this decoder keeps its fused copies."""
        if self.shared:
            for layer in model.base_model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                _unshare([attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj])
            self.shared = False

    # -- shared pieces ------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] int64 -> [..., D] in the model dtype (Gemma: scaled by sqrt(D) in that dtype)."""
        x = F.embedding(ids, self._embed[0].weight).to(self.dtype)
        if self.spec.embed_scale is not None:
            x = x * torch.tensor(self.spec.embed_scale, dtype=self.dtype)
        return x

    def _final(self, branch: torch.Tensor, residual: torch.Tensor,
               post: torch.Tensor | None) -> torch.Tensor:
        s = self.spec
        if post is not None:
            branch = rms_norm(branch, post, s.eps, s.norm_offset)
        return rms_norm(residual + branch, self.final_norm, s.eps, s.norm_offset)

    # -- decode: the custom ops ---------------------------------------------------------------------
    def decode(self, x: torch.Tensor, kv_k: list[torch.Tensor], kv_v: list[torch.Tensor],
               starts: torch.Tensor, fill: torch.Tensor,
               counters: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One new token per row.  x [B, D] (embedded); kv_k/kv_v per layer [B, Hkv, L, Dh];
        starts [B] int64 (first real slot of each row); fill [1] int64 (slots written, the new
        token's included: it goes to slot fill - 1); counters: the split-K kernels' zeroed
        int32 scratch, held by the caller (custom_ops.counters.new_workspace), or None.
        Returns the final hidden state [B, D]."""
        if self.kernels == "torch":
            positions = (fill - 1 - starts)[:, None]                             # [B, 1]
            return self.forward_torch(x[:, None], kv_k, kv_v, fill - 1, positions, starts)[:, 0]
        s, B = self.spec, x.shape[0]
        branch, residual, post = x, None, None
        for i, L in enumerate(self.layers):
            qkv, residual = custom_ops.rms_norm_linear(branch, residual, post, L.in_norm, L.wqkv,
                                                       L.bqkv, s.eps, s.norm_offset,
                                                       counters=counters)
            if self.kernels == "ops":
                a = custom_ops.rope_decode_attention(
                    qkv, kv_k[i], kv_v[i], starts, fill, L.inv_freq, L.rope_scaling, s.heads,
                    L.q_norm, L.k_norm, s.eps, s.norm_offset, scale=L.scale, window=L.window,
                    softcap=L.softcap, counters=counters)                # [B, Hq, 1, Dh]
            else:
                q = custom_ops.rope_kv_write(qkv, kv_k[i], kv_v[i], starts, fill, L.inv_freq,
                                             L.rope_scaling, s.heads, L.q_norm, L.k_norm, s.eps,
                                             s.norm_offset)
                a = custom_ops.decode_attention(q, kv_k[i], kv_v[i], starts, fill, L.scale,
                                                L.window, L.softcap, counters=counters)
            o = custom_ops.act_linear(a.reshape(B, -1), L.wo, "none", counters=counters)
            gu, residual = custom_ops.rms_norm_linear(o, residual, L.post_attn_norm, L.mlp_norm,
                                                      L.w13, None, s.eps, s.norm_offset,
                                                      counters=counters)
            branch = custom_ops.act_linear(gu, L.w2, s.act, counters=counters)
            post = L.post_mlp_norm
        return self._final(branch, residual, post)

    # -- plain PyTorch: prefill and the reference ---------------------------------------------------
    def forward_torch(self, x: torch.Tensor, kv_k: list[torch.Tensor], kv_v: list[torch.Tensor],
                      first_slot: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor,
                      key_len: int | None = None) -> torch.Tensor:
        """x [B, T, D] embedded; the T tokens go to cache slots first_slot + [0, T) (first_slot
        [1] int64); positions [B, T] int64 (rotary); starts [B] int64 (first real slot per row).
        Each token attends to the slots from max(starts, its slot - window + 1) to its own;
        key_len: only the first key_len slots can hold those (eager prefill: T, so attention
        costs T x T, not T x L), None: all L (the shapes stay static: what torch.export needs,
        since SDPA on CUDA guards the key length of a sliced cache).
        Returns the final hidden states [B, T, D]; writes k/v into the caches."""
        s = self.spec
        B, T, _ = x.shape
        L = key_len or kv_k[0].shape[2]
        slots = first_slot + torch.arange(T, device=x.device)                    # [T]
        key = torch.arange(L, device=x.device)
        causal = (key[None, :] <= slots[:, None])                               # [T, L]
        real = key[None, :] >= starts[:, None]                                  # [B, L]
        allowed = causal[None] & real[:, None]                                  # [B, T, L]
        own = key[None, None, :] == slots[None, :, None]    # pad queries see themselves: no NaN
        hidden = x
        for i, layer in enumerate(self.layers):
            win = allowed
            if layer.window:
                win = allowed & (key[None, None, :] > slots[None, :, None] - layer.window)
            win = (win | own)[:, None]                                          # [B, 1, T, L]
            hidden = self._layer_torch(layer, hidden, kv_k[i], kv_v[i], slots, positions, win)
        return rms_norm(hidden, self.final_norm, s.eps, s.norm_offset)

    def _layer_torch(self, layer: FastLayer, x: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                     allowed: torch.Tensor) -> torch.Tensor:
        s = self.spec
        B, T, _ = x.shape
        y = rms_norm(x, layer.in_norm, s.eps, s.norm_offset)
        qkv = F.linear(y, layer.wqkv, layer.bqkv)
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                             s.kv_heads * s.head_dim], dim=-1)
        q = q.view(B, T, s.heads, s.head_dim)
        k = k.view(B, T, s.kv_heads, s.head_dim)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, s.eps, s.norm_offset)
            k = rms_norm(k, layer.k_norm, s.eps, s.norm_offset)
        q = rope(q.transpose(1, 2), positions, layer.inv_freq, layer.rope_scaling)
        k = rope(k.transpose(1, 2), positions, layer.inv_freq, layer.rope_scaling)
        v = v.view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
        S = allowed.shape[-1]
        a = masked_attention(q, k_cache[:, :, :S], v_cache[:, :, :S], allowed, layer.scale,
                             layer.softcap)
        o = F.linear(a.transpose(1, 2).reshape(B, T, -1), layer.wo)
        if layer.post_attn_norm is not None:
            o = rms_norm(o, layer.post_attn_norm, s.eps, s.norm_offset)
        h = x + o
        y = rms_norm(h, layer.mlp_norm, s.eps, s.norm_offset)
        gate, up = F.linear(y, layer.w13).chunk(2, dim=-1)
        act = F.silu(gate) if s.act == "silu_mul" else F.gelu(gate, approximate="tanh")
        m = F.linear(act * up, layer.w2)
        if layer.post_mlp_norm is not None:
            m = rms_norm(m, layer.post_mlp_norm, s.eps, s.norm_offset)
        return h + m

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{s.model_type}: layers={s.num_layers}, D={s.hidden}, heads={s.heads}/"
                f"{s.kv_heads}x{s.head_dim}, I={s.intermediate}, dtype={self.dtype}, "
                f"shares weights with the model={self.shared}")
