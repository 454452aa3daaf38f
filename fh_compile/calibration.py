"""Calibration text for shaping FlashHead centroids, and the model's hidden states on it.

Two sources, neither an evaluation data set:
* "stdlib": the documentation strings of the Python standard library that runs this code (module
  docstrings and those of public functions and classes, sys.stdlib_module_names, inspect.getdoc),
  as conversations: user = the object's qualified name and signature, assistant = its docstring
  ("plain" format: the two joined by a blank line).  Cheap: teacher forcing only.
* "selfchat": the model's own sampled conversations (slow on a CPU: one decode step per token).
  For a chat model each conversation is made in two sampled stages from the chat template:
  1. the user turn: the template's prefix up to the user's content (the default system prompt and
     the user header), then the model samples the user's message (temperature user_temperature)
     until its end-of-turn token or user_tokens;
  2. the assistant turn: the conversation rendered with the generation prompt, then the model
     samples its answer (answer_temperature, top_p) until end of turn or answer_tokens.
For a base model ("plain" format) each text is sampled from the BOS token alone (user_temperature,
user_tokens + answer_tokens tokens).  The texts are then run teacher-forced once more and every
position's final hidden state (the LM head's input) is kept, except the shared template prefix.

    python -m fh_compile.calibration --model PATH --out results/calib/qwen --source stdlib \
        [--max-positions 30000]

writes calibration.jsonl (the texts, one JSON object a line) and hidden.safetensors (h [N, D] in
the model dtype; its metadata says how the text was made), the input of build_assets' centroid fit.
Cost (stdlib source, 30,000 positions, bf16, 2 CPU cores shared with other jobs, load 4-10):
Qwen2.5-Coder-1.5B 2,296 s (176 docstrings), Gemma-3-270M 824 s, SmolLM2-135M 230 s.  Sampling
("selfchat") costs one decode step per token: 8 Qwen conversations did not finish in 15 minutes
on the same machine, so it is meant for a GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FORMATS = ("chat", "plain")
HIDDEN_FILE = "hidden.safetensors"
TEXT_FILE = "calibration.jsonl"


@dataclass(frozen=True)
class SelfChatConfig:
    conversations: int = 384
    batch: int = 32
    user_tokens: int = 96
    answer_tokens: int = 320
    user_temperature: float = 1.0
    answer_temperature: float = 0.7
    top_p: float = 0.95
    prompt_format: str = "chat"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_format not in FORMATS:
            raise ValueError(f"prompt_format must be one of {FORMATS}, got {self.prompt_format!r}")
        if min(self.conversations, self.batch, self.user_tokens, self.answer_tokens) < 1:
            raise ValueError("conversations, batch, user_tokens and answer_tokens must be >= 1")
        if self.user_temperature <= 0 or self.answer_temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperatures must be > 0 and top_p in (0, 1]")


def _sample(model: Any, prompts: list[list[int]], max_new: int, temperature: float, top_p: float,
            stop: list[int], pad: int) -> list[list[int]]:
    """Sampled continuations (without the stop token) of left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])   # [B, T] int64
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                         temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new,
                         eos_token_id=stop, pad_token_id=pad)
    result = []
    for row in out[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in stop), len(row))
        result.append(row[:cut])
    return result


