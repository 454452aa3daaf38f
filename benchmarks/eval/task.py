"""What every evaluation task provides to the runner (benchmarks/tasks.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Union

# A metric's value for one item: one bool (prompt level) or one bool per instruction (IFEval's
# instruction-level metrics, aggregated over all instructions of all items).
MetricValue = Union[bool, list[bool]]


@dataclass(frozen=True)
class Prompt:
    """The text fed to the model.  chat=True: the chat template (with its special tokens) is
    already applied, so the tokenizer must not add special tokens again."""

    text: str
    chat: bool
    n_shots: int = 0


class Task(Protocol):
    name: str
    max_new_tokens: int            # default budget of new tokens (the reference harness's)
    stop: tuple[str, ...]          # generation ends at the first of these (cut from the output)
    metrics: tuple[str, ...]       # the first one is the headline metric
    prompt_format: str             # one line for the results: how prompts are built

    def items(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The evaluated items (each with a unique str "id"), in a fixed order."""

    def subset(self, n: int) -> str:
        """One line saying which items were evaluated, e.g. 'first 100 of 1319 test items'."""

    def prompt(self, item: dict[str, Any], tokenizer: Any, max_new_tokens: int) -> Prompt: ...

    def score(self, item: dict[str, Any], generation: str) -> dict[str, MetricValue]:
        """Needs only the item and the generation, so saved generations can be re-scored."""
