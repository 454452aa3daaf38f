"""benchmarks.tpot on CPU: the variant groups build and run (timing itself needs CUDA)."""

from __future__ import annotations

from benchmarks.tpot import TpotConfig, group, step_bytes
from fh_compile import build_assets
from tests.fh_compile.lm_fixtures import tiny_lm


def test_groups_share_one_step_and_leave_the_model_alone() -> None:
    model = tiny_lm("qwen2")
    dense_head = model.get_output_embeddings()
    assets = build_assets(dense_head.weight, cluster_size=16)
    cfg = TpotConfig(prompt_len=6, new_tokens=3, warmup=1, eager_tokens=2, probes=4, k=4)
    variants = group(model, assets, ["body", "dense", "fh-triton", "fh-reference"], None, 2, cfg)
    assert [v.head for v in variants] == ["body", "dense", "fh-triton", "fh-reference"]
    assert [v.path for v in variants] == ["none", "dense", "flashhead", "flashhead"]
    assert len({id(v.step) for v in variants}) == 1
    assert model.get_output_embeddings() is dense_head            # swaps happened on a view
    for v in variants:
        v.call()
    fused = group(model, assets, ["fh-triton"], None, 1, cfg, fuse=True)
    assert fused[0].head == "fh-triton-fused" and fused[0].fused
    sizes = [step_bytes(model, variants[0].step, assets, h, 2, 4) for h in ("body", "dense")]
    assert sizes[1] - sizes[0] == 275 * 64 * 2
