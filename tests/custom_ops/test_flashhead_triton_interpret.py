"""The FlashHead Triton kernels under the Triton interpreter (CPU), against the PyTorch reference.

Run in its own process:
    TRITON_INTERPRET=1 pytest -m interpret tests/custom_ops/test_flashhead_triton_interpret.py
The interpreter must be on before triton is first imported, and setting it inside a shared pytest
process would leak into every later test (their kernels would be interpreted too), so without
TRITON_INTERPRET=1 from the runner this module skips before importing anything.
The interpreter gets bf16 x bf16 tl.dot wrong (triton 3.9), so the native bf16 path is only
checked on the GPU (tests/custom_ops/test_flashhead_cuda.py); fp32, fp16 and mixed dtypes are here.
"""

import os

if os.environ.get("TRITON_INTERPRET") != "1":
    import pytest

    pytest.skip("Triton interpreter tests: run with TRITON_INTERPRET=1 in their own process",
                allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # (set by the runner already) before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from custom_ops import flashhead_triton  # noqa: E402
from custom_ops.flashhead_triton import triton_topk  # noqa: E402
from custom_ops.reference import (always_rows_of, flashhead_reference,  # noqa: E402
                                 select_clusters)
from fh_compile.build_assets import build_assets  # noqa: E402
from triton_poison import poison  # noqa: E402,F401 (autouse fixture)
from triton_select import (SELECTS, check_selection, draw_h, run_select,  # noqa: E402
                           selection_scores, stable_rows)

pytestmark = pytest.mark.interpret
V, D, C = 1003, 96, 16  # V does not divide by C: the last clusters hold 15 rows


@pytest.fixture(scope="module")
def assets():
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"assets seed={seed}")
    return build_assets(torch.randn(V, D), cluster_size=C, coarse_iters=3, fine_iters=3)


def check(assets, h, probes, k, noise=None, dtype=torch.float32, tol=1e-4, always=None,
          select="auto"):
    cent, weight = assets.centroids.to(dtype), assets.weight.to(dtype)
    args = (cent, weight, assets.offsets, assets.token_ids, probes, C)
    rows = None if always is None else always_rows_of(always, assets.token_ids)
    ids, logits = triton_topk(h, *args, k, noise, rows, select=select)
    ref_ids, ref_logits = flashhead_reference(h, *args, min(k + 1, probes * C), noise, always)
    assert ids.shape == (h.shape[0], k) and ids.dtype == torch.int64
    assert logits.shape == (h.shape[0], k) and logits.dtype == torch.float32
    assert bool(((ids >= 0) & (ids < V)).all()), "every id is a vocabulary id"
    assert not bool(logits.isnan().any()), "every logit was written"
    assert bool((logits[:, :-1] >= logits[:, 1:]).all()), "best first"
    rows = stable_rows(h, cent, probes, noise)
    assert bool(rows.any()), "no row with a clear cluster selection: rerun"
    ref_k = ref_logits[:, :k]
    torch.testing.assert_close(logits[rows], ref_k[rows], rtol=1e-5, atol=tol, equal_nan=False)
    # Rank r is unambiguous when it is clear of both neighbours in the reference.
    gaps = (ref_logits[:, :-1] - ref_logits[:, 1:]).nan_to_num(posinf=1e9)  # -inf - -inf = nan
    before = torch.cat([torch.full_like(gaps[:, :1], 1e9), gaps], 1)[:, :k]
    after = torch.cat([gaps, torch.full_like(gaps[:, :1], 1e9)], 1)[:, :k]
    clear = (before > tol) & (after > tol) & rows[:, None]
    assert torch.equal(ids[clear], ref_ids[:, :k][clear])
    padding = ref_k == float("-inf")
    assert torch.equal(ids[padding & rows[:, None]], ref_ids[:, :k][padding & rows[:, None]])
    return ids, logits


