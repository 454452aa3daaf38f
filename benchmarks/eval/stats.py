"""Accuracy with a 95% confidence interval, and the paired comparison of two heads.

The two heads answer the same items, so their difference is judged on the discordant pairs
(dense right / FlashHead wrong and the reverse): McNemar's exact test, i.e. a two-sided sign test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Accuracy:
    correct: int
    n: int
    acc: float
    ci95: tuple[float, float]      # Wilson score interval

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ci95": list(self.ci95)}


@dataclass(frozen=True)
class Paired:
    """a = dense, b = FlashHead, on the same n items."""

    n: int
    both: int
    a_only: int                    # dense right, FlashHead wrong
    b_only: int                    # FlashHead right, dense wrong
    neither: int
    diff: float                    # acc(b) - acc(a)
    diff_ci95: tuple[float, float]  # normal approximation for paired proportions
    p_value: float                 # exact McNemar (two-sided sign test on a_only vs b_only)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "diff_ci95": list(self.diff_ci95)}


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for correct/n (well-behaved at 0, n and small n)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 and n the exact bounds are 0 and 1; say so rather than 0.9999999999999999.
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return (lo, hi)


def accuracy(outcomes: Sequence[bool]) -> Accuracy:
    n, k = len(outcomes), int(sum(bool(o) for o in outcomes))
    return Accuracy(correct=k, n=n, acc=k / n if n else float("nan"), ci95=wilson(k, n))


def sign_test_p(a_only: int, b_only: int) -> float:
    """Two-sided exact binomial p-value of a_only vs b_only under p = 1/2 (exact McNemar)."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    lo = min(a_only, b_only)
    tail = sum(math.comb(m, i) for i in range(lo + 1)) / 2.0 ** m
    return min(1.0, 2.0 * tail)


def paired(a: Sequence[bool], b: Sequence[bool], z: float = Z95) -> Paired:
    """Compare two outcome lists over the same items (same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    both = sum(1 for x, y in zip(a, b) if x and y)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    if n == 0:
        return Paired(0, 0, 0, 0, 0, 0.0, (0.0, 0.0), 1.0)
    diff = (b_only - a_only) / n
    # Var of the mean paired difference d_i in {-1, 0, 1}: (E[d^2] - E[d]^2) / n.
    var = ((a_only + b_only) / n - diff * diff) / n
    half = z * math.sqrt(max(var, 0.0))
    return Paired(n=n, both=both, a_only=a_only, b_only=b_only, neither=n - both - a_only - b_only,
                  diff=diff, diff_ci95=(diff - half, diff + half),
                  p_value=sign_test_p(a_only, b_only))
