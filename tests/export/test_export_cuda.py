"""GPU: the whole export (torch.export programs + AOTInductor packages) of the tiny model on CUDA
reproduces the eager tokens (the op runs its Triton kernels; AOTI compiles them into cubins)."""

from __future__ import annotations

import pytest
import torch

from export.manifest import load_manifest
from export.pipeline import ExportConfig, run_export
from tests.export.export_fixtures import BATCH, K, MAX_SEQ_LEN, PROBES


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_export_and_aoti_reproduce_eager_tokens(tiny_hf_untied, tmp_path, dtype):
    from fh_compile import build_assets
    from fh_compile.loading import lm_head_of, load_model

    # Assets from the head in the dtype the model runs in (the fingerprint covers the dtype).
    model, _ = load_model(tiny_hf_untied, dtype=getattr(torch, dtype))
    assets = build_assets(lm_head_of(model).weight.detach().cuda(), cluster_size=16,
                          coarse_iters=3, fine_iters=3).to("cpu").save(tmp_path / "assets")
    cfg = ExportConfig(out=tmp_path / "out", model=str(tiny_hf_untied), assets=assets,
                       probes=PROBES, k=K, batch=BATCH, max_seq_len=MAX_SEQ_LEN, device="cuda",
                       dtype=dtype, aoti=True)
    manifest = run_export(cfg)
    for a in manifest.artifacts:
        assert a.verification.status == "passed", (a.name, a.verification.detail)
    kinds = {a["kind"] for a in load_manifest(cfg.out)["artifacts"]}
    assert kinds == {"torch.export", "aoti"}
    assert all(a.device.startswith("cuda") for a in manifest.artifacts)
