"""Zeroed int32 counters for kernels whose last-arriving program finishes the work (the split-K
decode attention and the split-K GEMV): each program bumps its group's counter, the last one
combines the partials and resets the counter to 0, so the next call (or CUDA-graph replay)
starts clean without a memset.

Eager calls share one persistent buffer per device; calls on one stream run one after the other,
so they can share it (two calls running at once on two streams would not be safe).  Traced calls
(torch.compile, torch.export, make_fx) get a fresh zeroed buffer: Inductor keeps no state
between calls, so a compiled graph runs one fill kernel beside each such op, unless the caller
holds the buffer as its own state and passes it in (`new_workspace`, `workspace`: the `_ws`
ops, which a decode step uses).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

POOL: dict[torch.device, torch.Tensor] = {}
# Outgrown buffers stay alive: a CUDA graph captured with one keeps using its memory.
_OUTGROWN: list[torch.Tensor] = []


def is_traced(t: torch.Tensor) -> bool:
    """Whether torch.compile / torch.export / make_fx are tracing (fake or functional tensors,
    or a dispatch mode): then no value may be read on the host and no state kept."""
    return (torch.compiler.is_compiling() or type(t) is not torch.Tensor
            or bool(_get_current_dispatch_mode_stack()))


def zeroed_counters(n: Union[int, torch.SymInt], device: torch.device,
                    traced: bool) -> torch.Tensor:
    """At least n zeroed int32 counters on `device` (see the module docstring).  Inside a
    CUDA-graph capture a pool too small is replaced by a fresh buffer for that call only."""
    if traced:
        return torch.zeros((n,), dtype=torch.int32, device=device)
    buf = POOL.get(device)
    if buf is not None and buf.numel() >= n:
        return buf
    fresh = torch.zeros((max(n, 4096),), dtype=torch.int32, device=device)
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        if buf is not None:
            _OUTGROWN.append(buf)
        POOL[device] = fresh
    return fresh


# Counters a decode step holds as state (`new_workspace`): enough for every last-program kernel
# of one step (decode attention: B * Hkv * ceil(group / 16) counters; a split-K GEMV: one per
# block of output features, and only grids under ~4 programs per SM are split).
WORKSPACE_SIZE = 8192


def new_workspace(device: Union[str, torch.device], numel: int = WORKSPACE_SIZE) -> torch.Tensor:
    """A zeroed int32 counter buffer for the ops' `counters` argument (held as state by the
    caller, e.g. a decode step's buffer, so a compiled graph needs no fill kernel per op)."""
    return torch.zeros((numel,), dtype=torch.int32, device=device)


def workspace(counters: Optional[torch.Tensor], n: Union[int, torch.SymInt],
              device: torch.device, traced: bool) -> torch.Tensor:
    """The counters a last-program kernel uses: the caller's `counters` (a zeroed int32 buffer
    on `device` with at least n elements; the kernels leave it zeroed), else `zeroed_counters`.

    Ops that take `counters` declare it mutated: torch.compile and torch.export then keep it as
    the caller's state and write into it in place, where a buffer made inside the op costs one
    fill kernel per call."""
    if counters is None:
        return zeroed_counters(n, device, traced)
    if counters.dtype != torch.int32 or counters.dim() != 1 or counters.device != device:
        raise ValueError(f"counters must be a 1-D int32 tensor on {device} (make one with "
                         f"custom_ops.counters.new_workspace), got {tuple(counters.shape)} "
                         f"{counters.dtype} on {counters.device}")
    if isinstance(n, int) and counters.numel() < n:
        raise ValueError(f"counters holds {counters.numel()} elements, this call needs {n}: "
                         f"make a larger one with custom_ops.counters.new_workspace(device, {n})")
    return counters
