"""Real text for the fidelity benchmark, and the LM head's inputs on it (teacher forced, cached).

Conversations (prompt_format "chat": rendered with the tokenizer's chat template, so an assistant
answer ends with the template's end-of-turn token, e.g. <|im_end|>):
  gsm8k     user: question; assistant: the reference answer (with its <<calc>> marks and "#### N").
  ifeval    user: prompt, then the generation prompt; no assistant text.
  mmlu_pro  user: question and lettered options; assistant: "The answer is (X) <option text>".
prompt_format "plain" (base models without a chat template, e.g. Gemma-3-270M): the user text, a
blank line, then the assistant text, tokenized with the tokenizer's own special tokens (BOS).
Every position whose next token lies after the template's shared prefix (the default system
prompt, identical in every item) is kept; `is_answer` marks positions predicting assistant text.
With a per-item cap, positions predicting an end-of-turn / eos id are always kept (they are few,
and the eos recall metric needs them), the rest of the cap is a seeded random subset.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

DATASETS = ("gsm8k", "ifeval", "mmlu_pro")
PROMPT_FORMATS = ("chat", "plain")
_FILES = {"gsm8k": "gsm8k/test.jsonl", "ifeval": "ifeval/input_data.jsonl",
          "mmlu_pro": "mmlu_pro/test.jsonl"}


def conversations(name: str, data_dir: Path, seed: int = 0) -> Iterator[list[dict[str, str]]]:
    """Chat messages for each item of a data set, in a seeded shuffled order."""
    if name not in _FILES:
        raise ValueError(f"unknown data set {name!r}; choose from {DATASETS}")
    path = Path(data_dir) / _FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass --data-dir (see /work/shared/data/README.md)")
    # split("\n"), not splitlines(): MMLU-Pro text holds U+2028 and other Unicode line breaks.
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    random.Random(seed).shuffle(items)   # MMLU-Pro is sorted by category
    for it in items:
        if name == "gsm8k":
            yield [{"role": "user", "content": it["question"]},
                   {"role": "assistant", "content": it["answer"]}]
        elif name == "ifeval":
            yield [{"role": "user", "content": it["prompt"]}]
        else:
            letters = "ABCDEFGHIJ"
            opts = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(it["options"]))
            answer = f"The answer is ({it['answer']}) {it['options'][it['answer_index']]}"
            yield [{"role": "user", "content": f"{it['question']}\n\nOptions:\n{opts}"},
                   {"role": "assistant", "content": answer}]


def end_of_turn_ids(model: Any, tokenizer: Any) -> list[int]:
    """Sorted ids FlashHead scores at every step (fh_compile.always.always_scored_ids: the eos ids
    of the model's configs, the tokenizer's eos id and its end-of-turn tokens)."""
    from fh_compile.always import always_scored_ids

    return always_scored_ids(model, tokenizer)


def encode(tokenizer: Any, messages: list[dict[str, str]], prompt_format: str = "chat"
           ) -> tuple[list[int], int]:
    """(token ids of the conversation, index of its first assistant-content token)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "plain":
        prompt = tokenizer(messages[0]["content"] + "\n\n").input_ids
        if messages[-1]["role"] != "assistant":
            return prompt, len(prompt)
        ids = tokenizer(messages[0]["content"] + "\n\n" + messages[-1]["content"]).input_ids
        if ids[:len(prompt)] != prompt:
            raise ValueError("the tokenizer splits the prompt differently with an answer appended")
        return ids, len(prompt)

    def render(msgs: list[dict[str, str]], gen: bool) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return tokenizer(text, add_special_tokens=False).input_ids

    if messages[-1]["role"] != "assistant":
        ids = render(messages, gen=True)
        return ids, len(ids)
    ids, prompt = render(messages, gen=False), render(messages[:-1], gen=True)
    if ids[:len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently with an answer appended")
    return ids, len(prompt)


@dataclass
class HiddenSet:
    """LM-head inputs of one data set: h [N, D] (model dtype), next_ids [N] int64 (the token each
    position predicts), is_answer [N] bool, item [N] int64 (which conversation), always_ids [A]
    int64 (the model's end-of-turn / eos ids, end_of_turn_ids; empty when unknown)."""

    h: torch.Tensor
    next_ids: torch.Tensor
    is_answer: torch.Tensor
    item: torch.Tensor
    always_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def __post_init__(self) -> None:
        N = self.h.shape[0]
        for name in ("next_ids", "is_answer", "item"):
            if getattr(self, name).shape != (N,):
                raise ValueError(f"{name} must be [{N}], got {tuple(getattr(self, name).shape)}")


def collect_hidden(model: Any, tokenizer: Any, name: str, data_dir: Path, positions: int,
                   max_len: int = 1024, seed: int = 0, prefix_probe: int = 8,
                   per_item: int | None = None, prompt_format: str = "chat") -> HiddenSet:
    """Teacher-forced final hidden states (after the final norm: the LM head's input).

    per_item caps the positions kept per conversation (a seeded random subset), so that a fixed
    budget covers more conversations: positions of one text are strongly correlated (one rare
    token repeated through one item can decide a tail metric).  Positions predicting one of
    end_of_turn_ids(model, tokenizer) are kept first, then the cap is filled at random.

    Runs the decoder (`model.base_model`) one conversation at a time, so there is no padding;
    its last_hidden_state is exactly what lm_head receives (tests check lm_head(h) == logits).
    """
    convs = conversations(name, data_dir, seed)
    always = end_of_turn_ids(model, tokenizer)
    first = [encode(tokenizer, next(convs), prompt_format) for _ in range(prefix_probe)]
    skip = _common_prefix([ids for ids, _ in first])
    todo = iter(first)
    hs, nxt, ans, item = [], [], [], []
    n, i = 0, 0
    decoder = model.base_model
    gen = torch.Generator().manual_seed(seed)
    while n < positions:
        enc = next(todo, None)
        if enc is None:
            try:
                enc = encode(tokenizer, next(convs), prompt_format)
            except StopIteration:
                break
        ids, answer_start = enc
        ids = ids[:max_len]
        keep = torch.arange(max(skip - 1, 0), len(ids) - 1)            # keep[j] predicts ids[j + 1]
        if per_item is not None and keep.numel() > per_item:
            forced = torch.isin(torch.tensor(ids)[keep + 1], torch.tensor(always, dtype=torch.long))
            score = torch.rand(keep.numel(), generator=gen) - forced.float()  # forced ones first
            keep = keep[score.argsort()[:per_item].sort().values]
        keep = keep[: positions - n]
        if keep.numel():
            with torch.inference_mode():
                out = decoder(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
            hs.append(out.last_hidden_state[0, keep].cpu())
            nxt.append(torch.tensor(ids)[keep + 1])
            ans.append(keep + 1 >= answer_start)
            item.append(torch.full((keep.numel(),), i))
            n += keep.numel()
        i += 1
    if not hs:
        raise ValueError(f"no positions collected from {name}")
    return HiddenSet(torch.cat(hs), torch.cat(nxt), torch.cat(ans), torch.cat(item),
                     torch.tensor(always, dtype=torch.int64))


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for j in range(n):
        if len({s[j] for s in seqs}) > 1:
            return j
    return n


def cache_key(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def save_hidden(path: Path, hs: HiddenSet, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"h": hs.h.contiguous(), "next_ids": hs.next_ids, "is_answer": hs.is_answer,
               "item": hs.item, "always_ids": hs.always_ids}, str(tmp),
              metadata={"fidelity": json.dumps(meta, sort_keys=True)})
    tmp.replace(path)


def load_hidden(path: Path, meta: dict[str, Any]) -> HiddenSet | None:
    """The cached set, or None when absent or written for other settings (its metadata differs)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        if json.loads((f.metadata() or {}).get("fidelity", "{}")) != meta:
            return None
        return HiddenSet(*(f.get_tensor(k) for k in ("h", "next_ids", "is_answer", "item",
                                                     "always_ids")))
