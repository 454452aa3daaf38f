"""Asset builder: permutation, CSR layout, balance, save/load safety, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from custom_ops import dense_reference, flashhead_reference
from fh_compile import AssetError, FlashHeadAssets, build_assets
from fh_compile.assets import HEADER_FILE, TENSORS_FILE
from fh_compile.clustering import balanced_assign, cluster_sizes


def tiny_qwen2_head(vocab: int = 1003, hidden: int = 96) -> torch.Tensor:
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).lm_head.weight.detach().clone()


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return tiny_qwen2_head()


@pytest.fixture(scope="module")
def assets(weight: torch.Tensor) -> FlashHeadAssets:
    return build_assets(weight, cluster_size=16)


def test_permutation_covers_every_token_once(assets: FlashHeadAssets) -> None:
    assert torch.equal(torch.sort(assets.token_ids).values, torch.arange(assets.vocab_size))


def test_cluster_rows_equal_source_rows(assets: FlashHeadAssets, weight: torch.Tensor) -> None:
    for c in range(assets.num_clusters):
        lo, hi = int(assets.offsets[c]), int(assets.offsets[c + 1])
        assert torch.equal(assets.weight[lo:hi], weight[assets.token_ids[lo:hi]])


def test_offsets_monotone_balanced_and_end_at_v(assets: FlashHeadAssets) -> None:
    sizes = assets.offsets[1:] - assets.offsets[:-1]
    assert int(assets.offsets[0]) == 0 and int(assets.offsets[-1]) == assets.vocab_size
    assert bool((sizes >= 0).all())
    # V = 1003 does not divide by 16: 63 clusters, the last ones hold 15.
    assert assets.num_clusters == 63
    assert torch.equal(sizes, cluster_sizes(1003, 16))
    assert int(sizes.max()) == 16 and int(sizes.min()) == 15
    assert bool((sizes[:-1] >= sizes[1:]).all()), "short clusters must come last"


def test_all_probes_equals_dense_argmax(assets: FlashHeadAssets, weight: torch.Tensor,
                                        fresh_seed: int) -> None:
    h = torch.randn(7, weight.shape[1])
    ids, logits = flashhead_reference(h, assets.centroids, assets.weight, assets.offsets,
                                      assets.token_ids, assets.num_clusters, 16, 5)
    dense_ids, dense_logits = dense_reference(h, weight, 5)
    assert torch.equal(ids[:, 0], (h @ weight.t()).argmax(-1))
    assert torch.equal(ids, dense_ids)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-5, atol=1e-5)


def test_planted_clusters_are_recovered_with_few_probes(fresh_seed: int) -> None:
    # 64 well-separated directions, 16 noisy copies each: the clustering must find them, and
    # 4 probes (6% of the clusters) must then always contain the dense argmax.
    V, D, C = 1024, 64, 16
    centers = torch.nn.functional.normalize(torch.randn(V // C, D), dim=-1)
    weight = (centers.repeat_interleave(C, 0) + 0.01 * torch.randn(V, D))[torch.randperm(V)]
    assets = build_assets(weight, cluster_size=C)
    planted = {tuple(sorted(torch.nonzero((weight @ c).gt(0.9)).flatten().tolist()))
               for c in centers}
    found = {tuple(sorted(assets.token_ids[int(assets.offsets[c]):int(assets.offsets[c + 1])]
                          .tolist())) for c in range(assets.num_clusters)}
    assert found == planted
    h = torch.randn(200, D)
    ids, _ = flashhead_reference(h, assets.centroids, assets.weight, assets.offsets,
                                 assets.token_ids, 4, C, 1)
    # A token's logit is within eps of its cluster's centroid score, so the dense argmax can
    # only fall outside the 4 probed clusters when the 1st and 5th centroid scores are within
    # 2 eps. Rows with a wider margin must get the dense argmax (up to rounding); near ties may
    # legitimately miss, and are most rows only when the clustering is wrong.
    dense = h @ weight.t()
    scores = h @ assets.centroids.float().t()
    cluster_of = torch.empty(V, dtype=torch.long)
    for c in range(assets.num_clusters):
        cluster_of[assets.token_ids[int(assets.offsets[c]):int(assets.offsets[c + 1])]] = c
    eps = (dense - scores[:, cluster_of]).abs().amax(-1)
    top = scores.topk(5).values
    decided = (top[:, 0] - top[:, 4]) > 2 * eps
    assert int(decided.sum()) >= 100, f"only {int(decided.sum())} of 200 rows have a clear margin"
    chosen = dense.gather(1, ids[:, :1]).squeeze(1)
    assert bool((chosen >= dense.amax(-1) - 1e-5)[decided].all())


def test_balanced_assign_respects_capacities(fresh_seed: int) -> None:
    sim = torch.randn(3, 40, 5)
    caps = torch.tensor([[8, 8, 8, 8, 8], [10, 10, 10, 10, 0], [20, 5, 5, 5, 5]])
    assign = balanced_assign(sim, caps, torch.ones(3, 40, dtype=torch.bool))
    for g in range(3):
        assert torch.equal(torch.bincount(assign[g], minlength=5), caps[g])


def test_save_load_round_trip(assets: FlashHeadAssets, tmp_path) -> None:
    assets.save(tmp_path)
    back = FlashHeadAssets.load(tmp_path)
    for name in ("centroids", "weight", "offsets", "token_ids"):
        assert torch.equal(getattr(back, name), getattr(assets, name))
    assert back.fingerprint == assets.fingerprint and back.cluster_size == 16
    header = json.loads((tmp_path / HEADER_FILE).read_text())
    assert header["format_version"] == 1 and header["vocab_size"] == 1003
    assert header["params"]["centroid_mode"] == "mean"
    assert not list(tmp_path.glob("*.tmp")), "atomic save left temp files behind"


def test_fingerprint_mismatch_is_refused(assets: FlashHeadAssets, weight: torch.Tensor) -> None:
    assets.check_matches(weight)
    other = weight.clone()
    other[0, 0] += 1.0
    with pytest.raises(AssetError, match="another LM head"):
        assets.check_matches(other)
    with pytest.raises(AssetError, match="shape"):
        assets.check_matches(weight[:-1])


def test_truncated_file_is_refused(assets: FlashHeadAssets, tmp_path) -> None:
    assets.save(tmp_path)
    path = tmp_path / TENSORS_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AssetError, match="checksum"):
        FlashHeadAssets.load(tmp_path)
    with pytest.raises(AssetError, match="cannot read"):
        FlashHeadAssets.load(tmp_path, verify_checksum=False)


def test_edited_file_is_refused(assets: FlashHeadAssets, tmp_path) -> None:
    assets.save(tmp_path)
    data = bytearray((tmp_path / TENSORS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip bits inside the tensor data
    (tmp_path / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(AssetError, match="checksum"):
        FlashHeadAssets.load(tmp_path)


def test_inconsistent_tensors_are_refused(assets: FlashHeadAssets, tmp_path) -> None:
    # Valid file and checksum, but token_ids is no permutation: the structural checks catch it.
    bad = assets.to("cpu")
    bad.token_ids = bad.token_ids.clone()
    bad.token_ids[1] = bad.token_ids[0]
    bad.save(tmp_path)
    with pytest.raises(AssetError, match="permutation"):
        FlashHeadAssets.load(tmp_path)
    bad = assets.to("cpu")
    bad.offsets = bad.offsets.clone()
    bad.offsets[3] = bad.offsets[5]
    bad.save(tmp_path)
    with pytest.raises(AssetError, match="non-decreasing"):
        FlashHeadAssets.load(tmp_path)


def test_hand_edited_header_is_refused(assets: FlashHeadAssets, tmp_path) -> None:
    assets.save(tmp_path)
    header = json.loads((tmp_path / HEADER_FILE).read_text())
    header["vocab_size"] = 1004
    (tmp_path / HEADER_FILE).write_text(json.dumps(header))
    with pytest.raises(AssetError, match="disagree with the header"):
        FlashHeadAssets.load(tmp_path)
    (tmp_path / HEADER_FILE).write_text("{not json")
    with pytest.raises(AssetError, match="not valid JSON"):
        FlashHeadAssets.load(tmp_path)


def test_missing_assets_say_how_to_build(tmp_path) -> None:
    with pytest.raises(AssetError, match="build_assets"):
        FlashHeadAssets.load(tmp_path)


def test_bad_weight_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[V, D\]"):
        build_assets(torch.randn(10))
    with pytest.raises(TypeError, match="floating"):
        build_assets(torch.ones(64, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="cluster_size"):
        build_assets(torch.randn(64, 8), cluster_size=0)


def test_fingerprint_ignores_load_dtype(assets: FlashHeadAssets, weight: torch.Tensor) -> None:
    # One checkpoint loaded in bf16 on the GPU and in fp32 on the CPU is one model.
    assets.check_matches(weight.to(torch.bfloat16).float())
    assets.check_matches(weight.to(torch.bfloat16))
