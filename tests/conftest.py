"""Shared test settings: GPU tests skip without CUDA; interpreter tests run in their own process;
tiny-model fixtures (tests/tiny_models.py) shared by several test files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# tests/ holds the tiny-model helpers shared by several test files.
sys.path.insert(0, str(Path(__file__).parent))


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


@pytest.fixture(scope="session")
def tiny_hf_untied(tmp_path_factory):
    import tiny_models

    return tiny_models.save_hf_folder(tmp_path_factory.mktemp("tiny_untied"), tied=False)


@pytest.fixture(scope="session")
def tiny_hf_tied(tmp_path_factory):
    import tiny_models

    return tiny_models.save_hf_folder(tmp_path_factory.mktemp("tiny_tied"), tied=True)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """(path of an untied tiny Qwen2 .gguf, its dequantized output.weight [V, D])."""
    import tiny_models

    return tiny_models.save_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny-qwen2.gguf")

