"""Load a causal LM and its LM-head weight from a Hugging Face folder, a hub id or a GGUF file.

A model spec is one of:
  * a Hugging Face folder (holds config.json and safetensors/bin weights);
  * a `.gguf` file, or a folder that holds exactly one `.gguf` file (loaded by transformers with
    `from_pretrained(folder, gguf_file=name)`, dequantized to dense weights);
  * a hub id such as `Qwen/Qwen2.5-1.5B-Instruct` (needs network, or the id in the local HF cache).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fh_compile.assets import file_sha256

DEFAULT_CACHE = Path("~/.cache/fh-models/hf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CACHE_MARKER = "fh_cache.json"
HUB_PROBE_SECONDS = 3.0

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model spec that cannot be resolved or loaded; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: exactly one of (folder), (folder + gguf_file) or (hub_id)."""

    kind: str                      # "hf_folder" | "gguf" | "hub"
    folder: Path | None = None
    gguf_file: str | None = None   # file name inside `folder`
    hub_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("hf_folder", "gguf", "hub"):
            raise ValueError(f"unknown model spec kind {self.kind!r}")
        if (self.kind == "hub") != (self.hub_id is not None):
            raise ValueError("a hub spec needs hub_id, and only a hub spec has one")
        if (self.kind == "gguf") != (self.gguf_file is not None):
            raise ValueError("a gguf spec needs gguf_file, and only a gguf spec has one")

    @property
    def gguf_path(self) -> Path:
        assert self.folder is not None and self.gguf_file is not None
        return self.folder / self.gguf_file


def resolve_spec(spec: str | os.PathLike) -> ModelSpec:
    """Decide what `spec` names; raises ModelLoadError for paths that do not exist or hold no model."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a .gguf file or a "
                                 f"Hugging Face model folder")
        return ModelSpec("gguf", folder=path.parent.resolve(), gguf_file=path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSpec("hf_folder", folder=path.resolve())
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSpec("gguf", folder=path.resolve(), gguf_file=ggufs[0])
        if ggufs:
            raise ModelLoadError(f"{path} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); "
                                 f"pass the path of the one to load")
        raise ModelLoadError(f"{path} holds neither config.json (a Hugging Face model folder) nor "
                             f"a .gguf file")
    looks_like_path = (text.startswith(("/", "./", "../", "~")) or text.endswith(".gguf")
                       or text.count("/") > 1 or os.sep != "/" and os.sep in text)
    if looks_like_path or not _HUB_ID.match(text):
        raise ModelLoadError(f"model path {text!r} does not exist; pass an existing Hugging Face "
                             f"model folder or .gguf file")
    return ModelSpec("hub", hub_id=text)


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face hub cannot be used now, or None when it answers.

    HF_HUB_OFFLINE=1 answers at once; otherwise one HTTP HEAD of the hub's endpoint (through
    huggingface_hub's own session, so its proxy settings apply) must answer within `timeout`
    seconds, name resolution included.  Any HTTP status counts as an answer.  This replaces a
    minute of huggingface_hub's retries when there is no network.
    """
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001  any failure means: not usable now
            outcome.append(f"{constants.ENDPOINT}: {type(e).__name__}: {e}")

    # A thread, because a hanging DNS lookup is not bounded by the HTTP timeout.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0] if outcome else f"{constants.ENDPOINT} did not answer in {timeout:.0f} s"


def _hub_error(hub_id: str, err: Exception, offline: str | None = None) -> ModelLoadError:
    why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if offline:
        why = f"the hub cannot be reached: {offline}; the local Hugging Face cache: {why}"
    return ModelLoadError(
        f"could not load {hub_id!r} from the Hugging Face hub ({why}). If you are offline, pass "
        f"a local Hugging Face model folder or a .gguf file instead (and if {hub_id!r} was meant "
        f"as a local path: it does not exist)")


