"""Static-KV-cache decoding for Hugging Face causal LMs (Qwen2, Llama; tied or untied heads).

Interface (shared by fh_compile.generate and export/):

    step = DecodeStep(model, max_batch_size=B, max_cache_len=L)     # allocates the cache
    first = step.prefill(prompt_ids, attention_mask)      # [B, T], left padded -> FlashHeadTopK
    out = step(next_ids)                                   # next_ids [B, 1] -> FlashHeadTopK
    tok = step.next_tokens(next_ids, SamplingConfig(...))  # [B, 1] -> [B] int64

* Only the decoder body (`model.base_model`, e.g. `model.model`) runs over the sequence; the head
  (a FlashHeadLMHead or the plain dense nn.Linear) sees the LAST position only, through `head_topk`
  / `head_next_tokens`: no [B, T, V] logits are ever made.
* State lives in buffers with fixed addresses, mutated in place, so `forward` and `next_tokens`
  compile with `fullgraph=True` and replay as CUDA graphs: the transformers `StaticCache` tensors
  (`kv{i}_k`, `kv{i}_v` [B, H_kv, L, Dh], `kv{i}_len` [] int64: slots filled), `attn_mask`
  [B, L] int64 (1 where a slot holds a real token of that row) and `positions` [B] int64 (rotary
  position of each row's next token: left padding shifts it per row).
* Every call must pass exactly `max_batch_size` rows (the cache's batch is fixed); callers pad the
  batch with copies of a real row.  `cache_position` [1] int64, when given, must equal the number
  of slots already filled (the cache's own counter `kv0_len`, which is what None reads).
* `prefill` (eager, any T <= L) resets the state first; `reset()` does only that.
* Build the step on the model's device and do not `.to()` it afterwards: the cache object holds
  the buffers by reference.

transformers 5.17 names the body's cache argument `past_key_values`, 5.24 `cache` (the old name is
deprecated there); both keep the fill counter inside the StaticCache layers, so no
`cache_position` is passed to the model.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import StaticCache

from custom_ops import FlashHeadTopK
from fh_compile.head import FlashHeadLMHead, _output_embeddings
from fh_compile.sampling import SamplingConfig, sample_candidates


def head_topk(head: nn.Module, h: torch.Tensor, k: int,
              centroid_noise: torch.Tensor | None = None) -> FlashHeadTopK:
    """h [N, D] -> FlashHeadTopK(ids [N, k] int64, logits [N, k] fp32), best first.

    A FlashHeadLMHead runs its own path (FlashHead or dense); any other head is a dense
    nn.Linear-like module whose full fp32 logits are reduced with torch.topk.
    """
    if isinstance(head, FlashHeadLMHead):
        return head.topk(h, k, centroid_noise)
    logits = nn.functional.linear(h, head.weight, getattr(head, "bias", None)).float()  # [N, V]
    vals, ids = logits.topk(k, dim=-1)
    return FlashHeadTopK(ids, vals)


def head_next_tokens(head: nn.Module, h: torch.Tensor, sampling: SamplingConfig,
                     k: int) -> torch.Tensor:
    """h [N, D] -> next token ids [N] int64.  Sampling draws among the k best candidates of
    either head, so FlashHead and dense A/B runs share one sampling pipeline."""
    if isinstance(head, FlashHeadLMHead):
        return head.next_tokens(h, sampling)
    cand = head_topk(head, h, 1 if not sampling.do_sample else k)
    return sample_candidates(cand.ids, cand.logits, sampling)


def head_path(head: nn.Module, rows: int) -> str:
    """'flashhead' or 'dense': which head computation runs for `rows` rows per call."""
    return head.path_for(rows) if isinstance(head, FlashHeadLMHead) else "dense"


def _cache_argument_name(body: nn.Module) -> str:
    params = inspect.signature(body.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{type(body).__name__}.forward takes neither `cache` nor `past_key_values`; "
                    f"DecodeStep supports Hugging Face decoder-only models (Qwen2, Llama)")


class DecodeStep(nn.Module):
    """One decode step of a causal LM over a transformers StaticCache.  See the module docstring."""

    def __init__(self, model: nn.Module, *, max_batch_size: int = 1, max_cache_len: int = 2048,
                 k: int = 64, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if max_batch_size < 1 or max_cache_len < 2 or k < 1:
            raise ValueError(f"need max_batch_size >= 1, max_cache_len >= 2 and k >= 1, got "
                             f"{max_batch_size}, {max_cache_len}, {k}")
        _output_embeddings(model)  # a clear ValueError for models without an LM head
        body = getattr(model, "base_model", None)
        if body is None or body is model:
            raise ValueError(f"{type(model).__name__} is not a causal LM with a separate decoder "
                             f"body (model.base_model); load it with AutoModelForCausalLM")
        config = model.config.get_text_config(decoder=True)
        weight = next(body.parameters())
        dtype = dtype or weight.dtype
        device = torch.device(device) if device is not None else weight.device
        self.model = model
        self.max_batch_size, self.max_cache_len, self.k = max_batch_size, max_cache_len, k
        self._cache_kw = _cache_argument_name(body)

        cache = StaticCache(config=config, max_cache_len=max_cache_len)
        if any(cache.is_sliding) or any(getattr(cache, "is_linear", [])):
            raise ValueError("DecodeStep supports full-attention layers only (this model has "
                             "sliding-window or linear-attention layers)")
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache.early_initialization(max_batch_size, heads, head_dim, dtype, device)
        self.cache = cache
        for i, layer in enumerate(cache.layers):
            self.register_buffer(f"kv{i}_k", layer.keys, persistent=False)
            self.register_buffer(f"kv{i}_v", layer.values, persistent=False)
            self.register_buffer(f"kv{i}_len", layer.cumulative_length, persistent=False)
        # attn_mask: [B, L] int64; positions: [B] int64
        self.register_buffer("attn_mask", torch.zeros(max_batch_size, max_cache_len,
                                                      dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("positions", torch.zeros(max_batch_size, dtype=torch.int64,
                                                      device=device), persistent=False)
        torch._dynamo.mark_static_address(self.attn_mask)
        torch._dynamo.mark_static_address(self.positions)

    # -- state ------------------------------------------------------------------------------------
    @property
    def body(self) -> nn.Module:
        return self.model.base_model

    @property
    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def path(self) -> str:
        """'flashhead' or 'dense' for a decode step of max_batch_size rows."""
        return head_path(self.head, self.max_batch_size)

    def filled(self) -> torch.Tensor:
        """Slots of the cache already written: [] int64 on the cache's device."""
        return self.cache.layers[0].cumulative_length

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the cache (in place: addresses stay fixed for compiled graphs)."""
        for layer in self.cache.layers:
            layer.cumulative_length.zero_()
        self.attn_mask.zero_()
        self.positions.zero_()

    # -- compute ----------------------------------------------------------------------------------
    def _body(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.body(input_ids=input_ids, attention_mask=self.attn_mask,
                        position_ids=position_ids, use_cache=True, **{self._cache_kw: self.cache})
        return out.last_hidden_state                                     # [B, T, D]

    def _check_rows(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.shape[0] != self.max_batch_size:
            raise ValueError(f"input_ids must be [{self.max_batch_size}, T] (the cache's batch), "
                             f"got {tuple(input_ids.shape)}; pad the batch with copies of a row")

    def hidden(self, input_ids: torch.Tensor,
               cache_position: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, 1] int64 -> last hidden state [B, D]; appends one slot to the cache."""
        self._check_rows(input_ids)
        slot = self.filled().view(1) if cache_position is None else cache_position  # [1]
        self.attn_mask.index_fill_(1, slot, 1)
        h = self._body(input_ids, self.positions.unsqueeze(1))[:, -1].contiguous()  # [B, D]
        self.positions.add_(1)
        return h

    def forward(self, input_ids: torch.Tensor,
                cache_position: torch.Tensor | None = None) -> FlashHeadTopK:
        """input_ids [B, 1] int64 -> FlashHeadTopK(ids [B, k], logits [B, k] fp32)."""
        return head_topk(self.head, self.hidden(input_ids, cache_position), self.k)

    def next_tokens(self, input_ids: torch.Tensor, sampling: SamplingConfig,
                    cache_position: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, 1] int64 -> next token ids [B] int64 (greedy or sampled)."""
        return head_next_tokens(self.head, self.hidden(input_ids, cache_position), sampling,
                                self.k)

    @torch.no_grad()
    def prefill_hidden(self, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reset, then run the prompt.  input_ids [B, T] int64, attention_mask [B, T] (0 = left
        padding) -> hidden state of the last position [B, D]."""
        self._check_rows(input_ids)
        B, T = input_ids.shape
        if T >= self.max_cache_len:
            raise ValueError(f"prompt of {T} tokens leaves no room in a cache of "
                             f"max_cache_len={self.max_cache_len}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.to(device=self.attn_mask.device, dtype=torch.int64)
        self.reset()
        self.attn_mask[:, :T] = mask
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)                # [B, T]
        h = self._body(input_ids.to(self.attn_mask.device), position_ids)[:, -1].contiguous()
        self.positions.copy_(mask.sum(-1))
        # Pad slots hold whatever attention made of fully masked rows; zero them so no kernel can
        # turn a masked NaN into a real one later (0 * NaN is NaN).
        valid = self.attn_mask.bool()[:, None, :, None]                  # [B, 1, L, 1]
        for layer in self.cache.layers:
            layer.keys.masked_fill_(~valid, 0)
            layer.values.masked_fill_(~valid, 0)
        return h

    def prefill(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> FlashHeadTopK:
        """Reset and run the prompt -> FlashHeadTopK of the last position (ids, logits [B, k])."""
        with torch.no_grad():
            return head_topk(self.head, self.prefill_hidden(input_ids, attention_mask), self.k)

    def extra_repr(self) -> str:
        return (f"max_batch_size={self.max_batch_size}, max_cache_len={self.max_cache_len}, "
                f"k={self.k}, layers={len(self.cache.layers)}, path={self.path}")
