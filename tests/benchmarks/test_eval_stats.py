"""Accuracy confidence intervals and the paired dense-vs-FlashHead comparison."""

from __future__ import annotations

import math

import pytest

from benchmarks.eval.stats import accuracy, paired, sign_test_p, wilson


def test_wilson_known_values() -> None:
    lo, hi = wilson(8, 10)                         # textbook: 0.4902, 0.9433
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    lo, hi = wilson(0, 10)
    assert hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_accuracy() -> None:
    a = accuracy([True, False, True, True])
    assert (a.correct, a.n, a.acc) == (3, 4, 0.75)
    assert a.ci95[0] < 0.75 < a.ci95[1]
    assert a.to_json()["ci95"] == list(a.ci95)
    assert math.isnan(accuracy([]).acc)


def test_sign_test_p() -> None:
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert sign_test_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert sign_test_p(9, 1) == sign_test_p(1, 9)


def test_paired() -> None:
    dense = [True] * 6 + [False] * 4
    fh = [True, True, True, True, False, False, True, False, False, False]
    p = paired(dense, fh)
    assert (p.n, p.both, p.a_only, p.b_only, p.neither) == (10, 4, 2, 1, 3)
    assert p.diff == pytest.approx(-0.1)
    # var of d in {-1, 0, +1}: (3/10 - 0.01) / 10
    half = 1.959963984540054 * math.sqrt((0.3 - 0.01) / 10)
    assert p.diff_ci95 == pytest.approx((-0.1 - half, -0.1 + half))
    assert p.p_value == pytest.approx(sign_test_p(2, 1)) and p.p_value == 1.0
    same = paired(dense, dense)
    assert (same.a_only, same.b_only, same.diff, same.p_value) == (0, 0, 0.0, 1.0)
    assert same.diff_ci95 == (0.0, 0.0)
    with pytest.raises(ValueError, match="equal lengths"):
        paired([True], [True, False])
