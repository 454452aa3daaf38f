"""flashhead::topk on CUDA (the Triton kernels) against the PyTorch reference; CUDA graphs; compile.

Runs on the GPU machine:  pytest -m cuda tests/custom_ops/test_flashhead_cuda.py
Every scratch buffer of the kernels is poisoned (NaN / int max) so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

from custom_ops import flashhead_triton
from custom_ops import FlashHeadInputError
from custom_ops.reference import always_rows_of, flashhead_reference, select_clusters
from fh_compile.build_assets import build_assets
from triton_poison import poison  # noqa: F401 (autouse fixture)
from triton_select import (SELECTS, check_selection, draw_h, run_select, selection_scores,
                           stable_rows)

pytestmark = pytest.mark.cuda
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Both sides compute in fp32 from the same dtype-rounded inputs; only the summation order
# differs, so the tolerance is fp32's, scaled by sqrt(D)-sized logits.
ATOL = {torch.bfloat16: 2e-3, torch.float16: 2e-3, torch.float32: 2e-3}
CLEAR = 1e-3    # P-th vs (P+1)-th centroid score gap of a row whose cluster selection is checked


def make_assets(V: int, D: int, C: int = 16):
    w = torch.randn(V, D, device="cuda")
    return build_assets(w, cluster_size=C, coarse_iters=3, fine_iters=3)


@pytest.fixture(scope="module")
def small():
    return make_assets(1003, 96)      # V not divisible by 16, D not a power of two


@pytest.fixture(scope="module")
def medium():
    return make_assets(32003, 512)


def gumbel(B: int, K: int) -> torch.Tensor:
    u = torch.rand(B, K, device="cuda").clamp(1e-9, 1 - 1e-9)
    return -torch.log(-torch.log(u))


def op_args(a, dtype, probes, k, C=16):
    return (a.centroids.to(dtype), a.weight.to(dtype), a.offsets, a.token_ids, probes, C, k)


def check(ids, logits, a, h, probes, k, noise=None, dtype=torch.bfloat16, C=16, always=None):
    """ids/logits from the op vs the fp32 CPU reference (no TF32 anywhere); always: the op's
    always ids (vocabulary ids), if any."""
    cent, weight, offsets, token_ids = (t.cpu() for t in op_args(a, dtype, probes, k, C)[:4])
    hc, nc = h.cpu(), (noise.cpu() if noise is not None else None)
    ref_ids, ref_logits = flashhead_reference(hc, cent, weight, offsets, token_ids, probes, C,
                                              min(k + 1, probes * C), nc,
                                              None if always is None else always.cpu())
    ids, logits = ids.cpu(), logits.cpu()
    B, V = h.shape[0], weight.shape[0]
    assert ids.shape == (B, k) and ids.dtype == torch.int64
    assert logits.shape == (B, k) and logits.dtype == torch.float32
    assert bool(((ids >= 0) & (ids < V)).all()), "every id is a vocabulary id"
    assert not bool(logits.isnan().any()), "every logit was written"
    assert bool((logits[:, :-1] >= logits[:, 1:]).all()), "best first"
    tol = ATOL[dtype]
    rows = stable_rows(hc, cent, probes, nc, CLEAR)     # clear cluster selection
    assert bool(rows.any()), "no row with a clear cluster selection (draw h with draw_h)"
    ref_k = ref_logits[:, :k]
    torch.testing.assert_close(logits[rows], ref_k[rows], rtol=1e-4, atol=tol)
    gaps = (ref_logits[:, :-1] - ref_logits[:, 1:]).nan_to_num(posinf=1e9)
    before = torch.cat([torch.full_like(gaps[:, :1], 1e9), gaps], 1)[:, :k]
    after = torch.cat([gaps, torch.full_like(gaps[:, :1], 1e9)], 1)[:, :k]
    clear = (before > tol) & (after > tol) & rows[:, None]
    assert torch.equal(ids[clear], ref_ids[:, :k][clear])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 5, 16, 64, 130])
def test_small_shapes(small, fresh_seed, dtype, B) -> None:
    for probes, k, noise in ((1, 1, None), (7, 5, None), (9, 16, gumbel(B, small.num_clusters))):
        h = draw_h(small.centroids, B, probes, noise, dtype, CLEAR)
        args = op_args(small, dtype, probes, k)
        ids, logits = torch.ops.flashhead.topk(h, *args, noise)
        check(ids, logits, small, h, probes, k, noise, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 5, 16, 64])
def test_medium_shapes(medium, fresh_seed, dtype, B) -> None:
    for probes, k in ((64, 1), (256, 8)):
        h = draw_h(medium.centroids, B, probes, None, dtype, CLEAR)
        ids, logits = torch.ops.flashhead.topk(h, *op_args(medium, dtype, probes, k), None)
        check(ids, logits, medium, h, probes, k, None, dtype)


def test_all_clusters_dense_argmax_and_padding(small, fresh_seed) -> None:
    K = small.num_clusters
    h = torch.randn(3, 96, device="cuda")
    ids, logits = torch.ops.flashhead.topk(h, *op_args(small, torch.float32, K, K * 16), None)
    check(ids, logits, small, h, K, K * 16, None, torch.float32)
    assert int((logits == float("-inf")).sum(1)[0]) == K * 16 - 1003
    dense = h.cpu() @ small.weight.cpu().t()                            # fp32, no TF32
    top2 = dense.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert torch.equal(ids.cpu()[clear, 0], small.token_ids.cpu()[dense.argmax(1)][clear])


@pytest.mark.parametrize("C", [8, 32, 64])
@pytest.mark.parametrize("B", [6, 40])      # 16-row tiles; 64-row tiles of 4, 2 or 1 clusters
def test_other_cluster_sizes(fresh_seed, C, B) -> None:
    a = make_assets(517 if C < 64 else 2051, 80, C)
    h = draw_h(a.centroids, B, 5, None, torch.float16, CLEAR)
    ids, logits = torch.ops.flashhead.topk(h, *op_args(a, torch.float16, 5, 7, C), None)
    check(ids, logits, a, h, 5, 7, None, torch.float16, C)


def test_exact_ties_break_by_smallest_id(fresh_seed) -> None:
    weight = torch.randint(-2, 3, (520, 32), device="cuda").to(torch.bfloat16)
    a = build_assets(weight, cluster_size=16, coarse_iters=2, fine_iters=2)
    h = torch.randint(-2, 3, (4, 32), device="cuda").to(torch.bfloat16)
    args = (a.centroids, a.weight, a.offsets, a.token_ids, a.num_clusters, 16, 40)
    ids, logits = torch.ops.flashhead.topk(h, *args, None)
    ref_ids, ref_logits = flashhead_reference(*(t.cpu() for t in (h, *args[:4])), *args[4:])
    assert bool((logits[:, :-1] == logits[:, 1:]).any()), "the test needs ties"
    assert torch.equal(logits.cpu(), ref_logits)
    assert torch.equal(ids.cpu(), ref_ids)


@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("K,P", [(63, 1), (63, 63), (1000, 17), (1000, 1000), (9496, 256),
                                 (16384, 512)])
def test_select_kernels(fresh_seed, select, K, P) -> None:
    s = selection_scores(5, K, "cuda")          # rows 1-4: heavy ties, -0.0, infinities
    check_selection(select, s, P, run_select(select, s, P))


@pytest.mark.parametrize("B", [1, 16, 64])
def test_every_selection_matches_reference(medium, fresh_seed, B) -> None:
    h = draw_h(medium.centroids, B, 128, None, torch.bfloat16, CLEAR)
    args = op_args(medium, torch.bfloat16, 128, 4)
    for select in ("multi", "single", "torch"):
        check(*flashhead_triton.triton_topk(h, *args, select=select), medium, h, 128, 4)


@pytest.mark.parametrize("B,k", [(1, 1), (16, 4), (64, 1)])
def test_pdl_launches_match_plain_launches(medium, fresh_seed, B, k) -> None:
    """Programmatic dependent launch changes when the kernels start, not what they compute."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or newer")
    h = draw_h(medium.centroids, B, 128, None, torch.bfloat16, CLEAR)
    assert flashhead_triton._pdl_usable(h)
    args = op_args(medium, torch.bfloat16, 128, k)
    with_pdl = flashhead_triton.triton_topk(h, *args, pdl=True)
    without = flashhead_triton.triton_topk(h, *args, pdl=False)
    torch.cuda.synchronize()
    assert torch.equal(with_pdl[0], without[0])
    assert torch.equal(with_pdl[1], without[1])
    check(*with_pdl, medium, h, 128, k)


