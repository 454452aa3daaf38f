"""benchmarks.pdl_chain on CPU: its settings are checked, and without a GPU it says so (the
timing, and the PDL launches it compares, need an sm_90 GPU: tests/custom_ops/
test_fused_linear_cuda.py checks the launches' outputs there)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import pdl_chain
from benchmarks.pdl_chain import PdlChainConfig, print_table


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown --arch"):
        PdlChainConfig(archs=("gpt2",))
    with pytest.raises(ValueError, match="batch sizes"):
        PdlChainConfig(batches=(0,))
    with pytest.raises(ValueError, match="--replays"):
        PdlChainConfig(replays=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU machine")
def test_without_a_gpu_it_exits_2(tmp_path, capsys) -> None:
    assert pdl_chain.main(["--out", str(tmp_path / "p.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_table_gives_the_ratio_to_the_plain_launch(capsys) -> None:
    rows = [dict(arch="r1-1.5b", B=1, launch=launch, us_per_chain=us, kernels=112,
                 us_per_kernel=us / 112, floor_us=300.0, gb_per_s=1.0, bw_fraction=300.0 / us,
                 same_output=True) for launch, us in (("plain", 1000.0), ("pdl", 800.0))]
    print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].split()[-2] == "1.250" and lines[-2].split()[-2] == "1.000"
