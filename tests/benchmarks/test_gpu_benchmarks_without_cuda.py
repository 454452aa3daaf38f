"""The GPU-only benchmarks refuse to start without a CUDA GPU: exit code 2 and a message."""

from __future__ import annotations

import importlib

import pytest
import torch


@pytest.mark.parametrize("name", ["head_latency", "tpot", "export_times"])
def test_gpu_benchmark_without_cuda_exits_with_a_message(name, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main = importlib.import_module(f"benchmarks.{name}").main
    assert main([]) == 2
    err = capsys.readouterr().err
    assert f"benchmarks.{name} needs a CUDA GPU" in err and "run it on the GPU machine" in err