def test_opcheck(small, fresh_seed) -> None:
    h = torch.randn(3, 96, device="cuda", dtype=torch.bfloat16)
    args = (h, *op_args(small, torch.bfloat16, 4, 3), gumbel(3, small.num_clusters))
    torch.library.opcheck(torch.ops.flashhead.topk.default, args)


@pytest.mark.parametrize("k", [1, 4])        # k = 1: the row maxima and counter set in-graph
def test_cuda_graph_replay_with_new_inputs(medium, fresh_seed, k) -> None:
    B, probes, dtype = 16, 128, torch.bfloat16
    args = op_args(medium, dtype, probes, k)
    static_h = torch.randn(B, 512, device="cuda").to(dtype)
    static_noise = gumbel(B, medium.num_clusters)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                 # warm up (Triton compiles) off the graph
        for _ in range(3):
            torch.ops.flashhead.topk(static_h, *args, static_noise)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, logits = torch.ops.flashhead.topk(static_h, *args, static_noise)
    for _ in range(3):
        h = torch.randn(B, 512, device="cuda").to(dtype)
        noise = gumbel(B, medium.num_clusters)
        static_h.copy_(h)
        static_noise.copy_(noise)
        graph.replay()
        torch.cuda.synchronize()
        check(ids.clone(), logits.clone(), medium, h, probes, k, noise, dtype)


