"""One export run: load the model, install FlashHead, write and verify every artifact, and the
manifest.  `python -m export.run` is the command line over `run_export(ExportConfig(...))`."""

from __future__ import annotations

import copy
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

import custom_ops  # noqa: F401  registers torch.ops.flashhead.*
from export import onnx_export, programs
from export.aoti import AOTI_PROGRAMS, package_and_verify
from export.manifest import MANIFEST_FILE, Manifest
from export.programs import Prompt
from fh_compile.assets import FlashHeadAssets
from fh_compile.cli import OutputDirError, check_out_dir  # noqa: F401  (one rule for every CLI)
from fh_compile.compile import cached_assets
from fh_compile.decode import DecodeStep
from fh_compile.head import swap_head
from fh_compile.loading import lm_head_of, load_model

log = logging.getLogger(__name__)

DEFAULT_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

LIMITATIONS = [
    "torch.export programs: `import custom_ops` before torch.export.load (the flashhead::topk "
    "op must be registered to deserialize the graph); they run wherever that op runs.",
    "Batch B and cache length L are fixed at export; prefill takes any T in [1, L - 1] "
    "(torch.export.Dim); every call passes exactly B rows (pad the batch with copies of a row).",
    "The programs return FlashHead's top-k candidates (ids, fp32 logits) of the last position; "
    "sampling (temperature/top-k/top-p over the candidates) and stochastic probing (centroid "
    "noise) are left to the caller: the exported op has no noise input.",
    "AOTInductor packages run only on the device kind (and, on CUDA, the GPU architecture) and "
    "torch version that compiled them; each package embeds its own copy of the weights.  They "
    "read inputs with the compiled (contiguous) strides without checking them: pass contiguous "
    "tensors (set AOTI_RUNTIME_CHECK_INPUTS=1 to have shapes and strides checked).",
    "ONNX: fp32 only (onnxruntime's CPU provider has no bf16 arithmetic), static batch, decode "
    "step only (no prefill model: feed the prompt one token per call from an all-zero state).",
    "FlashHead ties: ONNX TopK orders equal centroid scores by lower cluster index; torch.topk "
    "does not promise an order, so with exactly equal centroid scores the probed set may differ.",
]


