"""IFEval with the official instruction checkers (lm-evaluation-harness's copy of Google's code).

Prompt: the IFEval prompt as one user turn through the tokenizer's chat template (generation
prompt added), no system message beyond what the template adds by itself.  No stop string: the
model's end-of-turn token ends it (lm-eval: until=[] and max_gen_toks=1280).

Scoring is lm-eval's `ifeval/utils.py` itself (`test_instruction_following_strict` / `_loose`):
prompt-level accuracy (all instructions of a prompt followed) and instruction-level accuracy
(over all instructions), strict and loose.  langdetect is seeded (0) so that one text always gets
the same language, which the official code leaves to chance.
"""

from __future__ import annotations

import contextlib
import logging
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from benchmarks.eval.data import DataError, read_jsonl, resolve_data_dir
from benchmarks.eval.task import Prompt

log = logging.getLogger(__name__)


def _nltk_dirs(data_dir: str | Path | None) -> list[str]:
    dirs = [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    with contextlib.suppress(DataError):
        dirs.append(str(resolve_data_dir(data_dir) / "nltk_data"))
    return dirs


@contextlib.contextmanager
def _no_nltk_download() -> Iterator[None]:
    """lm-eval's instructions_util calls nltk.download("punkt_tab") at import when the data is
    missing.  Evaluation must never reach the network, so for that import only the call becomes
    a no-op; the checkers that need punkt then raise LookupError when they run."""
    import nltk

    real = nltk.download
    nltk.download = lambda *a, **k: False
    try:
        yield
    finally:
        nltk.download = real


@lru_cache(maxsize=None)
def checkers(data_dir: str | None = None) -> ModuleType:
    """lm_eval.tasks.ifeval.utils, imported with NLTK pointed at the shared punkt_tab data."""
    try:
        import langdetect
        import nltk
    except ImportError as e:
        raise ImportError("IFEval scoring needs the eval extra: pip install -e '.[eval]'") from e
    for d in _nltk_dirs(data_dir):
        if d not in nltk.data.path:
            nltk.data.path.append(d)
    try:
        nltk.data.find("tokenizers/punkt_tab")
        have_punkt = True
    except LookupError:
        have_punkt = False
        log.warning("NLTK punkt_tab not found (set NLTK_DATA or --data-dir); IFEval checkers that "
                    "count sentences or words will fail")
    try:
        with contextlib.nullcontext() if have_punkt else _no_nltk_download():
            from lm_eval.tasks.ifeval import utils
    except ImportError as e:
        raise ImportError("IFEval scoring needs lm-eval: pip install -e '.[eval]'") from e
    langdetect.DetectorFactory.seed = 0
    return utils


def follows(item: dict[str, Any], response: str, *, loose: bool,
            data_dir: str | None = None) -> list[bool]:
    """One bool per instruction of `item`: does `response` follow it (official checker)."""
    utils = checkers(data_dir)
    inp = utils.InputExample(key=item["key"], instruction_id_list=item["instruction_id_list"],
                             prompt=item["prompt"], kwargs=item["kwargs"])
    test = utils.test_instruction_following_loose if loose else \
        utils.test_instruction_following_strict
    return list(test(inp, response).follow_instruction_list)


class IFEval:
    name = "ifeval"
    max_new_tokens = 1280          # lm-eval's max_gen_toks for ifeval
    stop: tuple[str, ...] = ()
    metrics = ("prompt_level_strict", "inst_level_strict", "prompt_level_loose",
               "inst_level_loose")
    prompt_format = "the prompt as one user turn with the tokenizer's chat template"

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self._data_dir = None if data_dir is None else str(data_dir)
        self._n_total = 0

    def items(self, limit: int | None = None) -> list[dict[str, Any]]:
        rows = read_jsonl(resolve_data_dir(self._data_dir) / "ifeval" / "input_data.jsonl")
        self._n_total = len(rows)
        rows = rows[:limit] if limit else rows
        return [{"id": str(r["key"]), **r} for r in rows]

    def subset(self, n: int) -> str:
        total = self._n_total or n
        return f"first {n} of {total} prompts" if n < total else f"all {n} prompts"

    def prompt(self, item: dict[str, Any], tokenizer: Any,
               max_new_tokens: int | None = None) -> Prompt:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": item["prompt"]}],
                                                 tokenize=False, add_generation_prompt=True)
            return Prompt(text=text, chat=True)
        log.warning("tokenizer has no chat template; IFEval prompts are fed as plain text")
        return Prompt(text=item["prompt"], chat=False)

    def score(self, item: dict[str, Any], generation: str) -> dict[str, Any]:
        strict = follows(item, generation, loose=False, data_dir=self._data_dir)
        loose = follows(item, generation, loose=True, data_dir=self._data_dir)
        return {"prompt_level_strict": all(strict), "inst_level_strict": strict,
                "prompt_level_loose": all(loose), "inst_level_loose": loose}
