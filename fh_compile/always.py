"""Always-scored tokens: the end-of-sequence / end-of-turn ids FlashHead scores at every step.

FlashHead scores only the tokens of the clusters its probes reach.  A token the model needs at a
few positions only, such as the end of a turn, may sit in a cluster that ranks low exactly there
(SmolLM2-135M-Instruct's <|im_end|>: cluster rank 1,263 of 3,072 where the dense head's top-1 is
<|im_end|>), and then generation never stops.  The ids listed here are scored exactly at every
step whatever the probes (flashhead::topk's always_ids), so FlashHead stops where the dense head
stops.  The list is small (1-10 ids) and fixed per model: it costs A * D weight bytes per step.

    ids = always_scored_ids(model, tokenizer)          # eos ids + end-of-turn tokens, sorted
    swap_head(model, assets, always_ids=ids)           # or None: the assets' list + the model's
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, NamedTuple, Sequence

import torch

log = logging.getLogger(__name__)

# End-of-turn tokens of common chat vocabularies; those present in a tokenizer's vocabulary are
# always scored (ChatML, Llama 3, Gemma, Phi-3).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "<|end|>",
                      "<|eom_id|>")


def check_always_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    """The ids sorted and deduplicated; ValueError unless each is an int in [0, vocab_size)."""
    out = set()
    for i in ids:
        if isinstance(i, torch.Tensor) and i.numel() == 1:
            i = i.item()
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"always-scored ids must be ints (vocabulary ids), got {i!r}")
        if not 0 <= i < vocab_size:
            raise ValueError(f"always-scored id {i} is not a row of the LM head (V={vocab_size}); "
                             f"pass vocabulary ids in [0, {vocab_size})")
        out.add(int(i))
    return sorted(out)


def _eos_of(config: Any) -> list[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else [int(e) for e in eos]


def _tokenizer_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's eos id and the END_OF_TURN_TOKENS in its vocabulary."""
    ids = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids += [int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab]
    return ids


def _extra_ids(extra: Iterable[int | str], tokenizer: Any) -> list[int]:
    """User-named ids: ints, or token strings looked up in the tokenizer's vocabulary."""
    ids = []
    for e in extra:
        if isinstance(e, str):
            vocab = tokenizer.get_vocab() if tokenizer is not None else None
            if vocab is None:
                raise ValueError(f"the always-scored token {e!r} is a string; pass the tokenizer "
                                 f"too, or its vocabulary id")
            if e not in vocab:
                raise ValueError(f"the always-scored token {e!r} is not in the tokenizer's "
                                 f"vocabulary")
            ids.append(int(vocab[e]))
        else:
            ids.append(e)
    return ids


def collect_always_ids(configs: Sequence[Any], tokenizer: Any, vocab_size: int,
                       extra: Iterable[int | str] = ()) -> list[int]:
    """Sorted, deduplicated always-scored ids from configs (their eos_token_id, int or list), a
    tokenizer (its eos id and the END_OF_TURN_TOKENS it has; None: none) and user-named extra
    ids or token strings.  Configured and named ids must be rows of the head (ValueError);
    tokenizer ids >= vocab_size (tokens the head cannot produce) are left out with a log line."""
    ids = [i for c in configs if c is not None for i in _eos_of(c)]
    ids += _extra_ids(extra, tokenizer)
    found = check_always_ids(ids, vocab_size)
    if tokenizer is not None:
        tok = set(_tokenizer_ids(tokenizer))
        beyond = sorted(i for i in tok if not 0 <= i < vocab_size)
        if beyond:
            log.info("tokenizer ids %s are not rows of the LM head (V=%d): not always scored",
                     beyond, vocab_size)
        found = sorted(set(found) | {i for i in tok if 0 <= i < vocab_size})
    return found