@pytest.mark.parametrize("mode,B", [(None, 8), ("reduce-overhead", 8), (None, 64)])
def test_fullgraph_compile(medium, fresh_seed, mode, B) -> None:     # B=64: 64-row tiles, GROUP=4
    torch._dynamo.reset()
    dtype, probes, k = torch.bfloat16, 64, 4

    def head(h, cent, weight, offsets, token_ids, noise):
        ids, logits = torch.ops.flashhead.topk(h, cent, weight, offsets, token_ids, probes, 16,
                                               k, noise)
        return ids, logits * 1.0    # something for Inductor to fuse around the op

    compiled = torch.compile(head, fullgraph=True, mode=mode)
    cent, weight, offsets, token_ids = op_args(medium, dtype, probes, k)[:4]
    for _ in range(3):                              # reduce-overhead records on a later call
        h = torch.randn(B, 512, device="cuda").to(dtype)
        noise = gumbel(B, medium.num_clusters)
        ids, logits = (t.clone() for t in compiled(h, cent, weight, offsets, token_ids, noise))
        eager_ids, eager_logits = head(h, cent, weight, offsets, token_ids, noise)
        assert torch.equal(ids, eager_ids)
        assert torch.equal(logits, eager_logits)
        check(ids, logits, medium, h, probes, k, noise, dtype)


def always_ids_for(a, h, probes, dtype):
    """[A] int64 on CUDA: two tokens of a cluster row 0 probes, five anywhere (distinct: the op
    refuses repeats)."""
    c = int(select_clusters(h.cpu(), a.centroids.to(dtype).cpu(), probes)[0, 0])
    start = int(a.offsets[c])
    inside = a.token_ids[start:start + 2]
    outside = torch.randperm(a.vocab_size)[:5]
    ids = list(dict.fromkeys(torch.cat([outside, inside.cpu()]).tolist()))
    return torch.tensor(ids, device="cuda")


def always_op(a, h, dtype, probes, k, always, noise=None, C=16):
    rows = always_rows_of(always, a.token_ids)
    return torch.ops.flashhead.topk(h, *op_args(a, dtype, probes, k, C), noise, always, rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 5, 64, 130])
def test_always_ids_small_shapes(small, fresh_seed, dtype, B) -> None:
    for probes, k, noise in ((1, 1, None), (7, 5, None), (9, 16, gumbel(B, small.num_clusters))):
        h = draw_h(small.centroids, B, probes, noise, dtype, CLEAR)
        always = always_ids_for(small, h, probes, dtype)
        ids, logits = always_op(small, h, dtype, probes, k, always, noise)
        check(ids, logits, small, h, probes, k, noise, dtype, always=always)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 16, 64])
def test_always_ids_medium_shapes(medium, fresh_seed, dtype, B) -> None:
    for probes, k in ((64, 1), (256, 8)):
        h = draw_h(medium.centroids, B, probes, None, dtype, CLEAR)
        always = always_ids_for(medium, h, probes, dtype)
        ids, logits = always_op(medium, h, dtype, probes, k, always)
        check(ids, logits, medium, h, probes, k, None, dtype, always=always)


@pytest.mark.parametrize("select", ["multi", "single", "torch"])
def test_always_ids_every_selection(medium, fresh_seed, select) -> None:
    h = draw_h(medium.centroids, 16, 128, None, torch.bfloat16, CLEAR)
    always = always_ids_for(medium, h, 128, torch.bfloat16)
    args = op_args(medium, torch.bfloat16, 128, 4)
    out = flashhead_triton.triton_topk(h, *args, None, always_rows_of(always, medium.token_ids),
                                       select=select)
    check(*out, medium, h, 128, 4, always=always)