def load_model(spec: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu", cache: bool = True,
               cache_dir: str | os.PathLike = DEFAULT_CACHE) -> tuple[Any, Any]:
    """Load (model, tokenizer) for a causal LM, in `dtype`, on `device`, in eval mode.

    GGUF files are dequantized to dense weights (transformers' GgufConfig(dequantize=True)), which
    takes about a minute for a 1.5B model on two CPU cores.  With `cache=True` the dequantized model
    and its tokenizer are saved once with save_pretrained (safetensors) under
    `cache_dir/<gguf name>-<sha256 prefix>/<dtype>/` and later loads read that folder instead (a few
    seconds).  The key is the file's sha256, so an edited GGUF is never served stale.  A hub id that
    cannot be reached (offline) or a path that does not exist raises ModelLoadError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_spec(spec)
    if src.kind == "hub":
        offline = hub_unreachable()  # then only the local cache, at once instead of retrying
        try:
            tokenizer = AutoTokenizer.from_pretrained(src.hub_id, local_files_only=bool(offline))
            model = AutoModelForCausalLM.from_pretrained(src.hub_id, dtype=dtype,
                                                         local_files_only=bool(offline))
        except (OSError, ValueError) as e:  # connection, not found, invalid id, offline mode
            raise _hub_error(src.hub_id, e, offline) from e
    elif src.kind == "hf_folder":
        tokenizer = AutoTokenizer.from_pretrained(src.folder)
        model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=dtype)
    else:
        model, tokenizer = _load_gguf(src, dtype, Path(cache_dir).expanduser() if cache else None)
    return model.to(device).eval(), tokenizer


def _load_gguf(src: ModelSpec, dtype: torch.dtype, cache_root: Path | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    cached = None
    if cache_root is not None:
        sha = file_sha256(src.gguf_path)
        cached = cache_root / f"{src.gguf_path.stem}-{sha[:12]}" / str(dtype).removeprefix("torch.")
        marker = cached / _CACHE_MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("sha256") == sha:
            return (AutoModelForCausalLM.from_pretrained(cached, dtype=dtype),
                    AutoTokenizer.from_pretrained(cached))
    log.info("dequantizing %s (once: about a minute for a 1.5B model on CPU)%s", src.gguf_path,
             f"; cached in {cached}" if cached is not None else "")
    tokenizer = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
    # dequantize=True: dense nn.Linear weights even where a packed-GGUF kernel is installed, so the
    # LM head is a plain Linear that FlashHead can read and replace.
    model = AutoModelForCausalLM.from_pretrained(
        src.folder, gguf_file=src.gguf_file, dtype=dtype,
        quantization_config=GgufConfig(dequantize=True))
    _forget_gguf_quantizer(model)
    if cached is not None:
        _save_cache(model, tokenizer, cached, {"source": str(src.gguf_path), "sha256": sha,
                                               "dtype": str(dtype)})
    return model, tokenizer


def _forget_gguf_quantizer(model: Any) -> None:
    """The weights are dense now; drop the GGUF quantizer so save_pretrained treats them as such."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _save_cache(model: Any, tokenizer: Any, folder: Path, meta: dict[str, str]) -> None:
    """save_pretrained into a temp sibling, then rename: a killed save never looks complete."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as e:  # a full disk or read-only cache must not fail the load itself
        log.warning("could not cache the dequantized model in %s (%s)", folder, e)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def lm_head_of(model: Any) -> torch.nn.Linear:
    """The model's output embedding (`model.get_output_embeddings()`), which must be an nn.Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ModelLoadError(f"{type(model).__name__} has no output embedding (get_output_embeddings() "
                             f"returned None); FlashHead needs a causal LM with an LM head")
    if not isinstance(head, torch.nn.Linear):
        raise ModelLoadError(f"{type(model).__name__}'s LM head is a {type(head).__name__}, not "
                             f"torch.nn.Linear; FlashHead needs a dense [V, D] weight")
    return head


def load_lm_head_weight(spec: str | os.PathLike, *, dtype: torch.dtype | None = None
                        ) -> torch.Tensor:
    """The LM-head weight [V, D] (vocabulary order, as transformers' lm_head.weight), on CPU.

    Fast paths that do not build the model: a GGUF's `output.weight` (or `token_embd.weight` when the
    embedding is tied), dequantized to fp32 with the `gguf` package; a Hugging Face folder's
    `lm_head.weight` (or the tied input embedding) read from its safetensors files, in the
    checkpoint's dtype.  Anything else loads the model.  `dtype` casts the result (None: keep it).
    Note: a FlashHead fingerprint covers the dtype, so build assets from the weight in the dtype
    the model will run in.
    """
    src = resolve_spec(spec)
    weight = None
    if src.kind == "gguf":
        weight = _gguf_head(src.gguf_path)
    elif src.kind == "hf_folder":
        weight = _safetensors_head(src.folder)
    if weight is None:
        model, _ = load_model(spec, dtype=torch.float32)
        weight = lm_head_of(model).weight.detach()
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ModelLoadError(f"the LM head of {spec} is {weight.dtype} {tuple(weight.shape)}, not a "
                             f"floating [V, D] matrix")
    return weight if dtype is None else weight.to(dtype)


def _gguf_head(path: Path) -> torch.Tensor:
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight", tensors.get("token_embd.weight"))
    if t is None:
        raise ModelLoadError(f"{path} has neither output.weight nor token_embd.weight")
    # GGUF lists dims fastest-first ([D, V]); dequantize returns the numpy layout [V, D], whose rows
    # are the vocabulary ids in order (checked against transformers' lm_head in the tests).
    rows = gguf.quants.dequantize(t.data, t.tensor_type)
    V, D = int(t.shape[-1]), int(t.shape[0])
    if rows.shape != (V, D):
        raise ModelLoadError(f"{path}: {t.name} dequantized to {rows.shape}, expected {(V, D)}")
    return torch.from_numpy(rows.astype("float32", copy=True))


def _safetensors_head(folder: Path) -> torch.Tensor | None:
    """lm_head.weight, or the input embedding it is tied to, straight from the safetensors files."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        key_to_file = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", "pt") as f:
            key_to_file = {k: "model.safetensors" for k in f.keys()}
    else:
        return None
    # Names of the head's weight (all aliases when tied), from a weightless (meta) model.
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    head = meta.get_output_embeddings()
    if head is None:
        return None
    names = [n for n, p in meta.named_parameters(remove_duplicate=False) if p is head.weight]
    for name in names:
        if name in key_to_file:
            with safe_open(folder / key_to_file[name], "pt") as f:
                return f.get_tensor(name)
    return None



