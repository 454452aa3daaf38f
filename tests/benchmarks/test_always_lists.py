import pytest
import torch

from benchmarks.always_lists import (AlwaysListsConfig, agreement, dense_top1, frequent_ids,
                                     parse_list, table)
from benchmarks.fidelity_metrics import HeadClusters
from custom_ops.reference import flashhead_reference
from fh_compile.build_assets import build_assets
from fh_compile.centroid_fit import argmax_cluster_rank


def test_frequent_ids_keeps_eos_caps_and_orders():
    top1 = torch.tensor([5, 5, 5, 9, 9, 2, 7, 7, 3])
    assert frequent_ids(top1, 3) == [5, 7, 9]                 # 9 and 7 tie: smaller id first
    assert frequent_ids(top1, 4, keep=[100, 9]) == [100, 9, 5, 7]
    assert frequent_ids(top1, 2, keep=[100, 101]) == [100, 101]
    miss = torch.tensor([False, False, False, True, False, True, True, True, False])
    assert frequent_ids(top1, 3, keep=[1], count=miss) == [1, 7, 2]
    with pytest.raises(ValueError, match="raise n"):
        frequent_ids(top1, 1, keep=[1, 2])


def test_agreement_matches_reference_op_with_always_ids():
    """rank < P or listed == the reference op's top-1 equals the dense argmax (always_ids)."""
    torch.manual_seed(0)
    V, D = 275, 48                                          # V does not divide by 16
    W = torch.randn(V, D)
    h = torch.randn(97, D) * 3
    assets = build_assets(W, cluster_size=16, coarse_iters=2, fine_iters=2, refine_iters=1)
    hcl = HeadClusters.from_assets(assets)
    top = dense_top1(h, W, chunk=30)
    assert torch.equal(top, (h @ W.t()).argmax(1))
    rank = argmax_cluster_rank(h, hcl.centroids, hcl.token_cluster[top])
    always = frequent_ids(top, 6)
    for P in (1, 2, 5):
        ids, _ = flashhead_reference(h, assets.centroids, assets.weight, assets.offsets,
                                     assets.token_ids, P, 16, k=1,
                                     always_ids=torch.tensor(always))
        expect = float((ids[:, 0] == top).float().mean())
        assert agreement(rank, top, always, P) == pytest.approx(expect)
        assert agreement(rank, top, always, P) >= agreement(rank, top, [], P)


def test_specs_and_config_are_checked():
    assert parse_list("miss:64:128") == ("miss", 64, 128)
    assert parse_list("freq:32") == ("freq", 32, 0)
    for bad in ("freq", "freq:0", "miss:8", "top:8", "freq:65", "eos:3"):
        with pytest.raises(ValueError):
            parse_list(bad)
    with pytest.raises(ValueError, match="--assets"):
        AlwaysListsConfig(model="m", assets=(), calib="c")
    with pytest.raises(ValueError, match="probes"):
        AlwaysListsConfig(model="m", assets=("a",), calib="c", probes=(0,))


def test_table_has_one_line_per_list():
    rows = [{"dataset": "d", "assets": "a", "list": lst, "list_size": n, "probes": P,
             "top1_agreement": 0.5} for lst, n in (("none", 0), ("freq:4", 4)) for P in (8, 16)]
    text = table({"config": {"probes": [8, 16]}, "rows": rows})
    assert text.count("\n") == 3 and "freq:4 (4 ids) | 0.5000 | 0.5000" in text
