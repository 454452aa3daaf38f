r"""MMLU-Pro, 5-shot chain of thought, in the format of the official script
(TIGER-AI-Lab/MMLU-Pro `evaluate_from_local.py`), on a seeded stratified subset of the test split.

Prompt (plain completion, as the official script feeds vLLM; identical for dense and FlashHead):
the header line below with the category, a blank line, then the category's first 5 validation
exemplars as "Question:\n{q}\nOptions:\nA. ..\n" + their cot_content with its leading
"A: Let's think step by step." turned into "Answer: Let's think step by step.", each followed by
a blank line, then the test question ending in "Answer: Let's think step by step.".  As in the
official script, exemplars are dropped from the end while the prompt is not shorter than
max_model_len - max_new_tokens tokens (4096 - 2048).  Generation stops at "Question:".

Answer letter: `answer is \(?([A-J])\)?`, else `.*[aA]nswer:\s*([A-J])`, else the last
standalone capital A-J.  Differences from the official script: its last fallback takes any
capital A-J even inside a word, and it replaces a missing answer with a random guess; here the
letter must stand alone and a missing answer (None) counts as wrong.  "N/A" padding options
(validation exemplars have them) are dropped, as the official script's preprocess() does.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.eval.data import read_jsonl, resolve_data_dir
from benchmarks.eval.task import Prompt

LETTERS = "ABCDEFGHIJ"
HEADER = ("The following are multiple choice questions (with answers) about {category}. Think step "
          "by step and then finish your answer with \"the answer is (X)\" where X is the correct "
          "letter choice.\n")
_ANSWER_IS = re.compile(r"answer is \(?([A-J])\)?")
_ANSWER_COLON = re.compile(r".*[aA]nswer:\s*([A-J])")
_LONE_LETTER = re.compile(r"(?<![A-Za-z])([A-J])(?![A-Za-z])")


def extract_letter(generation: str) -> str | None:
    """The chosen option letter, or None for a malformed output (scored wrong)."""
    for pattern in (_ANSWER_IS, _ANSWER_COLON):
        m = pattern.search(generation)
        if m:
            return m.group(1)
    found = _LONE_LETTER.findall(generation)
    return found[-1] if found else None


def format_question(example: dict[str, Any], with_answer: bool) -> str:
    text = f"Question:\n{example['question']}\nOptions:\n"
    options = [o for o in example["options"] if o != "N/A"]  # the official preprocess()
    text += "".join(f"{LETTERS[i]}. {opt}\n" for i, opt in enumerate(options))
    if with_answer:
        cot = example["cot_content"].replace("A: Let's think step by step.",
                                             "Answer: Let's think step by step.")
        return text + cot + "\n\n"
    return text + "Answer: Let's think step by step."


def stratified_subset(rows: list[dict[str, Any]], per_category: int | None,
                      seed: int) -> list[dict[str, Any]]:
    """`per_category` items drawn per category (all when None), seeded; interleaved round-robin
    over the sorted categories so that any prefix (--limit) spans many categories."""
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    rng = random.Random(seed)
    picked = []
    for cat in sorted(by_cat):
        pool = by_cat[cat]
        chosen = pool if per_category is None or per_category >= len(pool) else \
            rng.sample(pool, per_category)
        picked.append(sorted(chosen, key=lambda r: r["question_id"]))
    out = []
    for i in range(max((len(p) for p in picked), default=0)):
        out.extend(p[i] for p in picked if i < len(p))
    return out


class MMLUPro:
    name = "mmlu_pro"
    max_new_tokens = 2048         # the official script's
    stop = ("Question:",)
    metrics = ("accuracy",)
    prompt_format = ("plain completion, 5-shot CoT from the validation split (official MMLU-Pro "
                     "format), shots dropped while prompt >= max_model_len - max_new_tokens")

    def __init__(self, data_dir: str | Path | None = None, per_category: int | None = 50,
                 seed: int = 0, shots: int = 5, max_model_len: int = 4096) -> None:
        if per_category is not None and per_category < 1:
            raise ValueError(f"per_category must be >= 1 (or None for all), got {per_category}")
        self._data_dir = data_dir
        self.per_category, self.seed, self.shots = per_category, seed, shots
        self.max_model_len = max_model_len
        self._exemplars: dict[str, list[dict[str, Any]]] | None = None
        self._n_test = 0
        self._n_categories = 0

    def items(self, limit: int | None = None) -> list[dict[str, Any]]:
        rows = read_jsonl(resolve_data_dir(self._data_dir) / "mmlu_pro" / "test.jsonl")
        self._n_test = len(rows)
        self._n_categories = len({r["category"] for r in rows})
        rows = stratified_subset(rows, self.per_category, self.seed)
        rows = rows[:limit] if limit else rows
        keep = ("question_id", "question", "options", "answer", "answer_index", "category")
        return [{"id": str(r["question_id"]), **{k: r[k] for k in keep}} for r in rows]

    def subset(self, n: int) -> str:
        per = "all" if self.per_category is None else f"{self.per_category} per category"
        return (f"{n} of {self._n_test} test items: stratified, {per} over {self._n_categories} "
                f"categories, seed {self.seed}, round-robin order")

    def exemplars(self, category: str) -> list[dict[str, Any]]:
        if self._exemplars is None:
            val = read_jsonl(resolve_data_dir(self._data_dir) / "mmlu_pro" / "validation.jsonl")
            self._exemplars = defaultdict(list)
            for r in val:
                self._exemplars[r["category"]].append(r)
        return self._exemplars[category][: self.shots]

    def prompt(self, item: dict[str, Any], tokenizer: Any = None,
               max_new_tokens: int | None = None) -> Prompt:
        budget = self.max_model_len - (max_new_tokens or self.max_new_tokens)
        shots = self.exemplars(item["category"])
        k = len(shots)
        while True:
            text = HEADER.format(category=item["category"]) + "\n"
            text += "".join(format_question(s, with_answer=True) for s in shots[:k])
            text += format_question(item, with_answer=False)
            if k == 0 or tokenizer is None or len(tokenizer(text).input_ids) < budget:
                return Prompt(text=text, chat=False, n_shots=k)
            k -= 1

    def score(self, item: dict[str, Any], generation: str) -> dict[str, bool]:
        return {"accuracy": extract_letter(generation) == item["answer"]}
