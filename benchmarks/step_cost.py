"""What one decode step must cost: its byte floor, and what it launches (GPU).

    floor = step_bytes(model, step, assets, "fh-triton", B=1, probes=256, filled=128)
    prof = profile_step(call)            # kernels per step, GPU time per kernel (CUDA graphs too)

The byte floor is what a step cannot avoid reading once: the body's weights (the embedding only
as B rows), the K/V of the slots each layer attends to (the filled slots, at most the window),
and the head's weights (dense: the whole [V, D]; FlashHead: the centroids and at most
min(K, B * probes) clusters' rows, the no-sharing bound).  Every variant of a step is measured
against the same floor, so achieved GB/s = floor / time says how close it runs to the bandwidth.
"""

from __future__ import annotations

from typing import Callable

import torch

from fh_compile.decode import DecodeStep


def _elt(model: torch.nn.Module) -> int:
    return next(model.parameters()).element_size()


def kv_bytes(step: DecodeStep, filled: int) -> int:
    """Bytes of K and V that one decode step attends to at `filled` slots (all rows, all layers)."""
    k, _ = step.caches()
    B, H, _, Dh = k[0].shape
    windows = [layer.window for layer in step.fast.layers] if step.fast is not None else None
    total = 0
    for i in range(len(k)):
        n = filled if not windows or not windows[i] else min(filled, windows[i])
        total += 2 * B * H * n * Dh * k[i].element_size()
    return total


def step_bytes(model: torch.nn.Module, step: DecodeStep, assets, head: str, B: int,
               probes: int, filled: int | None = None) -> int:
    """Byte floor of one decode step of B rows (see the module docstring).  head: "body" (no
    head), "dense", or a FlashHead variant ("fh-..."); filled: slots attended (None: all L)."""
    config = model.config.get_text_config(decoder=True)
    D, V = config.hidden_size, config.vocab_size
    body = sum(p.numel() * p.element_size() for n, p in model.base_model.named_parameters()
               if "embed_tokens" not in n) + B * D * _elt(model)
    total = body + kv_bytes(step, step.max_cache_len if filled is None else filled)
    if head == "body":
        return total
    if head.endswith("dense"):
        return total + V * D * _elt(model)
    K, C = assets.num_clusters, assets.cluster_size
    return total + (K + min(K, B * probes) * C) * D * _elt(model)


def profile_step(call: Callable[[], object], steps: int = 4, top: int = 12) -> dict:
    """Run `call` (one decode step, already warmed up) `steps` times under torch.profiler.
    Returns kernels / memsets / memcpys per step, GPU time per step, and the `top` kernels by GPU
    time (us per step).  Works for CUDA-graph replays: their kernels are device events too."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            call()
        torch.cuda.synchronize()
    kernels = memsets = memcpys = 0
    gpu_us = 0.0
    per_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        name = e.name
        us = float(getattr(e, "device_time", 0.0) or getattr(e, "cuda_time", 0.0) or 0.0)
        low = name.lower()
        if "memset" in low:
            memsets += 1
        elif "memcpy" in low:
            memcpys += 1
        else:
            kernels += 1
            gpu_us += us
            per_name.setdefault(name[:80], []).append(us)
    ranked = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return dict(kernels_per_step=kernels / steps, memsets_per_step=memsets / steps,
                memcpys_per_step=memcpys / steps, kernel_us_per_step=gpu_us / steps,
                top=[dict(kernel=n, us_per_step=sum(v) / steps, launches_per_step=len(v) / steps)
                     for n, v in ranked])
