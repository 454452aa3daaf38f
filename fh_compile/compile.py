"""compile_model: FlashHead on one model instance + a torch.compile'd static-cache decode step.

    model = compile_model(model)                      # builds/caches assets, swaps, compiles
    out = fh_compile.generate(model, ids, attention_mask=mask, max_new_tokens=64)
    model.fh_compiled.info                            # CompileInfo: which head runs, mode, ...

The model keeps working with Hugging Face `model.generate` (its head is the FlashHeadLMHead).
Nothing is patched globally: the head of THIS instance is swapped, and the compiled decode step
lives in `model.fh_compiled` (a CompiledDecoder).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fh_compile.assets import HEADER_FILE, AssetError, FlashHeadAssets, weight_fingerprint
from fh_compile.build_assets import build_assets
from fh_compile.decode import DecodeStep, check_forward_attention, head_next_tokens
from fh_compile.fast_decoder import KERNELS as DECODE_KERNELS
from fh_compile.head import KERNELS, FlashHeadLMHead, _output_embeddings, restore_dense_head, swap_head
from fh_compile.sampling import SamplingConfig

log = logging.getLogger(__name__)

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The same mode without CUDA graphs: for steps whose graphs take a changing Python int.
WITHOUT_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
DEFAULT_ASSET_CACHE = Path("~/.cache/fh-compile/assets")

_STEP_IDS = itertools.count()
StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class CompileOptions:
    """mode None runs the same decode step eagerly (the A/B baseline for torch.compile).
    fuse: one compiled graph for body + head (see CompiledDecoder)."""

    probes: int = 256
    k: int = 64
    mode: str | None = "reduce-overhead"
    flashhead: bool = True
    kernel: str = "triton"
    max_batch_size: int = 1
    max_cache_len: int = 2048
    dense_above_rows: int | None = None
    cluster_size: int = 16
    fuse: bool = False
    forward: str = "auto"
    attention: str = "auto"
    decode_kernels: str = "ops"       # the fast forward's: see fh_compile.fast_decoder.KERNELS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.probes < 1 or self.k < 1:
            raise ValueError(f"probes and k must be >= 1, got probes={self.probes}, k={self.k}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.max_batch_size < 1 or self.max_cache_len < 2:
            raise ValueError(f"need max_batch_size >= 1 and max_cache_len >= 2, got "
                             f"{self.max_batch_size}, {self.max_cache_len}")
        if self.cluster_size < 1:
            raise ValueError(f"cluster_size must be >= 1, got {self.cluster_size}")
        check_forward_attention(self.forward, self.attention)
        if self.decode_kernels not in DECODE_KERNELS:
            raise ValueError(f"decode_kernels must be one of {DECODE_KERNELS}, got "
                             f"{self.decode_kernels!r}")


@dataclass(frozen=True)
class CompileInfo:
    """What compile_model set up.  head: the module installed ('flashhead' or 'dense');
    path: what a decode step of max_batch_size rows computes ('flashhead', or 'dense' when the
    head is dense or FlashHead falls back to dense for that many rows).  forward: the decoder
    forward that runs ('fast', or 'hf': transformers' own), attention: the decode attention,
    fallback: why the fast forward is not used (None when it is)."""

    head: str
    path: str
    mode: str | None
    options: CompileOptions
    forward: str = "fast"
    attention: str = "flashhead::rope_decode_attention"
    fallback: str | None = None
    fingerprint: str | None = None
    assets_dir: str | None = None
    assets_built: bool = False


class CompiledDecoder:
    """The decode step of one model and its compiled step functions.

    Split (the default): the body is compiled once (`body_fn`: tokens [B] -> hidden [B, D]) and
    the head + sampling + eos logic once per (head, sampling, eos, pad), so a new sampling setting
    or head costs a small compile, not the whole model again; two CUDA graphs per step.  Fused
    (options.fuse): one graph for the whole step, recompiled per setting.
    """

    def __init__(self, step: DecodeStep, info: CompileInfo) -> None:
        self.step, self.info = step, info
        self.compile_seconds: dict[str, float] = {}   # first call of each step fn (compiles)
        self._fns: dict[tuple, StepFn] = {}
        self._body: Callable[[torch.Tensor], torch.Tensor] | None = None

    def body_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Compiled body: tokens [B] int64 -> last hidden state [B, D]; appends one cache slot."""
        if self._body is None:
            step = self.step

            def body(tokens: torch.Tensor) -> torch.Tensor:
                return step.hidden(tokens.unsqueeze(1))

            self._body = self._in_attention(compile_step(body, self.info.mode,
                                                         dynamic_ints=step.sliding))
        return self._body

    def _in_attention(self, fn: Callable) -> Callable:
        """fn called inside the step's attention_context (transformers' forward with the decode
        op switches this model's attention implementation for the call); fn itself otherwise."""
        step = self.step
        if step._hf_attention is None:
            return fn

        def call(*args: Any) -> Any:
            with step.attention_context():
                return fn(*args)

        return call

    def head_stage(self, head: nn.Module, sampling: SamplingConfig, eos: tuple[int, ...],
                   pad: int) -> Callable:
        """Uncompiled fn(h [B, D], finished [B] bool) -> (next tokens [B], finished [B])."""
        eos_ids = torch.tensor(eos or (-1,), dtype=torch.int64,
                               device=self.step.device)           # [E]
        torch._dynamo.mark_static_address(eos_ids)
        k, softcap = self.step.k, self.step.softcap

        def head_step(h: torch.Tensor, finished: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
            nxt = torch.where(finished, pad, head_next_tokens(head, h, sampling, k, softcap))
            return nxt, finished | (nxt.unsqueeze(1) == eos_ids).any(dim=1)

        return head_step

    def step_fn(self, sampling: SamplingConfig, eos: tuple[int, ...], pad: int) -> StepFn:
        """fn(tokens [B] int64, finished [B] bool) -> (next tokens [B], finished [B]) for the
        model's current head.  Rows already finished emit `pad`; a row finishes when it emits a
        token of `eos`."""
        head = self.step.head
        key = (id(head), sampling, eos, pad)
        if key not in self._fns:
            stage = self.head_stage(head, sampling, eos, pad)
            mode, step = self.info.mode, self.step
            if self.info.options.fuse:
                def fused(tokens: torch.Tensor, finished: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
                    return stage(step.hidden(tokens.unsqueeze(1)), finished)

                fn = self._in_attention(compile_step(fused, mode, dynamic_ints=step.sliding))
            else:
                body, head_c = self.body_fn(), compile_step(stage, mode)

                def fn(tokens: torch.Tensor, finished: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
                    return head_c(body(tokens), finished)

            self._fns[key] = self._timed(fn, f"{type(head).__name__} {sampling} eos={eos}")
        return self._fns[key]

    def _timed(self, fn: StepFn, name: str) -> StepFn:
        """fn, recording the seconds of its first call (the compile) in compile_seconds."""
        def call(tokens: torch.Tensor, finished: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
            if name in self.compile_seconds:
                return fn(tokens, finished)
            mode = self.info.mode
            if mode is not None:
                log.info("compiling the decode step (torch.compile mode=%s): the first call "
                         "takes a while, minutes for a large model on CPU", mode)
                log.debug("decode step: %s", name)
            t0 = time.perf_counter()
            out = fn(tokens, finished)
            if out[0].is_cuda:
                torch.cuda.synchronize()
            self.compile_seconds[name] = time.perf_counter() - t0
            if mode is not None:
                log.info("compiled the decode step in %.1f s", self.compile_seconds[name])
            return out

        return call

    def __repr__(self) -> str:
        return f"CompiledDecoder({self.info}, step fns={len(self._fns)})"


def compile_step(fn: Callable, mode: str | None, dynamic_ints: bool = False) -> Callable:
    """torch.compile(fn, mode=mode, fullgraph=True) on a copy of fn with its own code object
    (mode None: fn itself).

    Dynamo keeps compiled graphs per code object; closures made by one `def` share theirs, so
    without the copy every decoder of the process would count against one recompile limit (and
    then silently run eagerly) and check the guards of all the others on every step.
    dynamic_ints: integer attributes of the modules the step reads (transformers' sliding-window
    cache layers count their fill in one) become symbolic after their first change, so the step
    recompiles once, not every step (the graph then takes that int as an input: no CUDA graphs).
    """
    if mode is None:
        return fn
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_STEP_IDS)}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    compiled = torch.compile(own, mode=mode, fullgraph=True)

    def call(*args: Any) -> Any:
        # Decoding never needs gradients: without this, a call with grad mode on (the weights
        # require grad) would recompile the step as a training graph, which the custom ops
        # (no autograd formulas) cannot be.
        with torch.no_grad(), torch._dynamo.config.patch(
                allow_unspec_int_on_nn_module=dynamic_ints):
            return compiled(*args)

    return call


def compile_model(model: nn.Module, assets: FlashHeadAssets | None = None, *, probes: int = 256,
                  k: int = 64, mode: str | None = "reduce-overhead", flashhead: bool = True,
                  kernel: str = "triton", max_batch_size: int = 1, max_cache_len: int | None = None,
                  dense_above_rows: int | None = None, cluster_size: int = 16, fuse: bool = False,
                  forward: str = "auto", attention: str = "auto",
                  cache_dir: str | os.PathLike | None = None,
                  build_kwargs: dict[str, Any] | None = None,
                  always_ids: Sequence[int] | None = None,
                  decode_kernels: str = "ops") -> nn.Module:
    """Install FlashHead on THIS model and compile its static-cache decode step; returns model.

    assets: FlashHead assets for this model's head; None builds them once and caches them under
    `cache_dir` (default ~/.cache/fh-compile/assets)/<fingerprint>-c<cluster_size>, reused
    next time.  build_kwargs go to build_assets (e.g. coarse_iters=4, fine_iters=4).
    always_ids: vocabulary ids FlashHead scores at every step (end-of-turn / eos tokens, so
    generation stops where the dense head stops); None: the assets' recorded list and the
    model's eos ids (see swap_head; fh_compile.always_scored_ids(model, tokenizer) adds the
    tokenizer's end-of-turn tokens); [] for none.
    flashhead=False keeps (or restores) the dense head in the same pipeline, for A/B runs.
    mode: a torch.compile mode, or None for eager.  Default "reduce-overhead" (CUDA graphs, no
    autotuning): on an H200 transformers' compiled body ran 2.28 ms a token with it (516
    kernels) against 2.53 ms with "max-autotune" (431 kernels), and the fast forward's
    work is in custom ops that autotuning does not touch, so max-autotune only adds compile
    time there; "max-autotune" works too (zero graph breaks, GPU-tested).  transformers'
    forward over a sliding-window cache runs the mode's twin without CUDA graphs
    (WITHOUT_CUDAGRAPHS; `info.mode` is the one that runs, `info.fallback` says why).
    fuse: compile body + head as one graph (default: the body once, the head per setting).
    max_cache_len: slots of the static KV cache (prompt + generated tokens); None: the model's
    max_position_embeddings, at most 32,768 (a reasoning trace needs thousands of tokens, and
    the decode attention reads only the filled slots, so capacity costs memory, not time).
    forward: "auto" (the fast forward where the architecture is served, else transformers'),
    "fast" (raise if not served) or "hf".  attention: "auto" (flashhead::decode_attention) or
    "hf" (transformers' own attention, which needs transformers' forward: for A/B runs).
    `model.fh_compiled.info` says which forward and attention run, and why.
    decode_kernels: the fast forward's ops: "ops" (rotary fused into the attention kernel, five
    launches a layer), "ops-unfused" (rotary + cache write as its own op: the A/B baseline) or
    "torch" (plain PyTorch, what the ONNX export uses).

    Raises AssetError for assets of another model, ValueError for probes out of range, a model
    without an LM head, or bad options.  The model is put in eval mode.
    """
    opts = CompileOptions(probes=probes, k=k, mode=mode, flashhead=flashhead, kernel=kernel,
                          max_batch_size=max_batch_size,
                          dense_above_rows=dense_above_rows, cluster_size=cluster_size,
                          fuse=fuse, forward=forward, attention=attention,
                          decode_kernels=decode_kernels,
                          max_cache_len=max_cache_len or default_cache_len(model))
    if isinstance(_output_embeddings(model), FlashHeadLMHead):
        restore_dense_head(model)  # re-install with these options
    dense = _output_embeddings(model)
    weight = getattr(dense, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(model).__name__}'s LM head {type(dense).__name__} has no [V, D] "
                         f"weight; FlashHead needs a linear LM head")
    model.eval()
    fingerprint = assets_dir = None
    built = False
    if flashhead:
        clusters = assets.num_clusters if assets is not None else math.ceil(
            weight.shape[0] / cluster_size)
        if probes > clusters:
            raise ValueError(f"probes={probes} exceeds the number of clusters K={clusters} "
                             f"(V={weight.shape[0]}, cluster_size={cluster_size}); lower probes")
        if assets is None:
            assets, assets_dir, built = cached_assets(weight, cluster_size, cache_dir, build_kwargs)
        swap_head(model, assets, probes=probes, k=k, dense_above_rows=dense_above_rows,
                  kernel=kernel, always_ids=always_ids)
        fingerprint = assets.fingerprint
    step = DecodeStep(model, max_batch_size=max_batch_size, max_cache_len=opts.max_cache_len,
                      k=k, forward=forward, attention=attention, kernels=decode_kernels)
    fallback = step.info.reason
    if step.sliding and mode in WITHOUT_CUDAGRAPHS:
        fallback = (f"{fallback}; mode {WITHOUT_CUDAGRAPHS[mode]!r}, not {mode!r}: transformers' "
                    f"sliding-window cache counts its fill in a Python int, and a CUDA graph "
                    f"would be recorded anew for every value")
        log.warning("compile_model: %s", fallback)
        mode = WITHOUT_CUDAGRAPHS[mode]
    info = CompileInfo(head="flashhead" if flashhead else "dense", path=step.path, mode=mode,
                       options=opts, forward=step.info.forward, attention=step.info.attention,
                       fallback=fallback, fingerprint=fingerprint,
                       assets_dir=str(assets_dir) if assets_dir else None, assets_built=built)
    model.fh_compiled = CompiledDecoder(step, info)
    log.info("compile_model: %s", info)
    log.info("decode step: %s forward, %s; KV cache of %d slots x %d rows = %.2f GB (%.3f MB per "
             "slot and row)", info.forward, info.attention, opts.max_cache_len, max_batch_size,
             step.cache_bytes() / 1e9, step.cache_bytes() / opts.max_cache_len / max_batch_size / 1e6)
    return model


def uncompile_model(model: nn.Module) -> nn.Module:
    """Undo compile_model on THIS model: drop `model.fh_compiled`, put the dense head back, and
    give the linears that the fast forward shares their own storage again.  Returns model."""
    compiled = model.__dict__.pop("fh_compiled", None)
    if isinstance(compiled, CompiledDecoder) and compiled.step.fast is not None:
        compiled.step.fast.unshare(model)
    if isinstance(_output_embeddings(model), FlashHeadLMHead):
        restore_dense_head(model)
    return model


def default_cache_len(model: nn.Module, cap: int = 32768) -> int:
    """min(cap, the model's max_position_embeddings): the default static cache capacity."""
    config = model.config.get_text_config(decoder=True)
    return min(cap, int(getattr(config, "max_position_embeddings", None) or cap))


def cached_assets(weight: torch.Tensor, cluster_size: int = 16,
                  cache_dir: str | os.PathLike | None = None,
                  build_kwargs: dict[str, Any] | None = None
                  ) -> tuple[FlashHeadAssets, Path, bool]:
    """Assets for `weight` [V, D] from the on-disk cache, built (on weight's device) and saved
    when missing or unreadable.  Returns (assets, their folder, whether they were built now)."""
    fingerprint = weight_fingerprint(weight)
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_ASSET_CACHE
    folder = root.expanduser() / f"{fingerprint}-c{cluster_size}"
    if (folder / HEADER_FILE).is_file():
        try:
            assets = FlashHeadAssets.load(folder)
            if assets.fingerprint == fingerprint and assets.cluster_size == cluster_size:
                log.info("FlashHead assets: reusing %s", folder)
                return assets, folder, False
            log.warning("assets in %s do not match this head; rebuilding", folder)
        except AssetError as e:
            log.warning("cached assets in %s are unusable (%s); rebuilding", folder, e)
    V, D = weight.shape
    log.info("FlashHead assets: clustering the [%d, %d] LM head into clusters of %d rows on %s "
             "(once per head; about a minute on CPU for V = 50k); cache folder %s", V, D,
             cluster_size, weight.device, folder)
    t0 = time.perf_counter()
    assets = build_assets(weight, cluster_size=cluster_size, fingerprint=fingerprint,
                          **(build_kwargs or {}))
    assets.to("cpu").save(folder)
    log.info("FlashHead assets: built in %.1f s, saved to %s", time.perf_counter() - t0, folder)
    return assets, folder, True
