"""benchmarks.gemv_sweep without a GPU: candidate configs, winner table, config errors, exit 2."""

from __future__ import annotations

import ast

import pytest
import torch

from benchmarks import gemv_sweep as gs
from custom_ops.fused_linear_triton import GemvConfig, default_config


def test_without_cuda_exits_with_a_message(capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gs.main([]) == 2
    assert "benchmarks.gemv_sweep needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("shape", gs.SHAPES, ids=lambda s: s.name)
def test_candidates(shape) -> None:
    for B in (1, 16):
        cands = gs.candidates(shape, B, quick=False)
        assert all(isinstance(c, GemvConfig) for c in cands) and len(set(cands)) == len(cands)
        d = default_config(shape.N, shape.K, B)
        assert (cands[0].block_b, cands[0].block_n) == (d.block_b, d.block_n), "default first"
        kinds = {c.block_b == 1 for c in cands[1:]}
        assert kinds == {True, False} or len(cands) <= 4, "both tile kinds are compared"
        assert all(c.block_k <= max(16, 2 * shape.K) for c in cands)
        assert len(gs.candidates(shape, B, quick=True)) <= len(cands)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown shapes"):
        gs.SweepConfig(shapes=("nope",))
    with pytest.raises(ValueError, match="batch sizes"):
        gs.SweepConfig(batch_sizes=(0,))


def test_winner_table_prints_a_pasteable_dict(capsys) -> None:
    base = dict(shape="qwen1.5b/down", op="act_linear", act="silu_mul", N=1536, K=8960,
                weight_bytes=1536 * 8960 * 2, copies=7)
    rows = [dict(base, B=1, method="cublas", config=None, ms=0.010, gbps=2752.0),
            dict(base, B=1, method="triton", config=[1, 4, 1024, 4, 1], ms=0.008, gbps=3440.0),
            dict(base, B=1, method="triton", config=[1, 2, 2048, 4, 1], ms=0.007, gbps=3931.0),
            dict(base, B=1, method="triton", config=[1, 8, 512, 4, 1], ms=None, gbps=None,
                 error="AssertionError: wrong output"),
            dict(base, B=16, method="cublas", config=None, ms=0.02, gbps=1376.0),
            dict(base, B=16, method="triton", config=[16, 8, 256, 4, 3], ms=0.012, gbps=2293.0)]
    assert gs.winners(rows) == {(1536, 8960, "b1"): (1, 2, 2048, 4, 1),
                                (1536, 8960, "b16"): (16, 8, 256, 4, 3)}
    gs.print_table({"gpu": "test card", "copy_gbps": 4300.0}, rows)
    out = capsys.readouterr().out
    table = ast.literal_eval(out[out.index("GEMV_CONFIGS = ") + len("GEMV_CONFIGS = "):])
    assert table == gs.winners(rows)
    assert "1 candidate(s) failed" in out and "1.43x" in out    # 0.010 / 0.007
