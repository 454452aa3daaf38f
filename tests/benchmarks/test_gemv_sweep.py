"""benchmarks.gemv_sweep without a GPU: candidate plans, winner table, config errors, exit 2."""

from __future__ import annotations

import ast
import dataclasses

import pytest
import torch

from benchmarks import gemv_sweep as gs
from custom_ops import counters
from custom_ops.fused_linear_config import COMPOSITE, GEMV_CONFIGS, GemvConfig, default_config


def test_without_cuda_exits_with_a_message(capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gs.main([]) == 2
    assert "benchmarks.gemv_sweep needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("shape", gs.SHAPES, ids=lambda s: s.name)
def test_candidates(shape) -> None:
    for B in (1, 16):
        cands = gs.candidates(shape, B, quick=False)
        assert all(isinstance(c, GemvConfig) or c == COMPOSITE for c in cands)
        assert len(set(cands)) == len(cands)
        d = default_config(gs.kind_of(shape), shape.N, shape.K, B)
        if d == COMPOSITE:
            assert cands[0] == COMPOSITE, "default first"
        else:
            assert (cands[0].block_b, cands[0].block_n, cands[0].splits > 1) == (
                d.block_b, d.block_n, d.splits > 1), "default first"
        configs = [c for c in cands if c != COMPOSITE]
        assert (COMPOSITE in cands) == (B > 1), "the composite plan is compared at B > 1"
        assert {c.block_b == 1 for c in configs} == {True, False}, "both tile kinds compared"
        # K splits for the shapes with few blocks of output features, never for the LM heads
        if "lm_head" in shape.name or "down" in shape.name:
            assert any(c.splits > 1 for c in configs) == ("down" in shape.name), shape.name
        assert all(c.block_k <= max(16, 2 * shape.K) for c in configs)
        quick = gs.candidates(shape, B, quick=True)
        assert len(quick) <= len(cands) and quick[0] == cands[0]
        for c in cands:             # each survives the trip through the JSON rows
            assert gs.plan_of(list(gs.plan_tuple(c)) if c != COMPOSITE else c) == c


def test_quick_sweep_size() -> None:
    # About 210 plans for the 10 shapes at B = 1 and 16 (B = 1 alone took 31 s on the H200)
    n = sum(len(gs.candidates(s, B, quick=True)) for s in gs.SHAPES for B in (1, 16))
    assert 180 <= n <= 230, n


def test_every_rms_norm_fma_plan_without_splits_is_also_timed_in_one_pass() -> None:
    for shape in gs.SHAPES:
        plans = [c for c in gs.candidates(shape, 1, quick=True) if not isinstance(c, str)]
        one = {c for c in plans if c.one_pass}
        two = {dataclasses.replace(c, one_pass=True) for c in plans
               if c.block_b == 1 and c.splits == 1 and not c.one_pass}
        if shape.op == "rms_norm_linear":
            assert two and one == two, shape.name
        else:
            assert not one, shape.name


def test_every_fma_plan_is_also_timed_with_its_tiles_requested_ahead() -> None:
    for shape in gs.SHAPES:
        fma = [c for c in gs.candidates(shape, 1, quick=True)
               if not isinstance(c, str) and c.block_b == 1]
        ahead = {dataclasses.replace(c, num_stages=2) for c in fma if c.num_stages == 1}
        assert ahead and ahead <= set(fma), shape.name


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown shapes"):
        gs.SweepConfig(shapes=("nope",))
    with pytest.raises(ValueError, match="batch sizes"):
        gs.SweepConfig(batch_sizes=(0,))


def test_winner_table_prints_a_pasteable_dict(capsys, monkeypatch) -> None:
    base = dict(shape="qwen1.5b/down", op="act_linear", act="silu_mul", N=1536, K=8960,
                weight_bytes=1536 * 8960 * 2, copies=7)
    rows = [dict(base, B=1, method="cublas", config=None, ms=0.010, gbps=2752.0),
            dict(base, B=1, method="triton", config=[1, 4, 1024, 4, 1, 1], ms=0.008,
                 gbps=3440.0),
            dict(base, B=1, method="triton", config=[1, 8, 512, 4, 1, 6], ms=0.007,
                 gbps=3931.0),
            dict(base, B=1, method="triton", config=[1, 8, 512, 4, 1, 1], ms=None, gbps=None,
                 error="AssertionError: wrong output"),
            dict(base, B=16, method="cublas", config=None, ms=0.02, gbps=1376.0),
            dict(base, B=16, method="composite", config="composite", ms=0.015, gbps=1835.0),
            dict(base, B=16, method="triton", config=[16, 64, 128, 4, 3, 10], ms=0.016,
                 gbps=1720.0)]
    want = {("silu_mul", 1536, 8960, "b1"): (1, 8, 512, 4, 1, 6),
            ("silu_mul", 1536, 8960, "b16"): "composite"}
    assert gs.winners(rows) == want
    gs.print_table({"gpu": "test card", "copy_gbps": 4300.0}, rows)
    out = capsys.readouterr().out
    table = ast.literal_eval(out[out.index("GEMV_CONFIGS = ") + len("GEMV_CONFIGS = "):])
    assert table == want
    assert "1 candidate(s) failed" in out and "1.43x" in out    # 0.010 / 0.007
    # the printed table is a valid GEMV_CONFIGS: the ops pick these plans from it
    from custom_ops.fused_linear_config import pick_config

    for key, value in table.items():
        monkeypatch.setitem(GEMV_CONFIGS, key, value)
    assert pick_config("silu_mul", 1536, 8960, 1, torch.bfloat16).splits == 6
    assert pick_config("silu_mul", 1536, 8960, 16, torch.bfloat16) == COMPOSITE


def test_time_plans_rows_on_cpu(monkeypatch, capsys) -> None:
    # The timing loop's plumbing without a GPU: inputs on CPU, the Triton plans stubbed by the
    # reference (wrong for one of them), the composite plan run eagerly, times made up.
    from custom_ops import fused_linear_triton as flt

    shape = gs.GemvShape("tiny/down", "act_linear", 40, 96, act="silu_mul")
    real_make = gs.make_inputs
    monkeypatch.setattr(gs, "make_inputs", lambda s, B, n: real_make(s, B, n, device="cpu"))
    bad = GemvConfig(16, 16, 32, splits=2)

    def fake_call(s, d, w, plan):
        if plan == COMPOSITE:
            return flt.fused_gemv(d["x"], w, flt.SILU_MUL, config=COMPOSITE)[0]
        return gs.reference(s, d, w) + (1.0 if plan == bad else 0.0)

    monkeypatch.setattr(gs, "call", fake_call)
    monkeypatch.setattr(gs, "composite_fn", lambda s, d: lambda w: fake_call(s, d, w, COMPOSITE))
    times = iter([0.010, 0.008, 0.006, 0.007])      # cuBLAS, then the plans in order
    monkeypatch.setattr(gs, "time_rotating", lambda fn, ws, rep: next(times))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    cands = [GemvConfig(16, 64, 128, 4, 3, splits=2), GemvConfig(16, 8, 32), bad, COMPOSITE]
    saved = counters.is_traced
    with gs.counters_as_compiled(True):
        assert counters.is_traced(torch.empty(1)) is True
        rows = gs.time_plans(gs.SweepConfig(), shape, 16, cands)
    assert counters.is_traced is saved
    assert [r["method"] for r in rows] == ["cublas", "triton", "triton", "triton", "composite"]
    assert rows[3]["ms"] is None and "wrong output" in rows[3]["error"]
    assert rows[1]["config"] == [16, 64, 128, 4, 3, 2] and rows[4]["config"] == "composite"
    assert gs.winners(rows) == {("silu_mul", 40, 96, "b16"): (16, 8, 32, 4, 2, 1)}
    gs.print_table({"gpu": "test card", "copy_gbps": 4300.0}, rows)
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("tiny/down")][-1]   # the table row
    # cuBLAS 10.0, default (first) 8.0, tiles 6.0, split-K 8.0, composite 7.0, best 6.0
    assert line.split()[3:9] == ["10.0", "8.0", "6.0", "8.0", "7.0", "6.0"]
