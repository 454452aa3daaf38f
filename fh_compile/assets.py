"""FlashHead assets: the clustered, reordered LM head and its metadata, with safe save/load.

Dimensions: V vocabulary rows, D hidden size, K clusters, C cluster size (the largest cluster).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fh_compile.always import check_always_ids

FORMAT_VERSION = 1
TENSORS_FILE = "flashhead.safetensors"
HEADER_FILE = "flashhead.json"
_TENSOR_NAMES = ("centroids", "weight", "offsets", "token_ids")


class AssetError(ValueError):
    """Assets that are malformed, corrupted, or built for another model."""


def weight_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of the LM-head weight's shape and values, rounded to bf16 (the whole tensor, in row
    order).  Rounding first makes one checkpoint loaded in fp32, fp16 or bf16 give one
    fingerprint, so assets built on a CPU in fp32 serve the bf16 model on a GPU."""
    w = weight.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
    digest = hashlib.sha256(f"{tuple(w.shape)}|bf16".encode())
    # View as raw bytes so bf16 (which numpy cannot hold) hashes too.
    flat = w.reshape(-1).view(torch.uint8)
    step = 1 << 26
    for start in range(0, flat.numel(), step):
        digest.update(flat[start:start + step].numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass
class FlashHeadAssets:
    """Everything FlashHead needs at run time.

    centroids: [K, D]      one scoring vector per cluster
    weight:    [V, D]      LM-head rows reordered so that cluster c owns rows offsets[c]:offsets[c+1]
    offsets:   [K + 1] int64, CSR-style, offsets[0] = 0, offsets[K] = V, non-decreasing
    token_ids: [V] int64   vocabulary id of each reordered row (a permutation of 0..V-1)
    always_ids: vocabulary ids scored at every step whatever the probes (end-of-turn / eos
               tokens, fh_compile.always), sorted; None: not recorded (assets built before the
               field existed), so the head takes them from the model.
    """

    centroids: torch.Tensor
    weight: torch.Tensor
    offsets: torch.Tensor
    token_ids: torch.Tensor
    cluster_size: int
    fingerprint: str
    params: dict[str, Any] = field(default_factory=dict)
    always_ids: list[int] | None = None

    def __post_init__(self) -> None:
        V, D = self.weight.shape
        if self.always_ids is not None:
            try:
                self.always_ids = check_always_ids(self.always_ids, V)
            except (TypeError, ValueError) as e:
                raise AssetError(f"always_ids: {e}") from e
        K = self.centroids.shape[0]
        if self.centroids.shape != (K, D):
            raise AssetError(f"centroids must be [K, {D}], got {tuple(self.centroids.shape)}")
        if self.offsets.shape != (K + 1,) or self.offsets.dtype != torch.int64:
            raise AssetError(f"offsets must be int64 [{K + 1}], got {self.offsets.dtype} "
                             f"{tuple(self.offsets.shape)}")
        if self.token_ids.shape != (V,) or self.token_ids.dtype != torch.int64:
            raise AssetError(f"token_ids must be int64 [{V}], got {self.token_ids.dtype} "
                             f"{tuple(self.token_ids.shape)}")
        if self.cluster_size < 1:
            raise AssetError(f"cluster_size must be >= 1, got {self.cluster_size}")

    # -- shape helpers -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    @property
    def min_cluster_size(self) -> int:
        return int((self.offsets[1:] - self.offsets[:-1]).min())

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "FlashHeadAssets":
        """Copy to a device; `dtype` applies to the floating tensors (centroids, weight)."""
        return FlashHeadAssets(
            centroids=self.centroids.to(device=device, dtype=dtype),
            weight=self.weight.to(device=device, dtype=dtype),
            offsets=self.offsets.to(device=device),
            token_ids=self.token_ids.to(device=device),
            cluster_size=self.cluster_size, fingerprint=self.fingerprint, params=dict(self.params),
            always_ids=None if self.always_ids is None else list(self.always_ids))

    # -- integrity -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Deep check of the CSR structure and the permutation (O(V) work)."""
        V, K = self.vocab_size, self.num_clusters
        off = self.offsets.cpu()
        if int(off[0]) != 0 or int(off[-1]) != V:
            raise AssetError(f"offsets must start at 0 and end at V={V}, got {int(off[0])}..{int(off[-1])}")
        sizes = off[1:] - off[:-1]
        if bool((sizes < 0).any()):
            raise AssetError("offsets must be non-decreasing")
        if int(sizes.max()) > self.cluster_size:
            raise AssetError(f"a cluster holds {int(sizes.max())} rows, more than cluster_size "
                             f"{self.cluster_size}")
        seen = torch.zeros(V, dtype=torch.int64)
        ids = self.token_ids.cpu()
        if bool((ids < 0).any()) or bool((ids >= V).any()):
            raise AssetError("token_ids must lie in [0, V)")
        seen.index_add_(0, ids, torch.ones_like(ids))
        if not bool((seen == 1).all()):
            raise AssetError("token_ids is not a permutation of the vocabulary")
        if not (torch.isfinite(self.centroids).all() and torch.isfinite(self.weight).all()):
            raise AssetError("centroids or weight hold NaN/inf")
        del K

    def check_matches(self, weight: torch.Tensor, fingerprint: str | None = None) -> None:
        """Refuse assets built for another LM head (clear error naming both fingerprints)."""
        if tuple(weight.shape) != (self.vocab_size, self.hidden_size):
            raise AssetError(
                f"these FlashHead assets were built for an LM head of shape "
                f"[{self.vocab_size}, {self.hidden_size}], but the model's head is "
                f"{list(weight.shape)}: build assets for this model "
                f"(python -m fh_compile.build_assets --model ... --out ...)")
        fp = fingerprint or weight_fingerprint(weight)
        if fp != self.fingerprint:
            raise AssetError(
                f"these FlashHead assets were built for another LM head (fingerprint "
                f"{self.fingerprint}, this model's head is {fp}): build assets for this model "
                f"(python -m fh_compile.build_assets --model ... --out ...)")

    # -- persistence ---------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        return {
            "format": "flashhead-assets",
            "format_version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_clusters": self.num_clusters,
            "cluster_size": self.cluster_size,
            "dtype": str(self.weight.dtype).removeprefix("torch."),
            "fingerprint": self.fingerprint,
            "params": self.params,
            "always_ids": self.always_ids,
            "tensors_sha256": None,  # filled by save()
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `flashhead.safetensors` + `flashhead.json` atomically (temp file, then rename)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {n: getattr(self, n).detach().contiguous().cpu() for n in _TENSOR_NAMES}
        tmp_path = _temp_name(out / TENSORS_FILE)
        try:
            save_file(tensors, str(tmp_path))
            os.chmod(tmp_path, 0o666 & ~_umask())  # safetensors creates it 0o600
            header = self.header()
            header["tensors_sha256"] = file_sha256(tmp_path)
            os.replace(tmp_path, out / TENSORS_FILE)
        finally:
            tmp_path.unlink(missing_ok=True)
        _atomic_write_text(out / HEADER_FILE, json.dumps(header, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, device: torch.device | str | None = None,
             *, verify_checksum: bool = True) -> "FlashHeadAssets":
        """Load and check assets; every inconsistency raises AssetError with what to do."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        hdr_path, ten_path = d / HEADER_FILE, d / TENSORS_FILE
        if not hdr_path.is_file() or not ten_path.is_file():
            raise AssetError(f"{d} holds no FlashHead assets (expected {HEADER_FILE} and "
                             f"{TENSORS_FILE}); build them with python -m fh_compile.build_assets")
        try:
            header = json.loads(hdr_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AssetError(f"{hdr_path} is not valid JSON ({e}); rebuild the assets") from e
        if header.get("format") != "flashhead-assets":
            raise AssetError(f"{hdr_path} is not a FlashHead asset header")
        if header.get("format_version") != FORMAT_VERSION:
            raise AssetError(f"{hdr_path} has format_version {header.get('format_version')}, this "
                             f"version of fh_compile reads {FORMAT_VERSION}; rebuild the assets")
        if verify_checksum and header.get("tensors_sha256") != file_sha256(ten_path):
            raise AssetError(f"{ten_path} does not match the checksum in {hdr_path} (truncated or "
                             f"edited file); rebuild the assets")
        try:
            tensors = load_file(str(ten_path), device=str(device) if device else "cpu")
        except (SafetensorError, OSError, RuntimeError) as e:
            raise AssetError(f"cannot read {ten_path} ({e}); rebuild the assets") from e
        missing = [n for n in _TENSOR_NAMES if n not in tensors]
        if missing:
            raise AssetError(f"{ten_path} lacks tensors {missing}; rebuild the assets")
        assets = cls(**{n: tensors[n] for n in _TENSOR_NAMES},
                     cluster_size=int(header["cluster_size"]), fingerprint=header["fingerprint"],
                     params=header.get("params", {}), always_ids=header.get("always_ids"))
        expect = (header["vocab_size"], header["hidden_size"], header["num_clusters"])
        if (assets.vocab_size, assets.hidden_size, assets.num_clusters) != expect:
            raise AssetError(f"{ten_path} shapes (V, D, K)="
                             f"{(assets.vocab_size, assets.hidden_size, assets.num_clusters)} "
                             f"disagree with the header {expect}; rebuild the assets")
        if str(assets.weight.dtype).removeprefix("torch.") != header["dtype"]:
            raise AssetError(f"{ten_path} dtype {assets.weight.dtype} disagrees with the header "
                             f"({header['dtype']}); rebuild the assets")
        assets.validate()
        return assets


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _temp_name(path: Path) -> Path:
    """A fresh hidden name next to `path` for an atomic write (write, then os.replace).  A file
    created under it gets the usual mode, 0o666 & ~umask; tempfile's would keep 0o600."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _umask() -> int:
    """The process umask (os.umask can only be read by setting it: 0o077 for that instant, so a
    file another thread creates meanwhile is, if anything, more private)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _temp_name(path)
    try:
        with open(tmp, "x") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