def head_vocab_size(model: Any) -> int:
    """Rows of the model's LM head (FlashHead's or the dense one), else config.vocab_size."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    if head is not None and isinstance(getattr(head, "weight", None), torch.Tensor):
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def always_scored_ids(model: Any, tokenizer: Any = None,
                      extra: Iterable[int | str] = ()) -> list[int]:
    """The ids FlashHead should score at every step for this model: the eos ids of
    model.generation_config and model.config (int or list), the tokenizer's eos id and the
    end-of-turn tokens in its vocabulary (END_OF_TURN_TOKENS: "<|im_end|>", "<|eot_id|>",
    "<end_of_turn>", "<|endoftext|>", ...) when a tokenizer is given, and `extra` (vocabulary
    ids, or token strings when a tokenizer is given).  Sorted, deduplicated, each in [0, V).

    Raises ValueError for a configured or named id outside the head, or an unknown token string.
    """
    configs = [getattr(model, "generation_config", None), getattr(model, "config", None)]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    return collect_always_ids(configs, tokenizer, head_vocab_size(model), extra)


def always_ids_for_model_files(spec: str | os.PathLike, vocab_size: int,
                               extra: Iterable[int | str] = ()) -> tuple[list[int], Any]:
    """(always-scored ids, tokenizer or None) of a model spec (Hugging Face folder, .gguf file,
    hub id) from its config, generation config and tokenizer, without loading the weights: what
    the asset builder records in the assets' metadata."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from fh_compile.loading import resolve_spec

    src = resolve_spec(spec)
    where = src.hub_id if src.kind == "hub" else src.folder
    kw = {"gguf_file": src.gguf_file} if src.kind == "gguf" else {}
    config = AutoConfig.from_pretrained(where, **kw)
    try:
        generation = GenerationConfig.from_pretrained(where, **kw)
    except (OSError, ValueError, TypeError):        # none saved (GGUF files hold none)
        generation = GenerationConfig.from_model_config(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    except (OSError, ValueError) as e:
        log.warning("no tokenizer for %s (%s): end-of-turn tokens from the configs only", spec, e)
        tokenizer = None
    configs = [generation, config, config.get_text_config()]
    return collect_always_ids(configs, tokenizer, vocab_size, extra), tokenizer


class AlwaysScoredToken(NamedTuple):
    """One always-scored id as the assets hold it: its row in the reordered head and cluster.
    retrievable: the row holds this id (token_ids[row] == id) and, when the source head was
    given, exactly the source's row of that id, so scoring the row scores this token."""

    id: int
    token: str | None
    row: int
    cluster: int
    retrievable: bool

    def describe(self) -> str:
        name = f" {self.token!r}" if self.token is not None else ""
        state = ("scored at every step" if self.retrievable else
                 "NOT RETRIEVABLE: its row does not hold this token; rebuild the assets")
        return (f"always-scored id {self.id}{name}: row {self.row} of the reordered head, "
                f"cluster {self.cluster}; {state}")


def always_report(assets: Any, weight: torch.Tensor | None = None,
                  tokenizer: Any = None) -> list[AlwaysScoredToken]:
    """Per always-scored id of `assets` (FlashHeadAssets): where it lives and whether it is
    retrievable (see AlwaysScoredToken).  weight: the source LM head [V, D] in vocabulary order,
    to compare rows with; tokenizer: for the token strings.  Empty when the assets list none."""
    ids = assets.always_ids or []
    token_ids, offsets = assets.token_ids.cpu(), assets.offsets.cpu()
    inverse = torch.empty_like(token_ids)
    inverse[token_ids] = torch.arange(token_ids.shape[0])
    out = []
    for i in ids:
        row = int(inverse[i])
        cluster = int(torch.searchsorted(offsets, row, right=True)) - 1
        ok = int(token_ids[row]) == i and cluster < assets.num_clusters
        if weight is not None:
            ok = ok and torch.equal(assets.weight[row].cpu(), weight[i].to(assets.weight.dtype).cpu())
        token = tokenizer.convert_ids_to_tokens(i) if tokenizer is not None else None
        out.append(AlwaysScoredToken(i, token, row, cluster, ok))
    return out
