"""FlashHead assets for the tiny random Qwen2 checkpoint of tests/conftest.py (`tiny_hf_untied`:
a Hugging Face folder made from a Qwen2Config, tokenizer included), built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_hf_untied: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> tuple[Path, Path]:
    """(model folder, assets folder) of the tiny model, fp32."""
    from fh_compile import build_assets
    from fh_compile.loading import lm_head_of, load_model

    model, _ = load_model(tiny_hf_untied, dtype=torch.float32)
    assets = build_assets(lm_head_of(model).weight.detach(), cluster_size=16, coarse_iters=3,
                          fine_iters=3)
    return tiny_hf_untied, assets.save(tmp_path_factory.mktemp("tiny_assets"))
