"""export.run as a new user meets it: a failed run removes the folders it created (and leaves a
folder that existed alone), stages are logged; a hub id fails fast offline (HF_HUB_OFFLINE=1, or
a hub that does not answer) without any further network attempt."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from export.pipeline import DEFAULT_MODEL
from export.run import main
from fh_compile import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_log_levels():
    levels = {n: logging.getLogger(n).level for n in cli.PACKAGES}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _failing_run(tiny_checkpoint, out: Path) -> int:
    folder, assets = tiny_checkpoint
    # 18 probes x 16 rows > V = 275: the step would take the dense head, which export refuses
    # after it has created --out and loaded the assets.
    return main(["--model", str(folder), "--assets", str(assets), "--out", str(out),
                 "--probes", "18", "--max-seq-len", "16", "--no-verify"])


def test_failed_export_removes_the_folders_it_created(tiny_checkpoint, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "new" / "deeper" / "out"
    assert _failing_run(tiny_checkpoint, out) == 2
    assert "dense head" in capsys.readouterr().err
    assert not (tmp_path / "new").exists(), "the folders this run created are removed"
    said = " | ".join(r.getMessage() for r in caplog.records if r.name.startswith("export"))
    assert "loading" in said and "done in" in said and "FlashHead assets" in said, said
    assert f"removed {tmp_path / 'new'}" in said, said


def test_failed_export_leaves_an_existing_folder(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert _failing_run(tiny_checkpoint, out) == 2
    assert out.is_dir() and not (out / "manifest.json").exists()


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any socket connection (the hub probe is stubbed where a test needs it)."""
    def refuse(self, address):
        raise AssertionError(f"unexpected network connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_offline_hub_id_tries_no_network(tmp_path, capsys, monkeypatch, no_network):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert DEFAULT_MODEL in err and "HF_HUB_OFFLINE" in err
    assert "local Hugging Face model folder or a .gguf file" in err
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_is_probed_once_then_local_cache_only(tmp_path, capsys, monkeypatch,
                                                              no_network):
    import huggingface_hub

    calls = []

    class DeadSession:
        def head(self, url, timeout):
            calls.append((url, timeout))
            raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: DeadSession())
    assert main(["--out", str(tmp_path / "out")]) == 2
    assert len(calls) == 1 and calls[0][1] <= 5, calls
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "no route to host" in err and DEFAULT_MODEL in err


def test_offline_hub_id_command_line(tmp_path):
    # The command a user runs; a hang (the old ~50 s of retries) would hit the timeout.
    proc = subprocess.run([sys.executable, "-m", "export.run", "--out", str(tmp_path / "out")],
                          cwd=ROOT, text=True, capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "HF_HUB_OFFLINE" in proc.stderr
    assert "pass a local Hugging Face model folder" in proc.stderr
    assert not (tmp_path / "out").exists()
