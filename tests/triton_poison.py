"""Poisoned scratch buffers for the Triton kernel tests (GPU and interpreter).

Importing `poison` into a test module makes it an autouse fixture there: every scratch buffer that
custom_ops.flashhead_triton allocates through `_empty` starts as NaN / int-max, so an element a
kernel fails to write breaks the result.  Import this only after TRITON_INTERPRET is settled.
"""

from __future__ import annotations

import pytest
import torch

from custom_ops import flashhead_triton


def poisoned_empty(shape, dtype, device):
    """Scratch buffers full of values that break the result if any element goes unwritten."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(flashhead_triton, "_empty", poisoned_empty)
