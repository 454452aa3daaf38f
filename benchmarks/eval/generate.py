"""Batched greedy generation with left padding, longest prompts first, for any head.

Prompts are sorted by token length (descending: padding stays small inside a batch and an
out-of-memory error shows up in the first batch, not the last), fed in batches to
`model.generate`, and the new text is cut at the first stop string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from benchmarks.eval.task import Prompt

# Tokens that end a turn in chat models; used as extra end-of-sequence ids when the vocabulary has
# them (a GGUF-loaded model may not carry the chat model's generation_config).
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


@dataclass(frozen=True)
class Generation:
    text: str                # decoded new tokens, cut at the first stop string
    n_prompt_tokens: int
    n_new_tokens: int        # up to and excluding the end-of-sequence token
    hit_max: bool            # stopped by max_new_tokens (no end token, no stop string)


def end_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that should end a sequence: the model's and tokenizer's eos plus end-of-turn."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += eos if isinstance(eos, list) else [eos]
    ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab]
    return sorted({int(i) for i in ids if i is not None})


def greedy_config(model: Any, tokenizer: Any, max_new_tokens: int,
                  stop: Sequence[str] = ()) -> Any:
    """A clean greedy GenerationConfig: a chat model's own generation_config (sampling,
    repetition_penalty) would otherwise leak into generate()'s defaults."""
    from transformers import GenerationConfig

    eos = end_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            repetition_penalty=1.0, eos_token_id=eos, pad_token_id=pad,
                            stop_strings=list(stop) or None)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """text up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, max_new_tokens: int,
             stop: Sequence[str] = (), batch_size: int = 16, desc: str = "generate",
             on_batch: Callable[[list[int], list[Generation]], None] | None = None
             ) -> list[Generation]:
    """Greedy continuations of `prompts` (results in the input order).

    on_batch(indices, generations) is called after each batch (to save progress)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = greedy_config(model, tokenizer, max_new_tokens, stop)
    ends = set(config.eos_token_id) | {config.pad_token_id}
    device = next(model.parameters()).device
    ids = [tokenizer(p.text, add_special_tokens=not p.chat).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    out: list[Generation | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        L = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), L), config.pad_token_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(batch), L), dtype=torch.long)                           # [B, L]
        for row, i in enumerate(batch):
            input_ids[row, L - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, L - len(ids[i]):] = 1
        seqs = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                              generation_config=config, tokenizer=tokenizer if stop else None)
        new = seqs[:, L:].tolist()                                                      # [B, T]
        gens = []
        for row, i in enumerate(batch):
            toks = new[row]
            n = next((j for j, t in enumerate(toks) if t in ends), len(toks))
            text, stopped = cut_at_stop(tokenizer.decode(toks[:n], skip_special_tokens=True), stop)
            gens.append(Generation(text=text, n_prompt_tokens=len(ids[i]), n_new_tokens=n,
                                   hit_max=n >= max_new_tokens and not stopped))
            out[i] = gens[-1]
        if on_batch is not None:
            on_batch(batch, gens)
        bar.update(len(batch))
    bar.close()
    return [g for g in out if g is not None]
