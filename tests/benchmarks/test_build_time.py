import json

import pytest

from benchmarks import build_time


def test_build_time_small_random(tmp_path):
    out = tmp_path / "bt.json"
    assert build_time.main(["--vocab", "1003", "--hidden", "32", "--iters", "2", "--refine", "1",
                            "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["vocab_size"] == 1003 and res["rows"][0]["num_clusters"] == 63
    assert res["rows"][0]["total_seconds"] >= res["rows"][0]["clustering_seconds"] > 0


def test_build_time_config_errors():
    with pytest.raises(ValueError, match="--device"):
        build_time.BuildTimeConfig(device="tpu")
    with pytest.raises(ValueError, match="vocab"):
        build_time.BuildTimeConfig(vocab=4, cluster_size=16)


def test_build_time_with_centroid_fit(tiny_gguf, tmp_path):
    import torch

    from fh_compile.calibration import save

    path, weight = tiny_gguf
    save(tmp_path / "calib", [{"text": "x"}], torch.randn(300, weight.shape[1]),
         {"source": "random test states"})
    out = tmp_path / "bt.json"
    assert build_time.main(["--model", str(path), "--iters", "2", "--refine", "1", "--fit-hidden",
                            str(tmp_path / "calib"), "--fit-epochs", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["fit_positions"] == 300 and row["fit_source"] == "random test states"
    assert row["total_seconds"] >= row["fit_seconds"] > 0
    with pytest.raises(ValueError, match="--fit-hidden needs --model"):
        build_time.BuildTimeConfig(fit_hidden=str(tmp_path / "calib"))
