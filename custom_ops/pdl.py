"""Programmatic dependent launch (PDL, sm_90+) for the kernels that support it (constexpr PDL).

A kernel launched with PDL may start while the previous kernel of the stream is still running;
the kernel lets its successor start launching at once (`gdc_launch_dependents`) and waits for
its predecessor's writes (`gdc_wait`) before its first load.  Inductor launches user Triton
kernels without the launch attribute (torch 2.11 to 2.13), so only direct launches use it:
benchmarks/pdl_chain.py for the fused linears and the rope attention, and the FlashHead op's
eager calls (custom_ops/flashhead_triton.py, which chains its own kernels where
`_pdl_usable`: 2.7 us less at B = 1 on an H100, benchmarks.head_latency's triton_nopdl rows).
"""

from __future__ import annotations

from typing import Any

import torch
from triton.runtime.jit import JITFunction


def launch_options(kernel: Any, device: torch.device, pdl: bool) -> dict[str, bool]:
    """The extra launch keywords of `kernel` ({"launch_pdl": True} or none).  Raises ValueError
    for pdl on a device without it (or under the Triton interpreter)."""
    if not pdl:
        return {}
    if (not isinstance(kernel, JITFunction) or device.type != "cuda"
            or torch.cuda.get_device_capability(device)[0] < 9):
        raise ValueError("pdl=True needs a CUDA device of compute capability 9.0 or newer (and "
                         "not the Triton interpreter); launch with pdl=False")
    return {"launch_pdl": True}
