"""compile_model: head swap on one instance, asset cache, fullgraph decode step, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from fh_compile import AssetError, FlashHeadLMHead, build_assets, compile_model, generate
from fh_compile.decode import DecodeStep
from tests.fh_compile.lm_fixtures import (CLUSTER, K, VOCAB, compiled_qwen, hf_greedy_per_row,
                                          prompts, tiny_lm)


def test_compiled_flashhead_matches_eager_dense_without_graph_breaks() -> None:
    model, dense = compiled_qwen()
    info = model.fh_compiled.info
    assert (info.head, info.path, info.mode) == ("flashhead", "flashhead", "default")
    assert isinstance(model.get_output_embeddings(), FlashHeadLMHead)
    assert not isinstance(dense.get_output_embeddings(), FlashHeadLMHead)  # this instance only
    ids, mask = prompts()
    counters.clear()
    out = generate(model, ids, mask, max_new_tokens=12)
    assert out.path == "flashhead" and out.mode == "default"
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2                   # body, head + sampling
    eager = generate(dense, ids, mask, max_new_tokens=12)             # eager loop, dense head
    assert eager.path == "dense" and eager.mode is None
    assert torch.equal(out.sequences, eager.sequences)
    for row, ref in enumerate(hf_greedy_per_row(dense, ids, mask, 12)):
        assert torch.equal(out.new_tokens[row], ref)


def test_decode_step_is_one_fullgraph() -> None:
    model = tiny_lm("llama", tied=True)
    step = DecodeStep(model, max_batch_size=1, max_cache_len=16, k=4)
    step.prefill(torch.tensor([[5, 6, 7]]))
    explained = torch._dynamo.explain(step)(torch.tensor([[8]]))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_asset_cache_is_reused(tmp_path) -> None:
    model = tiny_lm("qwen2", tied=True, seed=3)
    compile_model(model, probes=4, k=4, mode=None, cache_dir=tmp_path)
    first = model.fh_compiled.info
    assert first.assets_built and first.assets_dir.startswith(str(tmp_path))
    assert first.assets_dir.endswith(f"{first.fingerprint}-c{CLUSTER}")
    compile_model(model, probes=8, k=4, mode=None, cache_dir=tmp_path)   # re-swap, same head
    second = model.fh_compiled.info
    assert not second.assets_built and second.assets_dir == first.assets_dir
    assert model.get_output_embeddings().config.probes == 8


def test_flashhead_false_keeps_dense_head(tmp_path) -> None:
    model = tiny_lm("qwen2")
    compile_model(model, mode=None, flashhead=False, max_batch_size=2, max_cache_len=32,
                  cache_dir=tmp_path)
    assert (model.fh_compiled.info.head, model.fh_compiled.info.path) == ("dense", "dense")
    assert not any(tmp_path.iterdir())                                 # nothing built
    ids, mask = prompts()
    out = generate(model, ids, mask, max_new_tokens=6)
    assert out.path == "dense"
    for row, ref in enumerate(hf_greedy_per_row(model, ids, mask, 6)):
        assert torch.equal(out.new_tokens[row], ref)


def test_tied_llama_fused_flashhead_equals_dense(tmp_path) -> None:
    model = tiny_lm("llama", tied=True, seed=5)
    dense = copy.deepcopy(model)
    compile_model(model, probes=K, k=8, mode="default", max_batch_size=2, max_cache_len=32,
                  dense_above_rows=8, cache_dir=tmp_path, fuse=True)
    # Tying must not have overwritten anything: the embedding is still the dense weight.
    assert torch.equal(model.get_input_embeddings().weight, dense.get_input_embeddings().weight)
    ids, mask = prompts(seed=2)
    counters.clear()
    out = generate(model, ids, mask, max_new_tokens=8)
    assert out.path == "flashhead" and out.mode == "default"
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    for row, ref in enumerate(hf_greedy_per_row(dense, ids, mask, 8)):
        assert torch.equal(out.new_tokens[row], ref)


# -- errors ----------------------------------------------------------------------------------------
def test_assets_of_another_model_raise(tmp_path) -> None:
    other = build_assets(tiny_lm("qwen2", seed=11).lm_head.weight, cluster_size=CLUSTER)
    with pytest.raises(AssetError, match="another LM head"):
        compile_model(tiny_lm("qwen2", seed=12), other, probes=4, mode=None, cache_dir=tmp_path)


@pytest.mark.parametrize("probes", [0, K + 1])
def test_probes_out_of_range_raise_before_building(tmp_path, probes: int) -> None:
    with pytest.raises(ValueError, match="probes"):
        compile_model(tiny_lm("qwen2"), probes=probes, mode=None, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_model_without_lm_head_raises(tmp_path) -> None:
    body = tiny_lm("qwen2").model                                     # Qwen2Model: no head
    with pytest.raises(ValueError, match="no LM head"):
        compile_model(body, probes=4, mode=None, cache_dir=tmp_path)


def test_bad_options_raise(tmp_path) -> None:
    model = tiny_lm("qwen2")
    with pytest.raises(ValueError, match="mode"):
        compile_model(model, mode="fastest", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="kernel"):
        compile_model(model, kernel="cuda", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_batch_size"):
        compile_model(model, max_batch_size=0, cache_dir=tmp_path)


def test_k_above_guaranteed_candidates_raises(tmp_path) -> None:
    with pytest.raises(ValueError, match="lower k"):
        compile_model(tiny_lm("qwen2"), probes=1, k=VOCAB, mode=None, cache_dir=tmp_path)


# -- GPU -------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("fuse", [False, True])
def test_cuda_max_autotune_no_graph_breaks_same_tokens(tmp_path, fuse: bool) -> None:
    ids, mask = prompts()
    eager = tiny_lm("qwen2").cuda()
    compiled = copy.deepcopy(eager)
    compile_model(eager, probes=K, k=8, mode=None, max_batch_size=2, max_cache_len=40,
                  dense_above_rows=8, cache_dir=tmp_path)
    compile_model(compiled, probes=K, k=8, mode="max-autotune", max_batch_size=2,
                  max_cache_len=40, dense_above_rows=8, cache_dir=tmp_path, fuse=fuse)
    counters.clear()
    out = generate(compiled, ids.cuda(), mask.cuda(), max_new_tokens=12)
    again = generate(compiled, ids.cuda(), mask.cuda(), max_new_tokens=12)   # graph replays
    assert dict(counters["graph_break"]) == {}
    assert counters["inductor"]["cudagraph_skips"] == 0
    ref = generate(eager, ids.cuda(), mask.cuda(), max_new_tokens=12)
    assert out.path == "flashhead"
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(again.sequences, ref.sequences)