def test_kernels_are_interpreted() -> None:
    assert not isinstance(flashhead_triton._centroid_scores_kernel, JITFunction), (
        "triton was imported before TRITON_INTERPRET=1: run this file in its own process")


@pytest.mark.parametrize("B,probes,k", [(1, 1, 1), (1, 7, 5), (3, 4, 1), (3, 9, 16),
                                        (17, 5, 3), (70, 3, 2)])
def test_matches_reference(assets, fresh_seed, B, probes, k) -> None:
    check(assets, draw_h(assets.centroids, B, probes), probes, k)


@pytest.mark.parametrize("B", [1, 3, 17, 40])     # 16-, 32- and 64-row tiles
def test_matches_reference_with_centroid_noise(assets, fresh_seed, B) -> None:
    gumbel = -torch.log(-torch.log(torch.rand(B, assets.num_clusters).clamp(1e-9, 1 - 1e-9)))
    check(assets, draw_h(assets.centroids, B, 6, gumbel), 6, 4, noise=gumbel)


@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("B,K,P", [(4, 63, 1), (4, 63, 63), (5, 1000, 17), (1, 1, 1),
                                   (1, 1000, 17), (4, 1000, 1000), (3, 9496, 256),
                                   (2, 4096, 4095)])
def test_select_kernels(fresh_seed, select, B, K, P) -> None:
    s = selection_scores(B, K)
    check_selection(select, s, P, run_select(select, s, P))