@pytest.mark.parametrize("B,probes,k", [(1, 1, 1), (1, 64, 4), (16, 1, 1), (16, 64, 4)])
def test_planted_always_id_beyond_the_probes(medium, fresh_seed, B, probes, k) -> None:
    """bf16 at V=32003: a token of a cluster no row probes gets every row's largest logit;
    only the always ids find it."""
    dtype = torch.bfloat16
    h = draw_h(medium.centroids, B, probes, None, dtype, CLEAR)
    # probes + 1: a row whose P-th cluster nearly ties may probe the next one on the GPU
    near = select_clusters(h.cpu(), medium.centroids.to(dtype).cpu(), probes + 1)
    sel = set(near.flatten().tolist())
    c = next(c for c in torch.randperm(medium.num_clusters).tolist() if c not in sel)
    row = int(medium.offsets[c]) + 3
    weight = medium.weight.to(dtype).clone()
    weight[row] = (20.0 * torch.nn.functional.normalize(h.float(), dim=1).sum(0)).to(dtype)
    eos = medium.token_ids[row:row + 1]
    args = (h, medium.centroids.to(dtype), weight, medium.offsets, medium.token_ids, probes, 16, k)
    assert not bool((torch.ops.flashhead.topk(*args)[0] == eos).any())
    ids, logits = torch.ops.flashhead.topk(*args, None, eos, torch.tensor([row], device="cuda"))
    assert bool((ids[:, 0] == eos).all())
    dense = (h.float() @ weight.float().t()).max(dim=1).values                  # fp32 products
    torch.testing.assert_close(logits[:, 0], dense, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("k", [1, 4])
def test_always_ids_cuda_graph_and_compile(medium, fresh_seed, k) -> None:
    B, probes, dtype = 16, 128, torch.bfloat16
    always = torch.tensor([0, 5, 32002], device="cuda")
    rows = always_rows_of(always, medium.token_ids)
    args = op_args(medium, dtype, probes, k)
    static_h = torch.randn(B, 512, device="cuda").to(dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                 # warm up (Triton compiles, values checked)
        for _ in range(3):
            torch.ops.flashhead.topk(static_h, *args, None, always, rows)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, logits = torch.ops.flashhead.topk(static_h, *args, None, always, rows)
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: torch.ops.flashhead.topk(h, *args, None, always, rows),
                             fullgraph=True)
    for _ in range(3):
        h = torch.randn(B, 512, device="cuda").to(dtype)
        static_h.copy_(h)
        graph.replay()
        torch.cuda.synchronize()
        check(ids.clone(), logits.clone(), medium, h, probes, k, None, dtype, always=always)
        c_ids, c_logits = compiled(h)
        check(c_ids, c_logits, medium, h, probes, k, None, dtype, always=always)


def test_always_ids_checked_on_cuda(small) -> None:
    h = torch.randn(2, 96, device="cuda", dtype=torch.bfloat16)
    args = op_args(small, torch.bfloat16, 4, 3)
    bad = torch.tensor([1, 1003], device="cuda")
    with pytest.raises(FlashHeadInputError, match=r"vocabulary ids in \[0, V=1003\)"):
        torch.ops.flashhead.topk(h, *args, None, bad)
    always = torch.tensor([1, 2], device="cuda")
    torch.ops.flashhead.topk(h, *args, None, always)       # checked once, then cached
    always[1] = 5000                                        # a new version is checked again
    with pytest.raises(FlashHeadInputError, match="vocabulary ids"):
        torch.ops.flashhead.topk(h, *args, None, always)
    wrong_rows = always_rows_of(torch.tensor([2, 1], device="cuda"), small.token_ids)
    with pytest.raises(FlashHeadInputError, match=r"token_ids\[always_rows\]"):
        torch.ops.flashhead.topk(h, *args, None, torch.tensor([1, 2], device="cuda"), wrong_rows)


def test_opcheck_with_always_ids(small, fresh_seed) -> None:
    h = torch.randn(3, 96, device="cuda", dtype=torch.bfloat16)
    always = torch.tensor([7, 1002], device="cuda")
    args = (h, *op_args(small, torch.bfloat16, 4, 3), gumbel(3, small.num_clusters), always,
            always_rows_of(always, small.token_ids))
    torch.library.opcheck(torch.ops.flashhead.topk.default, args)
