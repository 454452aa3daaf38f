"""manifest.json: what an export run wrote, how to call it, and whether it was verified."""

from __future__ import annotations

import json
import os
import platform
import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

MANIFEST_FILE = "manifest.json"
FORMAT = "flashhead-export"
FORMAT_VERSION = 1
STATUSES = ("passed", "failed", "skipped")


@dataclass(frozen=True)
class TensorInfo:
    """One input or output: shape entries are ints, or a name for a dynamic dimension."""

    name: str
    shape: list[int | str]
    dtype: str

    @classmethod
    def of(cls, name: str, t: torch.Tensor, dynamic: dict[int, str] | None = None) -> "TensorInfo":
        shape: list[int | str] = list(t.shape)
        for dim, label in (dynamic or {}).items():
            shape[dim] = label
        return cls(name, shape, str(t.dtype).removeprefix("torch."))


@dataclass
class Verification:
    """status: 'passed', 'failed' or 'skipped'; detail says what was compared and how it came out."""

    status: str
    detail: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass
class Artifact:
    """One file of the export.  kind: 'torch.export', 'aoti' or 'onnx'; path relative to DIR."""

    name: str
    kind: str
    path: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    verification: Verification
    seconds: float = 0.0                   # export (and compile) time
    flashhead_nodes: int | None = None     # torch.ops.flashhead.topk nodes in the exported graph
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    model: str
    model_config: dict[str, Any]
    assets: dict[str, Any]                 # fingerprint, K, C, V, D, where they came from
    settings: dict[str, Any]               # batch, max_seq_len, probes, k, dtype, device
    artifacts: list[Artifact] = field(default_factory=list)
    limitations: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=lambda: library_versions())
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def ok(self) -> bool:
        return all(a.verification.ok for a in self.artifacts)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self),
                "verified": self.ok}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write DIR/manifest.json atomically (temp file, then rename)."""
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "x") as f:  # a new file: mode 0o666 & ~umask, like the artifacts
                json.dump(self.to_json(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def load_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / MANIFEST_FILE).read_text())


def library_versions() -> dict[str, str]:
    """Versions of the libraries an artifact depends on ('absent' where not installed)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "triton", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = str(torch.version.cuda)
    return out
