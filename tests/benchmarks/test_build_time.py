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