@dataclass(frozen=True)
class ExportConfig:
    out: Path
    model: str = DEFAULT_MODEL
    assets: Path | None = None        # None: build (or reuse cached) assets for this model's head
    probes: int | None = None         # None: min(256, K), lowered until B rows take FlashHead
    k: int | None = None              # None: min(64, probes * smallest cluster)
    batch: int = 1
    max_seq_len: int = 2048
    device: str = "cpu"
    dtype: str | None = None          # None: bfloat16 on CUDA, float32 on CPU
    aoti: bool = False
    aoti_programs: tuple[str, ...] = AOTI_PROGRAMS
    aoti_eager_numerics: bool = True  # bf16/fp16 rounded as in eager (see export.aoti)
    onnx: bool = False
    verify: bool = True
    overwrite: bool = False
    verify_steps: int = 8

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but CUDA is not available on this machine")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.max_seq_len < 4:
            raise ValueError(f"max_seq_len must be >= 4, got {self.max_seq_len}")
        if (self.probes is not None and self.probes < 1) or (self.k is not None and self.k < 1):
            raise ValueError(f"probes and k must be >= 1, got {self.probes} and {self.k}")
        if not set(self.aoti_programs) <= set(AOTI_PROGRAMS) or not self.aoti_programs:
            raise ValueError(f"aoti_programs must be a non-empty subset of {AOTI_PROGRAMS}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype or ("bfloat16" if self.device == "cuda" else "float32")]

    @property
    def prompt_len(self) -> int:
        return max(1, min(8, self.max_seq_len // 2))

    @property
    def steps(self) -> int:
        return max(0, min(self.verify_steps, self.max_seq_len - self.prompt_len - 1))


def default_probes(assets: FlashHeadAssets, batch: int) -> int:
    """The largest probes <= 256 with which `batch` rows still take the FlashHead path."""
    V, C = assets.vocab_size, assets.cluster_size
    return max(1, min(256, assets.num_clusters, V // (batch * C)))


def _assets_for(cfg: ExportConfig, model: torch.nn.Module) -> tuple[FlashHeadAssets, str]:
    weight = lm_head_of(model).weight.detach()
    if cfg.assets is not None:
        return FlashHeadAssets.load(cfg.assets), str(cfg.assets)
    assets, folder, built = cached_assets(weight)
    return assets, f"{folder} ({'built now' if built else 'cached'})"


def _fp32_cpu_step(model: torch.nn.Module, step: DecodeStep) -> DecodeStep:
    """A DecodeStep of an fp32 CPU copy of the model (for ONNX); the model itself if it is one."""
    src = step.model
    if next(src.parameters()).dtype != torch.float32 or step.device.type != "cpu":
        src = copy.deepcopy(model).to("cpu", torch.float32)
    # kernels="torch": the fast forward in plain PyTorch, so the exporter sees standard ops only
    # (rope_kv_write mutates the cache, which ONNX cannot express); FlashHead stays one op.
    return DecodeStep(src, max_batch_size=step.max_batch_size, max_cache_len=step.max_cache_len,
                      k=step.k, kernels="torch")


@contextmanager
def _stage(what: str) -> Iterator[None]:
    """Log the start of a stage and, when it ends, its seconds."""
    log.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - t0)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what mkdir(parents=True) creates)."""
    missing = None
    for p in (path.absolute(), *path.absolute().parents):
        if p.exists():
            break
        missing = p
    return missing


def run_export(cfg: ExportConfig) -> Manifest:
    """Write cfg.out/{prefill,decode}.pt2 [+ .aoti.pt2] [+ head.onnx, decode.onnx] and
    manifest.json.  Raises ModelLoadError, AssetError, OutputDirError, ValueError or
    programs.ExportCheckError with a message that says what to change.  A run that raises
    removes the folders it created; a folder that existed before keeps what was written into it,
    but no manifest.  Stages and their seconds are logged (logger `export`, level INFO)."""
    check_out_dir(cfg.out, cfg.overwrite)
    with _stage(f"loading {cfg.model} ({str(cfg.torch_dtype).removeprefix('torch.')}, "
                f"{cfg.device})"):
        model, _ = load_model(cfg.model, dtype=cfg.torch_dtype, device=cfg.device)
    created = _first_missing(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    try:
        (cfg.out / MANIFEST_FILE).unlink(missing_ok=True)  # no stale manifest after a failed run
        return _export_into(cfg, model)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
            log.warning("export failed; removed %s, which this run had created", created)
        raise


def _export_into(cfg: ExportConfig, model: torch.nn.Module) -> Manifest:
    """run_export's work once the model is loaded and cfg.out exists."""
    with _stage("FlashHead assets"):
        assets, assets_source = _assets_for(cfg, model)
    probes = cfg.probes or default_probes(assets, cfg.batch)
    k = cfg.k or min(64, probes * assets.min_cluster_size)
    swap_head(model, assets, probes=probes, k=k)
    step = DecodeStep(model, max_batch_size=cfg.batch, max_cache_len=cfg.max_seq_len, k=k)
    if step.path != "flashhead":
        raise ValueError(f"with probes={probes}, a decode step of {cfg.batch} rows takes the dense "
                         f"head (rows * probes * C > V={assets.vocab_size}); lower --probes or "
                         f"--batch")
    V = assets.vocab_size
    prompt = Prompt.make(cfg.batch, cfg.prompt_len, V, cfg.device)
    text_cfg = model.config.get_text_config()
    manifest = Manifest(
        model=cfg.model,
        model_config={key: getattr(text_cfg, key, None) for key in (
            "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
        assets={"fingerprint": assets.fingerprint, "source": assets_source, "vocab_size": V,
                "hidden_size": assets.hidden_size, "num_clusters": assets.num_clusters,
                "cluster_size": assets.cluster_size},
        settings={"batch": cfg.batch, "max_seq_len": cfg.max_seq_len, "probes": probes, "k": k,
                  "dtype": str(cfg.torch_dtype).removeprefix("torch."), "device": cfg.device,
                  "verify_prompt_len": cfg.prompt_len, "verify_steps": cfg.steps,
                  "state": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                            for n, t in step.named_buffers(recurse=False)}},
        limitations=list(LIMITATIONS))

    log.info("FlashHead probes=%d, k=%d; batch %d, cache length %d; writing to %s", probes, k,
             cfg.batch, cfg.max_seq_len, cfg.out)
    check = " and verification" if cfg.verify else ""
    with _stage(f"torch.export of prefill and decode{check}"):
        progs, arts = programs.save_and_verify(step, cfg.out, prompt, cfg.steps, cfg.verify)
    manifest.artifacts += arts
    if cfg.aoti:
        with _stage(f"AOTInductor packages of {', '.join(cfg.aoti_programs)}{check} (compiles "
                    f"C++ / Triton code: minutes)"):
            manifest.artifacts += package_and_verify(step, progs, cfg.out, prompt, cfg.steps,
                                                     cfg.verify, cfg.aoti_programs,
                                                     cfg.aoti_eager_numerics)
    onnx_t0 = time.perf_counter()
    if cfg.onnx:
        log.info("ONNX head and decode step%s ...", check)
        step32 = _fp32_cpu_step(model, step)
        hidden = [step32.prefill_hidden(Prompt.make(cfg.batch, cfg.prompt_len, V, "cpu", s)
                                        .input_ids) for s in range(3)]
        manifest.artifacts.append(onnx_export.export_head(
            step32.head, k, hidden, cfg.out / "head.onnx", cfg.device, cfg.verify,
            step32.softcap))
        manifest.artifacts.append(onnx_export.export_decode(
            step32, cfg.out / "decode.onnx", Prompt.make(cfg.batch, cfg.prompt_len, V, "cpu"),
            cfg.steps, cfg.device, cfg.verify))
    if cfg.onnx:
        log.info("ONNX head and decode step%s: done in %.1f s", check,
                 time.perf_counter() - onnx_t0)
    manifest.save(cfg.out)
    log.info("wrote %s", cfg.out / MANIFEST_FILE)
    return manifest
