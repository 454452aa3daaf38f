"""Clear errors and non-zero exit codes: bad --model, the default hub id offline, bad settings, and
a head that would not be one FlashHead node."""

from __future__ import annotations

import pytest

from export.pipeline import DEFAULT_MODEL, ExportConfig
from export.programs import ExportCheckError, check_one_flashhead_node, export_decode
from export.run import main
from tests.export.export_fixtures import tiny_step


def test_missing_model_path_fails_clearly(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--model", str(tmp_path / "no-such-model"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not exist" in err and ".gguf" in err
    assert not out.exists(), "nothing is written when the model cannot be loaded"


def test_default_hub_model_offline_fails_clearly(tmp_path, capsys, monkeypatch):
    # Offline mode gives the same error as an unreachable hub, without ~1 min of HTTP retries.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rc = main(["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert DEFAULT_MODEL in err
    assert "local Hugging Face model folder or a .gguf file" in err


def test_non_empty_out_refused_before_loading(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["--model", str(tmp_path / "no-such-model"), "--out", str(out)])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"max_seq_len": 2}, {"device": "tpu"},
                                    {"dtype": "int8"}, {"probes": 0}, {"aoti_programs": ("x",)}])
def test_config_validates(tmp_path, kwargs):
    with pytest.raises(ValueError):
        ExportConfig(out=tmp_path, **kwargs)


def test_dense_path_is_not_exported_silently(tiny_checkpoint):
    folder, assets = tiny_checkpoint
    # 18 probes x 16 rows > V = 275: the decode step takes the dense head, no FlashHead node.
    step = tiny_step(folder, assets, batch=1, probes=18)
    assert step.path == "dense"
    with pytest.raises(ExportCheckError, match="0 torch.ops.flashhead.topk nodes"):
        check_one_flashhead_node(export_decode(step), "decode")