def self_chat(model: Any, tokenizer: Any, cfg: SelfChatConfig, stop: list[int]
              ) -> list[dict[str, str]]:
    """cfg.conversations sampled texts: {"user": ..., "assistant": ...} (chat) or {"text": ...}."""
    torch.manual_seed(cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    texts: list[dict[str, str]] = []
    while len(texts) < cfg.conversations:
        n = min(cfg.batch, cfg.conversations - len(texts))
        if cfg.prompt_format == "plain":
            # [BOS] as the tokenizer adds it; a tokenizer without BOS starts after an eos, as
            # documents follow each other in pretraining.
            bos = tokenizer("").input_ids or [stop[0]]
            outs = _sample(model, [bos] * n, cfg.user_tokens + cfg.answer_tokens,
                           cfg.user_temperature, cfg.top_p, stop, pad)
            texts += [{"text": tokenizer.decode(o)} for o in outs]
            continue
        users = _sample(model, [user_prefix(tokenizer)] * n, cfg.user_tokens,
                        cfg.user_temperature, 1.0, stop, pad)
        users = [tokenizer.decode(u, skip_special_tokens=True).strip() for u in users]
        users = [u for u in users if u]
        prompts = [render_chat(tokenizer, [{"role": "user", "content": u}])[0] for u in users]
        answers = _sample(model, prompts, cfg.answer_tokens, cfg.answer_temperature, cfg.top_p,
                          stop, pad)
        texts += [{"user": u, "assistant": tokenizer.decode(a, skip_special_tokens=True).strip()}
                  for u, a in zip(users, answers)]
    return texts[:cfg.conversations]


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Where a sampled turn ends: the generation config's eos ids and the tokenizer's eos id."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model names no eos token (generation_config.eos_token_id and "
                         "tokenizer.eos_token_id are unset): sampled turns would never end")
    return sorted(ids)


# Modules whose import has effects (opens a browser, prints, needs a display) or that are tests.
_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
                 "ensurepip", "venv", "pydoc_data", "lib2to3", "msilib", "winreg", "winsound",
                 "nt", "msvcrt", "webbrowser"}


def stdlib_docs(min_chars: int = 200, seed: int = 0) -> list[dict[str, str]]:
    """Docstrings (>= min_chars) of the standard library's modules and of their public functions
    and classes, as {"user": "<qualified name><signature>", "assistant": docstring}, shuffled."""
    import importlib
    import inspect
    import random
    import sys
    import warnings

    items = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(n for n in sys.stdlib_module_names if not n.startswith("_")):
            if name in _SKIP_MODULES:
                continue
            try:
                mod = importlib.import_module(name)
            except Exception:   # platform-specific modules (winreg, ...) or missing C parts
                continue
            objs = [(name, mod)] + [
                (f"{name}.{a}", o) for a, o in sorted(vars(mod).items())
                if not a.startswith("_") and getattr(o, "__module__", None) == name
                and (inspect.isfunction(o) or inspect.isclass(o) or inspect.isbuiltin(o))]
            for qual, obj in objs:
                doc = inspect.getdoc(obj)
                if not doc or len(doc) < min_chars:
                    continue
                try:
                    sig = str(inspect.signature(obj)) if callable(obj) else ""
                except (TypeError, ValueError):
                    sig = ""
                items.append({"user": qual + sig, "assistant": doc})
    random.Random(seed).shuffle(items)
    return items


def user_prefix(tokenizer: Any) -> list[int]:
    """Token ids of the chat template up to a user message's first content token."""
    marker = "\u2063CALIBRATION\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=False)
    return tokenizer(text[:text.index(marker)], add_special_tokens=False).input_ids


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], int]:
    """(ids of the conversation, with the generation prompt when the last turn is the user's;
    index of the first assistant-content token)."""
    gen = messages[-1]["role"] != "assistant"
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if gen:
        return ids, len(ids)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                           add_generation_prompt=True)
    return ids, len(tokenizer(prompt, add_special_tokens=False).input_ids)


def text_ids(tokenizer: Any, item: dict[str, str], prompt_format: str = "chat") -> list[int]:
    """Token ids of one calibration text (a conversation with its end-of-turn, or plain text)."""
    if "text" in item:
        return tokenizer(item["text"]).input_ids
    if prompt_format == "plain":
        return tokenizer(item["user"] + "\n\n" + item["assistant"]).input_ids
    return render_chat(tokenizer, [{"role": "user", "content": item["user"]},
                                   {"role": "assistant", "content": item["assistant"]}])[0]


