"""Shared test settings: GPU tests skip without CUDA; interpreter tests run in their own process."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU; run on the GPU machine")
    no_interp = pytest.mark.skip(
        reason="Triton interpreter test: run `TRITON_INTERPRET=1 pytest -m interpret` separately")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "interpret" in item.keywords and not interpreting:
            item.add_marker(no_interp)


@pytest.fixture
def fresh_seed() -> int:
    """A new seed every run (printed on failure), so kernels are checked on fresh inputs."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"seed={seed}")
    return seed
