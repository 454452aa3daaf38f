"""benchmarks.attention_latency without a GPU: a clear exit, and its config validates."""

from __future__ import annotations

import pytest
import torch

from benchmarks import attention_latency


def test_without_cuda_exits_with_a_message(capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention_latency.main([]) == 2
    err = capsys.readouterr().err
    assert "benchmarks.attention_latency needs a CUDA GPU" in err and "GPU machine" in err


def test_config_validates() -> None:
    cfg = attention_latency.AttentionLatencyConfig()
    assert cfg.models == ("r1-1.5b", "gemma3-270m") and "sdpa_hf" in cfg.methods
    with pytest.raises(ValueError, match="sdpa_hf required"):
        attention_latency.AttentionLatencyConfig(methods=("triton",))
    with pytest.raises(ValueError, match="models are"):
        attention_latency.AttentionLatencyConfig(models=("llama-70b",))


def test_table_prints_rows_and_errors(capsys) -> None:
    base = dict(gpu="x", model="r1-1.5b", B=1, capacity=4096, fill=128, bytes=1 << 20,
                floor_ms=0.001)
    rows = [dict(base, method="sdpa_hf", ms=0.02, gbps=50.0, max_err=0.0, kernels=3.0,
                 x_sdpa_hf=1.0),
            dict(base, method="triton", error="RuntimeError: boom")]
    sweep = [dict(base, method="triton_sweep", ms=0.01, gbps=100.0, blocks={}, default=True)]
    attention_latency.print_tables(rows, sweep)
    out = capsys.readouterr().out
    assert "ERROR RuntimeError: boom" in out and "sdpa_hf" in out and "*" in out
