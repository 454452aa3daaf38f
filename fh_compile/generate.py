"""generate: a static-cache decode loop (prefill once, then the compiled step) with FlashHead.

    model = compile_model(model, max_batch_size=4)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=64, do_sample=True, seed=0)
    out.sequences, out.num_generated, out.path

Prompts are left padded (tokenizer.padding_side = "left").  On a model that compile_model has not
prepared, the same loop runs eagerly over a cache sized for this call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fh_compile.compile import CompiledDecoder, CompileInfo, CompileOptions
from fh_compile.decode import DecodeStep, head_next_tokens
from fh_compile.head import FlashHeadLMHead, _output_embeddings
from fh_compile.sampling import SamplingConfig


@dataclass(frozen=True)
class GenerateResult:
    """sequences [B, T + n] int64: the prompts (as given, padding included) followed by n
    generated columns (n <= max_new_tokens; rows that stopped early are filled with pad_token_id).
    num_generated [B] int64: tokens each row generated, its eos included.  path: 'flashhead' or
    'dense' (what the decode step's head computed).  mode: the torch.compile mode (None: eager)."""

    sequences: torch.Tensor
    num_generated: torch.Tensor
    path: str
    mode: str | None
    prompt_len: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def new_tokens(self) -> torch.Tensor:
        """[B, n] int64: the generated columns only."""
        return self.sequences[:, self.prompt_len:]


def _eos_ids(model: nn.Module, eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int):
        return (eos_token_id,)
    return tuple(int(e) for e in eos_token_id)


def _pad_id(model: nn.Module, pad_token_id: int | None, eos: tuple[int, ...]) -> int:
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad_token_id is None:
        return eos[0] if eos else 0
    return int(pad_token_id)


def _decoder_for(model: nn.Module, rows: int, length: int) -> CompiledDecoder:
    """model.fh_compiled, or an eager decoder sized for this call."""
    compiled = getattr(model, "fh_compiled", None)
    if isinstance(compiled, CompiledDecoder):
        return compiled
    head = _output_embeddings(model)
    flash = isinstance(head, FlashHeadLMHead)
    k = head.config.k if flash else 64
    step = DecodeStep(model, max_batch_size=rows, max_cache_len=length, k=k)
    opts = CompileOptions(mode=None, flashhead=flash, max_batch_size=rows, max_cache_len=length,
                          k=k, probes=head.config.probes if flash else 1)
    return CompiledDecoder(step, CompileInfo(head="flashhead" if flash else "dense",
                                             path=step.path, mode=None, options=opts))


def _prompt_tensors(input_ids: Any, attention_mask: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask) from a tensor, or from a BatchEncoding / dict holding them."""
    if isinstance(input_ids, Mapping):
        if "input_ids" not in input_ids:
            raise TypeError(f"generate got a {type(input_ids).__name__} without 'input_ids' (keys "
                            f"{sorted(input_ids)}); pass the tokenizer's output or a [B, T] tensor")
        if attention_mask is not None and input_ids.get("attention_mask") is not None:
            raise TypeError("attention_mask was passed twice (as an argument and inside the "
                            "BatchEncoding / dict); pass it once")
        if attention_mask is None:
            attention_mask = input_ids.get("attention_mask")
        input_ids = input_ids["input_ids"]
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a [B, T] int64 tensor or a BatchEncoding / dict with "
                        f"'input_ids' (and 'attention_mask'), got {type(input_ids).__name__}; "
                        f"e.g. tok.apply_chat_template(messages, add_generation_prompt=True, "
                        f"return_dict=True, return_tensors='pt')")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a [B, T] tensor or None, got "
                        f"{type(attention_mask).__name__}")
    return input_ids, attention_mask


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor | Mapping[str, torch.Tensor],
             attention_mask: torch.Tensor | None = None,
             *, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int | None = None, streamer: Any = None,
             stochastic_probing: bool = False, check_every: int = 8) -> GenerateResult:
    """Generate up to max_new_tokens per row; stops early once every row has emitted an eos.

    input_ids [B, T] int64, attention_mask [B, T] (0 = left padding) or None; or, as input_ids,
    a tokenizer's BatchEncoding / a dict holding both (`tok(..., return_tensors="pt")`,
    `tok.apply_chat_template(..., return_dict=True, return_tensors="pt")`).  eos_token_id /
    pad_token_id None: from model.generation_config.  seed: torch.manual_seed(seed) first, so a
    seeded run repeats exactly (on the same device and compile mode).  streamer: an HF-style
    object with put(tensor) (the prompt first, then each new column [B]) and end().  Finished
    rows are checked on the host every `check_every` steps (every step with a streamer).
    """
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, stochastic_probing=stochastic_probing)
    input_ids, attention_mask = _prompt_tensors(input_ids, attention_mask)
    if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        raise ValueError(f"input_ids must be [B, T] int64, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    if max_new_tokens < 1 or check_every < 1:
        raise ValueError(f"max_new_tokens and check_every must be >= 1, got {max_new_tokens}, "
                         f"{check_every}")
    B, T = input_ids.shape
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        if not bool((attention_mask[:, -1] != 0).all()):
            raise ValueError("the last prompt position of every row must be a real token: pad on "
                             "the left (tokenizer.padding_side = 'left')")
    dec = _decoder_for(model, B, T + max_new_tokens)
    step = dec.step
    if B > step.max_batch_size:
        raise ValueError(f"batch of {B} rows exceeds max_batch_size={step.max_batch_size}; "
                         f"compile_model(..., max_batch_size={B})")
    if T + max_new_tokens > step.max_cache_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_cache_len={step.max_cache_len}; compile_model(..., max_cache_len=...)")
    eos = _eos_ids(model, eos_token_id)
    pad = _pad_id(model, pad_token_id, eos)
    if seed is not None:
        torch.manual_seed(seed)
    device = step.device
    # Fill the cache's fixed batch with copies of the last row (their tokens are dropped).
    rows = torch.arange(step.max_batch_size).clamp(max=B - 1)
    ids = input_ids.to(device)[rows.to(device)]
    mask = None if attention_mask is None else attention_mask.to(device)[rows.to(device)]

    t0 = time.perf_counter()
    tok = head_next_tokens(step.head, step.prefill_hidden(ids, mask), sampling, step.k,
                           step.softcap)                                # [Bmax]
    eos_t = torch.tensor(eos or (-1,), device=device)
    finished = (tok.unsqueeze(1) == eos_t).any(dim=1)                   # [Bmax] bool
    gen = torch.full((step.max_batch_size, max_new_tokens), pad, dtype=torch.int64, device=device)
    gen[:, 0] = tok
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(tok[:B].cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()

    fn = dec.step_fn(sampling, eos, pad)
    n = 1
    every = 1 if streamer is not None else check_every
    while n < max_new_tokens:
        if n % every == 0 and eos and bool(finished[:B].all()):
            break
        torch.compiler.cudagraph_mark_step_begin()
        nxt, fin = fn(tok, finished)
        gen[:, n] = nxt
        tok, finished = nxt.clone(), fin.clone()  # CUDA-graph outputs are overwritten next replay
        n += 1
        if streamer is not None:
            streamer.put(tok[:B].cpu())
    if streamer is not None:
        streamer.end()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()

    hit = (gen[:B, :n].unsqueeze(2) == eos_t).any(dim=2)                # [B, n]
    num = torch.where(hit.any(dim=1), hit.int().argmax(dim=1) + 1, n)
    # Columns after a row's eos are already pad (the step emits pad for finished rows); drop the
    # columns run past the last eos between two host checks.
    new = gen[:B, :int(num.max())]
    return GenerateResult(sequences=torch.cat([input_ids.to(device), new], dim=1),
                          num_generated=num.to(torch.int64), path=step.path, mode=dec.info.mode,
                          prompt_len=T, prefill_seconds=t1 - t0, decode_seconds=t2 - t1)