@pytest.mark.parametrize("select", SELECTS)
def test_select_kernels_fresh_random(fresh_seed, select) -> None:
    for _ in range(3):
        B, K = int(torch.randint(1, 6, ())), int(torch.randint(1, 3000, ()))
        P = int(torch.randint(1, K + 1, ()))
        s = torch.randn(B, K) * 10 ** float(torch.empty(()).uniform_(-30, 30))
        s[:, torch.randperm(K)[:K // 3]] = float(s[0, 0])  # a large tie group somewhere
        check_selection(select, s, P, run_select(select, s, P))


@pytest.mark.parametrize("select", SELECTS)
def test_triton_and_torch_selection_agree(assets, fresh_seed, select) -> None:
    h = torch.randn(5, D)
    args = (assets.centroids, assets.weight, assets.offsets, assets.token_ids, 6, C, 4)
    a = triton_topk(h, *args, select=select)
    b = triton_topk(h, *args, select="torch")
    rows = stable_rows(h, assets.centroids, 6, None)
    assert torch.equal(a[0][rows], b[0][rows]) and torch.equal(a[1][rows], b[1][rows])


def test_all_clusters_gives_dense_argmax_and_padding(assets, fresh_seed) -> None:
    K = assets.num_clusters
    h = torch.randn(3, D)
    ids, logits = check(assets, h, K, K * C)            # every slot, padding (-inf) included
    assert int((logits == float("-inf")).sum(1)[0]) == K * C - V
    dense = h @ assets.weight.t()
    assert torch.equal(ids[:, 0], assets.token_ids[dense.argmax(1)])


@pytest.mark.parametrize("h_dtype,w_dtype", [(torch.float16, torch.float16),
                                             (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float16)])
def test_other_dtypes(assets, fresh_seed, h_dtype, w_dtype) -> None:
    check(assets, torch.randn(5, D).to(h_dtype), 5, 3, dtype=w_dtype, tol=1e-3)


def test_exact_ties_break_by_smallest_id(fresh_seed) -> None:
    # Small integers: every logit is exact in fp32 whatever the summation order, and many tie
    # (also across clusters), so the order must be decided by the smallest vocabulary id alone.
    weight = torch.randint(-2, 3, (520, 32)).float()
    a = build_assets(weight, cluster_size=C, coarse_iters=2, fine_iters=2)
    h = torch.randint(-2, 3, (4, 32)).float()
    args = (a.centroids, a.weight, a.offsets, a.token_ids, a.num_clusters, C, 40)
    ids, logits = triton_topk(h, *args)
    ref_ids, ref_logits = flashhead_reference(h, *args)
    assert bool((logits[:, :-1] == logits[:, 1:]).any()), "the test needs ties"
    assert torch.equal(logits, ref_logits)
    assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("cluster_size", [8, 32])
@pytest.mark.parametrize("B", [3, 40])      # 16-row tiles; 64-row tiles of 4 or 2 clusters
def test_other_cluster_sizes(fresh_seed, cluster_size, B) -> None:
    a = build_assets(torch.randn(301, 48), cluster_size=cluster_size, coarse_iters=2,
                     fine_iters=2)
    h = draw_h(a.centroids, B, 3)
    args = (a.centroids, a.weight, a.offsets, a.token_ids, 3, cluster_size, 5)
    ids, logits = triton_topk(h, *args)
    ref_ids, ref_logits = flashhead_reference(h, *args)
    rows = stable_rows(h, a.centroids, 3, None)
    assert bool(rows.any())
    torch.testing.assert_close(logits[rows], ref_logits[rows], rtol=1e-5, atol=1e-4)
    top1_clear = (ref_logits[:, 0] - ref_logits[:, 1]) > 1e-4
    assert torch.equal(ids[rows & top1_clear, 0], ref_ids[rows & top1_clear, 0])


def always_ids_for(assets, h, probes):
    """Always ids: two tokens of a cluster row 0 probes, three that may lie anywhere (distinct:
    the op refuses repeats)."""
    c = int(select_clusters(h, assets.centroids, probes)[0, 0])
    inside = assets.token_ids[int(assets.offsets[c]):int(assets.offsets[c]) + 2]
    outside = torch.randperm(V)[:3]
    return torch.tensor(list(dict.fromkeys(torch.cat([outside, inside]).tolist())))


@pytest.mark.parametrize("B,probes,k", [(1, 1, 1), (1, 4, 5), (3, 2, 1), (3, 3, 6), (40, 2, 1),
                                        (40, 2, 3)])
def test_always_ids_match_reference(assets, fresh_seed, B, probes, k) -> None:
    h = draw_h(assets.centroids, B, probes)
    check(assets, h, probes, k, always=always_ids_for(assets, h, probes))


@pytest.mark.parametrize("select", ["single", "torch"])
def test_always_ids_with_other_selections(assets, fresh_seed, select) -> None:
    h = draw_h(assets.centroids, 3, 3)
    check(assets, h, 3, 4, always=always_ids_for(assets, h, 3), select=select)


@pytest.mark.parametrize("B,k", [(1, 1), (1, 4), (3, 1), (3, 4)])
def test_planted_always_id_beyond_the_probes(assets, fresh_seed, B, k) -> None:
    # A token of a cluster no row probes gets every row's largest logit: with probes = 1 only
    # the always ids reach it.  fp16 weights: the native 16-bit tl.dot path.
    h = draw_h(assets.centroids, B, 1).to(torch.float16)
    sel = set(select_clusters(h, assets.centroids.half(), 2).flatten().tolist())  # + near ties
    c = next(c for c in torch.randperm(assets.num_clusters).tolist() if c not in sel)
    row = int(assets.offsets[c])
    weight = assets.weight.half().clone()
    weight[row] = (16.0 * torch.nn.functional.normalize(h.float(), dim=1).sum(0)).half()
    eos = assets.token_ids[row:row + 1]
    args = (h, assets.centroids.half(), weight, assets.offsets, assets.token_ids, 1, C, k)
    assert not bool((triton_topk(*args)[0] == eos).any())
    ids, logits = triton_topk(*args, None, torch.tensor([row]))
    ref_ids, ref_logits = flashhead_reference(*args, None, eos)
    assert bool((ids[:, 0] == eos).all())
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-3)
    assert torch.equal(ids[:, 0], ref_ids[:, 0])
