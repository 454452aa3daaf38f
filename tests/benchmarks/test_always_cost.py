"""benchmarks.always_cost without a GPU: it refuses to start (exit 2), and its config validates."""

from __future__ import annotations

import pytest
import torch

from benchmarks.always_cost import AlwaysCostConfig, main


def test_without_cuda_exits_with_a_message(capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "benchmarks.always_cost needs a CUDA GPU" in err and "run it on the GPU machine" in err


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="must include 0"):
        AlwaysCostConfig(always=(2, 8))
    with pytest.raises(ValueError, match=r"lie in \[0, 64\]"):
        AlwaysCostConfig(always=(0, 65))
    with pytest.raises(ValueError, match="probes must be in"):
        AlwaysCostConfig(probes=(0,))
    assert AlwaysCostConfig().always[0] == 0
