"""Command lines: build-assets refuses a non-empty --out unless --overwrite, writes files with the
umask's mode, logs its stages (quiet with -q); the entry points run without runpy's
RuntimeWarning; the console scripts are declared."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fh_compile import cli
from fh_compile.assets import HEADER_FILE, TENSORS_FILE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_log_levels():
    """The CLIs set this repository's logger levels and, with -q, switch transformers' and
    huggingface_hub's bars off (their process is theirs); undo it here."""
    import huggingface_hub.utils
    import transformers.utils.logging as tf_logging

    levels = {n: logging.getLogger(n).level for n in cli.PACKAGES}
    tf_bars = tf_logging.is_progress_bar_enabled()
    hub_bars_off = huggingface_hub.utils.are_progress_bars_disabled()
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    if tf_bars:
        tf_logging.enable_progress_bar()
    if not hub_bars_off:
        huggingface_hub.utils.enable_progress_bars()


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _build(tiny_hf_untied: Path, out: Path, *extra: str) -> int:
    return cli.main(["build-assets", "--model", str(tiny_hf_untied), "--out", str(out),
                     "--iters", "2", *extra])


def test_build_assets_refuses_non_empty_out_then_overwrites(tiny_hf_untied, tmp_path, capsys,
                                                            umask_027):
    out = tmp_path / "assets"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _build(tiny_hf_untied, out, "-q") == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"], "nothing written when refused"

    assert _build(tiny_hf_untied, out, "-q", "--overwrite", "--cluster-size", "8") == 0
    assert json.loads((out / HEADER_FILE).read_text())["cluster_size"] == 8
    assert _build(tiny_hf_untied, out, "-q", "--overwrite", "--cluster-size", "16") == 0
    assert json.loads((out / HEADER_FILE).read_text())["cluster_size"] == 16, "not replaced"
    assert (out / "notes.txt").read_text() == "mine", "--overwrite writes over its own files only"
    for name in (HEADER_FILE, TENSORS_FILE):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask_027, name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "temporary files left"


def test_build_assets_refuses_a_file_as_out(tiny_hf_untied, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert _build(tiny_hf_untied, out, "--overwrite") == 2
    assert "not a folder" in capsys.readouterr().err


def test_build_assets_logs_stages_unless_quiet(tiny_hf_untied, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    assert _build(tiny_hf_untied, tmp_path / "a") == 0
    said = [r.getMessage() for r in caplog.records if r.name == "fh_compile.cli"]
    assert any("reading the LM head" in m for m in said), said
    assert any("clustering it into clusters of 16 rows" in m for m in said), said
    assert "wrote" in capsys.readouterr().out
    caplog.clear()
    assert _build(tiny_hf_untied, tmp_path / "b", "-q") == 0
    assert not [r for r in caplog.records if r.levelno < logging.WARNING
                and r.name.startswith("fh_compile")]


def test_quiet_switches_bars_off_and_verbose_on():
    from fh_compile.clustering import _bar

    cli.configure_logging(quiet=True)
    assert logging.getLogger("fh_compile").level == logging.WARNING
    assert _bar(range(2), "x").disable
    assert cli.configure_logging(verbose=True) == logging.DEBUG
    assert not _bar(range(2), "x").disable
    assert cli.configure_logging() == logging.INFO
    assert logging.getLogger("export").level == logging.INFO


@pytest.mark.parametrize("argv", [["fh_compile.build_assets"], ["fh_compile", "build-assets"]])
def test_entry_points_run_without_runtime_warning(argv):
    proc = subprocess.run([sys.executable, "-m", *argv, "--help"], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr, proc.stderr
    assert "usage:" in proc.stdout


def test_console_scripts_are_declared():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"fh-build-assets": "fh_compile.cli:build_assets_main",
                       "fh-export": "export.run:main"}
    import importlib

    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_build_assets_bad_settings_exit_2(tiny_hf_untied, tmp_path, capsys):
    assert _build(tiny_hf_untied, tmp_path / "a", "--cluster-size", "1000") == 2
    assert "cluster_size 1000 exceeds the vocabulary size" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_build_assets_fits_centroids_to_calibration_hidden_states(tiny_hf_untied, tmp_path):
    import torch

    from fh_compile import calibration

    calib = tmp_path / "calib"
    h = torch.randn(400, 64)                                          # [N, D] of the tiny model
    calibration.save(calib, [{"user": "u", "assistant": "a"}], h,
                     {"source": "random test states", "source_kind": "test"})
    out = tmp_path / "assets"
    assert _build(tiny_hf_untied, out, "-q", "--fit-hidden", str(calib)) == 0
    params = json.loads((out / HEADER_FILE).read_text())["params"]
    assert params["centroid_fit"]["source"] == "random test states"
    assert _build(tiny_hf_untied, tmp_path / "other", "-q", "--fit-hidden",
                  str(tmp_path / "missing")) == 2
