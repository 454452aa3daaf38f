"""GSM8K, 8-shot chain of thought, in lm-eval's `gsm8k-cot` format.

Prompt (plain completion, no chat template, identical for the dense and the FlashHead run): the
8 Wei et al. exemplars as `Q: {question}\nA: {target}` joined by blank lines, then
`Q: {question}\nA:`.  This is what lm-eval's gsm8k-cot feeds any model without
--apply_chat_template; it keeps the `Q:` / blank-line stops meaningful for a chat model too.

Generation stops at "Q:" or a blank line.  Scoring: exact match of the final number; the number
after "The answer is" (any case) first, else the last number in the output.  Commas, "$" and a
trailing ".0" are normalised away; the gold answer is the number after "####".
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from benchmarks.eval.data import read_jsonl, resolve_data_dir
from benchmarks.eval.task import Prompt

_ANSWER_IS = re.compile(r"the answer is\s*:?\s*(-?)\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"(-?)\$?(\d[\d,]*(?:\.\d+)?)")


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5', '-3.0' -> '-3', '7.' -> '7'; None if `text` holds no number."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(generation: str) -> str | None:
    """The final number of a chain of thought, normalised; None when there is no number."""
    m = _ANSWER_IS.search(generation)
    if m:
        return normalize_number(m.group(1) + m.group(2))
    found = _NUMBER.findall(generation)
    if not found:
        return None
    sign, digits = found[-1]
    return normalize_number(sign + digits)


def strict_answer(generation: str) -> str | None:
    """Only the number after "The answer is" (lm-eval's strict-match, case-insensitive here)."""
    m = _ANSWER_IS.search(generation)
    return normalize_number(m.group(1) + m.group(2)) if m else None


def gold_answer(answer: str) -> str:
    """The reference number: what follows '####' in GSM8K's answer field."""
    gold = normalize_number(answer.split("####")[-1])
    if gold is None:
        raise ValueError(f"GSM8K answer without a number after '####': {answer[-60:]!r}")
    return gold


class GSM8K:
    name = "gsm8k"
    max_new_tokens = 256          # lm-eval's default max_gen_toks for gsm8k-cot
    stop = ("Q:", "\n\n")
    metrics = ("exact_match", "strict_match")
    prompt_format = "plain completion, 8-shot CoT (lm-eval gsm8k-cot exemplars), no chat template"

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self._data_dir = data_dir
        self._fewshot: str | None = None
        self._n_shots = 0
        self._n_test: int | None = None

    def items(self, limit: int | None = None) -> list[dict[str, Any]]:
        rows = read_jsonl(resolve_data_dir(self._data_dir) / "gsm8k" / "test.jsonl")
        self._n_test = len(rows)
        rows = rows[:limit] if limit else rows
        return [{"id": str(i), "question": r["question"], "answer": r["answer"]}
                for i, r in enumerate(rows)]

    def subset(self, n: int) -> str:
        total = self._n_test or n
        return f"first {n} of {total} test items" if n < total else f"all {n} test items"

    def fewshot_text(self) -> str:
        if self._fewshot is None:
            shots = read_jsonl(resolve_data_dir(self._data_dir) / "gsm8k" / "cot_fewshot.jsonl")
            self._fewshot = "".join(f"Q: {s['question']}\nA: {s['target']}\n\n" for s in shots)
            self._n_shots = len(shots)
        return self._fewshot

    def prompt(self, item: dict[str, Any], tokenizer: Any = None,
               max_new_tokens: int | None = None) -> Prompt:
        text = f"{self.fewshot_text()}Q: {item['question']}\nA:"
        return Prompt(text=text, chat=False, n_shots=self._n_shots)

    def score(self, item: dict[str, Any], generation: str) -> dict[str, bool]:
        gold = gold_answer(item["answer"])
        return {"exact_match": extract_answer(generation) == gold,
                "strict_match": strict_answer(generation) == gold}
