"""Programmatic dependent launch (PDL, sm_90+) for the kernels that support it (constexpr PDL).

A kernel launched with PDL may start while the previous kernel of the stream is still running;
it waits for its predecessor's writes (`pdl_entry`'s WAIT) before touching memory and lets its
successor start launching (TRIGGER).  Inductor launches user Triton kernels without the launch
attribute (torch 2.11 to 2.13), so only direct launches use it: the FlashHead op's eager calls
(custom_ops/flashhead_triton.py chains its own kernels where `_pdl_usable`: 2.7 us less at
B = 1 on an H100, benchmarks.head_latency's triton_nopdl rows), and benchmarks/pdl_chain.py for
the fused linears and the rope attention (`launch_options`).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])


def supported(kernel: Any, device: torch.device) -> bool:
    """Whether `kernel` can launch with PDL on `device`: a compiled kernel (not the Triton
    interpreter), triton >= 3.4, a CUDA device of compute capability 9.0 or newer."""
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    return (isinstance(fn, JITFunction) and _TRITON_VERSION >= (3, 4) and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def launch_options(kernel: Any, device: torch.device, pdl: bool) -> dict[str, bool]:
    """The extra launch keywords of `kernel` ({"launch_pdl": True} or none).  Raises ValueError
    for pdl where it is not `supported`."""
    if not pdl:
        return {}
    if not supported(kernel, device):
        raise ValueError("pdl=True needs a CUDA device of compute capability 9.0 or newer (and "
                         "not the Triton interpreter); launch with pdl=False")
    return {"launch_pdl": True}


@triton.jit
def pdl_entry(WAIT: tl.constexpr, TRIGGER: tl.constexpr):
    """A PDL kernel's first statement.  WAIT: this kernel was launched with launch_pdl, so it
    may start before the kernel in front of it has finished; wait for that kernel (and see its
    writes) before touching memory.  TRIGGER: let the next kernel launch now, so its launch
    latency hides behind this kernel's work (it still waits for this one to finish)."""
    if WAIT:
        tl.extra.cuda.gdc_wait()
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