@torch.inference_mode()
def hidden_states(model: Any, tokenizer: Any, texts: list[dict[str, str]], max_len: int = 1024,
                  max_positions: int | None = None, prompt_format: str = "chat"
                  ) -> tuple[torch.Tensor, int]:
    """(h [N, D] (model dtype): the LM head's input at every position of the texts, teacher forced
    one text at a time (no padding), without the prefix all texts share; the number of texts
    used).  Stops after the text that reaches max_positions (then N is cut to it)."""
    seqs = [text_ids(tokenizer, t, prompt_format)[:max_len] for t in texts]
    skip = 0
    while all(len(s) > skip + 1 for s in seqs) and len({s[skip] for s in seqs}) == 1:
        skip += 1
    out, n, used = [], 0, 0
    for ids in seqs:
        if max_positions is not None and n >= max_positions:
            break
        h = model.base_model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]
        out.append(h[max(skip - 1, 0):len(ids) - 1].cpu())           # positions predicting ids[1:]
        n += out[-1].shape[0]
        used += 1
    h = torch.cat(out)
    return (h if max_positions is None else h[:max_positions]), used


def save(folder: Path, texts: list[dict[str, str]], h: torch.Tensor, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / TEXT_FILE).write_text("".join(json.dumps(t) + "\n" for t in texts))
    save_file({"h": h.contiguous()}, str(folder / HIDDEN_FILE),
              metadata={"calibration": json.dumps(meta, sort_keys=True)})


def load_hidden(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """(h [N, D], the metadata describing its source) from a calibration folder or its file."""
    from safetensors import safe_open

    p = Path(path)
    p = p / HIDDEN_FILE if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: make calibration hidden states with "
                                f"python -m fh_compile.calibration --model ... --out DIR")
    with safe_open(str(p), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("calibration", "{}"))
        return f.get_tensor("h"), meta


def main(argv: list[str] | None = None) -> int:
    from fh_compile.loading import load_model

    p = argparse.ArgumentParser(prog="python -m fh_compile.calibration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="folder for calibration.jsonl + hidden.safetensors")
    p.add_argument("--source", choices=("stdlib", "selfchat"), default="stdlib")
    p.add_argument("--max-positions", type=int, default=30000)
    for f in SelfChatConfig.__dataclass_fields__.values():
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = SelfChatConfig(**{k: getattr(a, k) for k in SelfChatConfig.__dataclass_fields__})
    model, tok = load_model(a.model, dtype=getattr(torch, a.dtype))
    t0 = time.perf_counter()
    if a.source == "selfchat":
        texts = self_chat(model, tok, cfg, stop_ids(model, tok))
        source = ("the model's own sampled conversations (fh_compile.calibration.self_chat): no "
                  "human-written text")
    else:
        import platform
        texts = stdlib_docs(seed=cfg.seed)
        source = (f"docstrings of the Python {platform.python_version()} standard library "
                  f"(fh_compile.calibration.stdlib_docs): user = qualified name + signature, "
                  f"assistant = docstring")
    t_gen = time.perf_counter() - t0
    h, used = hidden_states(model, tok, texts, max_positions=a.max_positions,
                            prompt_format=cfg.prompt_format)
    t_fwd = time.perf_counter() - t0 - t_gen
    meta = {"source": source, "source_kind": a.source, "model": str(a.model),
            "prompt_format": cfg.prompt_format, "texts": used, "positions": h.shape[0],
            "dtype": a.dtype, "generate_seconds": round(t_gen, 1),
            "forward_seconds": round(t_fwd, 1), "torch": torch.__version__}
    if a.source == "selfchat":
        meta["config"] = asdict(cfg)
    save(Path(a.out), texts[:used], h, meta)
    print(f"{used} texts, {h.shape[0]} positions: text in {t_gen:.0f} s, hidden states in "
          f"{t_fwd:.0f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
