"""Task-quality evaluation: GSM8K (8-shot CoT), IFEval (official checkers), MMLU-Pro (5-shot CoT).

Each task (benchmarks/eval/<task>.py) loads its items, builds prompts and scores a generation;
benchmarks/tasks.py runs them with the dense head and with FlashHead and compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.eval.gsm8k import GSM8K
from benchmarks.eval.ifeval import IFEval
from benchmarks.eval.mmlu_pro import MMLUPro
from benchmarks.eval.task import MetricValue, Prompt, Task

TASKS = {"gsm8k": GSM8K, "ifeval": IFEval, "mmlu_pro": MMLUPro}


def make_task(name: str, data_dir: str | Path | None = None, **options: Any) -> Task:
    """A task by name; `options` go to tasks that take them (MMLU-Pro: per_category, seed...)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    if name == "mmlu_pro":
        return MMLUPro(data_dir, **options)
    return TASKS[name](data_dir)


__all__ = ["TASKS", "make_task", "Task", "Prompt", "MetricValue", "GSM8K", "IFEval", "MMLUPro"]
