"""benchmarks.tpot on CPU: the variant groups build and run (timing itself needs CUDA), the byte
floor counts what a step must read, the results page renders the rows."""

from __future__ import annotations

import pytest

from benchmarks.step_cost import kv_bytes, step_bytes
from benchmarks.tpot import TpotConfig, group, plan
from fh_compile import build_assets
from tests.fh_compile.lm_fixtures import tiny_lm


def test_groups_share_one_step_and_leave_the_model_alone() -> None:
    model = tiny_lm("qwen2")
    dense_head = model.get_output_embeddings()
    assets = build_assets(dense_head.weight, cluster_size=16)
    cfg = TpotConfig(positions=(6,), new_tokens=3, warmup=1, probes=4, k=4, cache_lens=(32,))
    variants = group(model, assets, "fast", ["body", "dense", "fh"], 2, 32, cfg, None)
    assert [v.name for v in variants] == ["fast-body", "fast-dense", "fast-fh"]
    assert [v.path for v in variants] == ["none", "dense", "flashhead"]
    assert {v.forward for v in variants} == {"fast"}
    assert len({id(v.step) for v in variants}) == 1
    assert model.get_output_embeddings() is dense_head            # swaps happened on a view
    for v in variants:
        v.call()
    (hf,) = group(model, assets, "hf", ["dense"], 2, 32, cfg, None)
    assert (hf.forward, hf.attention) == ("hf", "sdpa")
    step = variants[0].step
    sizes = [step_bytes(model, step, assets, h, 2, 4, filled=10) for h in ("body", "dense")]
    assert sizes[1] - sizes[0] == 275 * 64 * 4                    # fp32 [V, D] head
    assert kv_bytes(step, 10) == 2 * 2 * 2 * 2 * 10 * 16 * 4      # layers, K+V, B, Hkv, n, Dh, fp32


def test_plan_orders_groups_and_checks_capacity() -> None:
    cfg = TpotConfig(batches=(1, 16), cache_lens=(16384, 256), variants=("hf-dense", "fast-fh"))
    assert [g[:4] for g in plan(cfg)[4:]] == [("fast", ["body"], 1, 256), ("fast", ["body"], 16, 256)]
    assert plan(cfg)[:2] == [("hf", ["dense"], 1, 16384, "reduce-overhead"),
                             ("fast", ["fh"], 1, 16384, "reduce-overhead")]
    more = TpotConfig(batches=(1,), cache_lens=(256,), variants=("fast-fh",),
                      compare_mode="max-autotune")
    assert plan(more)[-1] == ("fast", ["dense", "fh"], 1, 256, "max-autotune")
    with pytest.raises(ValueError, match="can hold"):
        TpotConfig(cache_lens=(64,), positions=(128,))
    # a position is timed only at the capacities that hold it
    both = TpotConfig(cache_lens=(16384, 256), positions=(128, 8192))
    assert both.capacities_holding(8192) == [16384]
    assert both.capacities_holding(128) == [16384, 256]


def test_a_sliding_window_baseline_says_it_ran_without_cuda_graphs() -> None:
    """transformers' forward over Gemma 3's sliding-window cache cannot replay CUDA graphs:
    compile_model runs it in the no-graph twin of the mode, and the row keeps the variant's name
    (it is still the baseline) while it records the mode that ran and why."""
    from arch_models import tiny_arch
    from benchmarks.tpot import row_of

    model = tiny_arch("gemma3_text")
    cfg = TpotConfig(positions=(6,), new_tokens=3, warmup=1, probes=4, k=4, cache_lens=(32,))
    (v,) = group(model, None, "hf", ["dense"], 2, 32, cfg, "reduce-overhead")
    assert (v.forward, v.attention, v.mode, v.ran_mode) == ("hf", "sdpa", "reduce-overhead",
                                                            "default")
    v.ms[6] = [1.0, 1.0, 1.0]
    v.profile[6] = {"kernels_per_step": None}
    row = row_of(v, 6, model, None, cfg, copy_gbs=1000.0)
    assert (row["variant"], row["mode"], row["asked_mode"]) == ("hf-dense", "default",
                                                                "reduce-overhead")
    assert "Python int" in row["mode_note"]
