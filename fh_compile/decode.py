"""Static-KV-cache decoding for Hugging Face causal LMs: the fast forward or transformers' own.

Interface (shared by fh_compile.generate and export/):

    step = DecodeStep(model, max_batch_size=B, max_cache_len=L)     # allocates the cache
    first = step.prefill(prompt_ids, attention_mask)      # [B, T], left padded -> FlashHeadTopK
    out = step(next_ids)                                   # next_ids [B, 1] -> FlashHeadTopK
    tok = step.next_tokens(next_ids, SamplingConfig(...))  # [B, 1] -> [B] int64
    step.info                                              # StepInfo: which forward / attention

* Two forwards.  "fast" (fh_compile.fast_decoder: fused weights built from this instance, six
  custom ops a layer, decode attention that reads only the filled slots) for the architectures
  in fh_compile.arch.FAST_ARCHS; "hf" (transformers' own forward over a StaticCache) for the
  rest, or when asked (`forward="hf"`, for A/B runs).  `forward="auto"` picks fast where it
  can and records why not in `step.info.reason`; nothing falls back silently.
* Only the decoder body runs over the sequence; the head (a FlashHeadLMHead or the plain dense
  nn.Linear) sees the LAST position only, through `head_topk` / `head_next_tokens`: no
  [B, T, V] logits are ever made.
* State lives in buffers with fixed addresses, mutated in place, so the step compiles with
  `fullgraph=True` and replays as a CUDA graph.  fast: `kv{i}_k`, `kv{i}_v` [B, H_kv, L, Dh],
  `fill` [1] int64 (slots written), `starts` [B] int64 (first real slot of each row: left
  padding).  hf: the transformers StaticCache tensors (`kv{i}_k`, `kv{i}_v`, `kv{i}_len` []
  int64; a sliding-window layer's are a ring of `window` slots), `fill`, `attn_mask` [B, L]
  int64 (1 where a slot holds a real token of that row) and `positions` [B] int64 (rotary
  position of each row's next token).  Sliding layers also count their fill in a Python int
  (`cumulative_length_int`), which the compiled step must treat as dynamic (`step.sliding`;
  fh_compile.compile.compile_step does).
* Every call must pass exactly `max_batch_size` rows (the cache's batch is fixed); callers pad the
  batch with copies of a real row.
* `prefill` (eager, any T < L) resets the state first; `reset()` does only that.
* Build the step on the model's device and do not `.to()` it afterwards: the caches are
  allocated there (and the hf StaticCache holds its buffers by reference).

transformers 5.17 names the body's cache argument `past_key_values`, 5.24 `cache` (the old name is
deprecated there); both keep the fill counter inside the StaticCache layers, so no
`cache_position` is passed to the model.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers import StaticCache

from custom_ops import FlashHeadTopK
from custom_ops import counters as custom_counters
from custom_ops.counters import is_traced
from fh_compile import hf_attention
from fh_compile.arch import UnsupportedArchitecture
from fh_compile.fast_decoder import KERNELS, FastDecoder
from fh_compile.head import FlashHeadLMHead, _output_embeddings
from fh_compile.sampling import SamplingConfig, sample_candidates

log = logging.getLogger(__name__)

FORWARDS = ("auto", "fast", "hf")
ATTENTIONS = ("auto", "hf")


def head_topk(head: nn.Module, h: torch.Tensor, k: int,
              centroid_noise: torch.Tensor | None = None,
              softcap: float | None = None) -> FlashHeadTopK:
    """h [N, D] -> FlashHeadTopK(ids [N, k] int64, logits [N, k] fp32), best first.

    A FlashHeadLMHead runs its own path (FlashHead or dense); any other head is a dense
    nn.Linear-like module whose full fp32 logits are reduced with torch.topk.  softcap: the
    model's final logit soft-capping (Gemma 2: cap * tanh(logit / cap)), applied to the returned
    logits exactly as transformers applies it to the dense logits (the order is unchanged).
    """
    if isinstance(head, FlashHeadLMHead):
        out = head.topk(h, k, centroid_noise)
    else:
        logits = nn.functional.linear(h, head.weight, getattr(head, "bias", None)).float()
        vals, ids = logits.topk(k, dim=-1)                               # [N, k]
        out = FlashHeadTopK(ids, vals)
    if softcap:
        out = FlashHeadTopK(out.ids, torch.tanh(out.logits / softcap) * softcap)
    return out


def head_next_tokens(head: nn.Module, h: torch.Tensor, sampling: SamplingConfig, k: int,
                     softcap: float | None = None) -> torch.Tensor:
    """h [N, D] -> next token ids [N] int64.  Sampling draws among the k best candidates of
    either head (soft-capped like the model's logits), so FlashHead and dense A/B runs share one
    sampling pipeline."""
    if isinstance(head, FlashHeadLMHead):
        return head.next_tokens(h, sampling, softcap)
    cand = head_topk(head, h, 1 if not sampling.do_sample else k, softcap=softcap)
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


def check_forward_attention(forward: str, attention: str) -> None:
    """Raise ValueError for an unknown forward / attention or a combination that cannot run."""
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if attention == "hf" and forward == "fast":
        raise ValueError("attention='hf' (transformers' attention) needs forward='hf' or "
                         "'auto': the fast forward always runs the decode-attention op")


@dataclass(frozen=True)
class StepInfo:
    """Which decoder forward a DecodeStep runs.  forward: "fast" or "hf"; attention: the decode
    attention ("flashhead::rope_decode_attention" / "flashhead::decode_attention" or
    transformers' implementation name); reason: why the fast forward is not used (None when
    it is)."""

    forward: str
    attention: str
    reason: str | None = None


# The attention each fast-forward kernel set runs (StepInfo.attention).
FAST_ATTENTION = {"ops": "flashhead::rope_decode_attention",
                  "ops-unfused": "flashhead::decode_attention",
                  "torch": "plain PyTorch (fast forward, kernels='torch')"}


class DecodeStep(nn.Module):
    """One decode step of a causal LM over a static KV cache.  See the module docstring."""

    def __init__(self, model: nn.Module, *, max_batch_size: int = 1, max_cache_len: int = 2048,
                 k: int = 64, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, forward: str = "auto",
                 attention: str = "auto", kernels: str = "ops") -> None:
        super().__init__()
        if max_batch_size < 1 or max_cache_len < 2 or k < 1:
            raise ValueError(f"need max_batch_size >= 1, max_cache_len >= 2 and k >= 1, got "
                             f"{max_batch_size}, {max_cache_len}, {k}")
        check_forward_attention(forward, attention)
        # Checked here, not only in FastDecoder: transformers' forward reads it too (counters).
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.kernels = kernels
        if attention == "hf":
            forward = "hf"
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
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self.fast: FastDecoder | None = None
        self._hf_attention: str | None = None   # transformers' forward with the decode op
        self.sliding = False    # transformers' forward over sliding-window ring buffers
        reason = None
        if forward != "hf":
            try:
                self.fast = FastDecoder(model, dtype=dtype, device=device, kernels=kernels)
            except UnsupportedArchitecture as e:
                if forward == "fast":
                    raise
                reason = str(e)
                log.warning("DecodeStep: %s", e)
        else:
            reason = "forward='hf' was asked for"
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if self.fast is not None:
            self._init_fast_state(len(self.fast.layers), heads, head_dim, dtype, device)
            self.info = StepInfo("fast", FAST_ATTENTION[kernels])
        else:
            self._init_hf_state(config, heads, head_dim, dtype, device, reason)
            self.info = self._hf_attention_info(attention, reason)
        self.register_buffer("fill", torch.zeros(1, dtype=torch.int64, device=device),
                             persistent=False)                                      # [1]
        self.register_buffer("starts", torch.zeros(max_batch_size, dtype=torch.int64,
                                                   device=device), persistent=False)  # [B]
        self._init_counters(heads, device)
        for buf in self.buffers(recurse=False):
            torch._dynamo.mark_static_address(buf)

    def _init_fast_state(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device) -> None:
        B, L = self.max_batch_size, self.max_cache_len
        for i in range(layers):    # kv{i}_k / kv{i}_v: [B, Hkv, L, Dh]
            self.register_buffer(f"kv{i}_k", torch.zeros(B, heads, L, head_dim, dtype=dtype,
                                                         device=device), persistent=False)
            self.register_buffer(f"kv{i}_v", torch.zeros(B, heads, L, head_dim, dtype=dtype,
                                                         device=device), persistent=False)

    def _init_hf_state(self, config, heads: int, head_dim: int, dtype: torch.dtype,
                       device: torch.device, reason: str | None) -> None:
        self._cache_kw = _cache_argument_name(self.model.base_model)
        cache = StaticCache(config=config, max_cache_len=self.max_cache_len)
        if any(getattr(cache, "is_linear", [])):
            raise ValueError(f"transformers' forward in DecodeStep supports attention layers "
                             f"only, and this model has linear-attention layers (fast forward "
                             f"not used: {reason})")
        # Sliding-window layers keep a ring buffer of `window` slots and count their fill in a
        # Python int (`cumulative_length_int`): compile_step makes that int dynamic.
        self.sliding = any(cache.is_sliding)
        cache.early_initialization(self.max_batch_size, heads, head_dim, dtype, device)
        self.cache = cache
        for i, layer in enumerate(cache.layers):
            self.register_buffer(f"kv{i}_k", layer.keys, persistent=False)
            self.register_buffer(f"kv{i}_v", layer.values, persistent=False)
            self.register_buffer(f"kv{i}_len", layer.cumulative_length, persistent=False)
        # attn_mask: [B, L] int64; positions: [B] int64
        self.register_buffer("attn_mask", torch.zeros(self.max_batch_size, self.max_cache_len,
                                                      dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("positions", torch.zeros(self.max_batch_size, dtype=torch.int64,
                                                      device=device), persistent=False)

    def _init_counters(self, kv_heads: int, device: torch.device) -> None:
        """counters: [n] int32, the split-K kernels' scratch (custom_ops.counters), zero, and
        every kernel leaves it zero.  Held as state, the compiled step needs no fill kernel for
        it (one per attention and split-K linear call otherwise).  A step with kernels="torch"
        (what the ONNX export builds: plain PyTorch, or the decode op without counters) has
        none."""
        if self.kernels == "torch":
            self.counters = None
            return
        n = max(custom_counters.WORKSPACE_SIZE, self.max_batch_size * kv_heads * 16)
        self.register_buffer("counters", custom_counters.new_workspace(device, n),
                             persistent=False)                                      # [n]

    def _hf_attention_info(self, attention: str, reason: str | None) -> StepInfo:
        """Use flashhead::decode_attention inside transformers' forward (attention='auto'),
        through its attention interface; say which runs and why.  The op cannot read
        transformers' sliding-window ring buffers: such models keep transformers' attention,
        and the fallback says so."""
        own = str(self.model.config._attn_implementation)
        if attention == "hf":
            return StepInfo("hf", own, reason)
        if self.sliding:
            why = hf_attention.unsupported_reason(self.model)
            return StepInfo("hf", own, f"{reason}; transformers' attention, not "
                                       f"flashhead::decode_attention: {why}")
        hf_attention.register()
        self._hf_attention = hf_attention.ATTENTION_NAME
        return StepInfo("hf", f"flashhead::decode_attention (transformers' attention interface "
                              f"'{hf_attention.ATTENTION_NAME}')", reason)

    @contextmanager
    def attention_context(self) -> Iterator[None]:
        """While inside, THIS model's transformers forward uses the decode op (hf forward with
        attention='auto'); a no-op otherwise.  The model is switched back on exit, so its own
        `model.generate` keeps transformers' attention.  Compiled step functions are called
        inside it (CompiledDecoder does that); forward / next_tokens / prefill enter it."""
        name = self._hf_attention
        prev = None if name is None else str(self.model.config._attn_implementation)
        if name is not None and prev != name:
            self.model.set_attn_implementation(name)
        try:
            yield
        finally:
            if name is not None and prev != name:
                self.model.set_attn_implementation(prev)

    # -- state ------------------------------------------------------------------------------------
    @property
    def body(self) -> nn.Module:
        return self.model.base_model

    @property
    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.kv0_k.device

    @property
    def path(self) -> str:
        """'flashhead' or 'dense' for a decode step of max_batch_size rows."""
        return head_path(self.head, self.max_batch_size)

    @property
    def num_layers(self) -> int:
        return sum(1 for n, _ in self.named_buffers(recurse=False) if n.endswith("_k"))

    def caches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The per-layer K and V caches [B, H_kv, L, Dh] (the current buffers, read at call time so
        export.modules can rebind them)."""
        n = self.num_layers
        return ([getattr(self, f"kv{i}_k") for i in range(n)],
                [getattr(self, f"kv{i}_v") for i in range(n)])

    def cache_bytes(self) -> int:
        """Bytes of the K and V caches (all rows; per row: divide by max_batch_size)."""
        k, v = self.caches()
        return sum(t.numel() * t.element_size() for t in (*k, *v))

    def filled(self) -> torch.Tensor:
        """Slots of the cache already written: one int64 element on the cache's device."""
        return self.fill

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the cache (in place: addresses stay fixed for compiled graphs)."""
        self.starts.zero_()
        self.fill.zero_()
        if self.fast is not None:
            return
        for layer in self.cache.layers:
            layer.cumulative_length.zero_()
            if hasattr(layer, "cumulative_length_int"):      # sliding-window layers
                layer.cumulative_length_int = 0
        self.attn_mask.zero_()
        self.positions.zero_()

    # -- compute ----------------------------------------------------------------------------------
    def _hf_body(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        extra = {}
        if self._hf_attention is not None and input_ids.shape[1] == 1:
            extra = dict(fh_starts=self.starts, fh_fill=self.fill, fh_counters=self.counters)
        out = self.body(input_ids=input_ids, attention_mask=self.attn_mask,
                        position_ids=position_ids, use_cache=True, **{self._cache_kw: self.cache},
                        **extra)
        return out.last_hidden_state                                     # [B, T, D]

    def _check_rows(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.shape[0] != self.max_batch_size:
            raise ValueError(f"input_ids must be [{self.max_batch_size}, T] (the cache's batch), "
                             f"got {tuple(input_ids.shape)}; pad the batch with copies of a row")

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, 1] int64 -> last hidden state [B, D]; appends one slot to the cache.
        Call it inside `attention_context()` (compiled step functions are)."""
        self._check_rows(input_ids)
        if self.fast is not None:
            self.fill.add_(1)
            kv_k, kv_v = self.caches()
            return self.fast.decode(self.fast.embed(input_ids[:, 0]), kv_k, kv_v, self.starts,
                                    self.fill, self.counters)
        slot = self.filled().view(1)                                     # [1]
        self.attn_mask.index_fill_(1, slot, 1)
        self.fill.add_(1)
        h = self._hf_body(input_ids, self.positions.unsqueeze(1))[:, -1].contiguous()  # [B, D]
        self.positions.add_(1)
        return h

    def forward(self, input_ids: torch.Tensor) -> FlashHeadTopK:
        """input_ids [B, 1] int64 -> FlashHeadTopK(ids [B, k], logits [B, k] fp32)."""
        with self.attention_context():
            h = self.hidden(input_ids)
        return head_topk(self.head, h, self.k, softcap=self.softcap)

    def next_tokens(self, input_ids: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """input_ids [B, 1] int64 -> next token ids [B] int64 (greedy or sampled)."""
        with self.attention_context():
            h = self.hidden(input_ids)
        return head_next_tokens(self.head, h, sampling, self.k, self.softcap)

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
        device = self.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.to(device=device, dtype=torch.int64)
        input_ids = input_ids.to(device)
        self.reset()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)                # [B, T]
        if self.fast is not None:
            self.starts.copy_(T - mask.sum(-1))
            kv_k, kv_v = self.caches()
            h = self.fast.forward_torch(self.fast.embed(input_ids), kv_k, kv_v, self.fill,
                                        position_ids, self.starts,
                                        key_len=None if is_traced(input_ids) else T)
            self.fill.fill_(T)
            return h[:, -1].contiguous()
        self.attn_mask[:, :T] = mask
        self.starts.copy_(T - mask.sum(-1))
        with self.attention_context():
            h = self._hf_body(input_ids, position_ids)[:, -1].contiguous()
        self.positions.copy_(mask.sum(-1))
        self.fill.fill_(T)
        # Pad slots hold whatever attention made of fully masked rows; zero them so no kernel can
        # turn a masked NaN into a real one later (0 * NaN is NaN).
        # A sliding layer's ring of W slots holds the prompt's last W positions once T >= W.
        valid = self.attn_mask.bool()[:, None, :, None]                  # [B, 1, L, 1]
        for layer in self.cache.layers:
            first = max(T - layer.keys.shape[2], 0)
            kept = valid[:, :, first:first + layer.keys.shape[2]]        # [B, 1, W, 1]
            layer.keys.masked_fill_(~kept, 0)
            layer.values.masked_fill_(~kept, 0)
        return h

    def prefill(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> FlashHeadTopK:
        """Reset and run the prompt -> FlashHeadTopK of the last position (ids, logits [B, k])."""
        with torch.no_grad():
            return head_topk(self.head, self.prefill_hidden(input_ids, attention_mask), self.k,
                             softcap=self.softcap)

    def extra_repr(self) -> str:
        return (f"max_batch_size={self.max_batch_size}, max_cache_len={self.max_cache_len}, "
                f"k={self.k}, layers={self.num_layers}, path={self.path}, {self.info}")
