"""flashhead::topk on CPU: registration (opcheck), CPU kernel == reference, compile, export, errors."""

from __future__ import annotations

import pytest
import torch

import custom_ops
from custom_ops import FlashHeadInputError, flashhead_reference, flashhead_topk
from fh_compile import build_assets


@pytest.fixture(scope="module")
def assets():
    # V = 1003 (not divisible by 16), D = 96: the odd shapes every kernel must take.
    return build_assets(torch.randn(1003, 96), cluster_size=16)


def op_args(assets, h, probes=8, k=4, noise=None, dtype=torch.float32):
    return (h.to(dtype), assets.centroids.to(dtype), assets.weight.to(dtype), assets.offsets,
            assets.token_ids, probes, 16, k, noise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck(assets, fresh_seed, dtype) -> None:
    args = op_args(assets, torch.randn(3, 96), dtype=dtype)
    torch.library.opcheck(torch.ops.flashhead.topk.default, args)
    noisy = op_args(assets, torch.randn(3, 96), noise=torch.randn(3, assets.num_clusters))
    torch.library.opcheck(torch.ops.flashhead.topk.default, noisy)


@pytest.mark.parametrize("B,probes,k", [(1, 1, 1), (3, 8, 4), (5, 63, 16), (17, 20, 300)])
def test_cpu_kernel_equals_reference(assets, fresh_seed, B, probes, k) -> None:
    h = torch.randn(B, 96)
    out = flashhead_topk(*op_args(assets, h, probes, k)[:5], probes=probes, cluster_size=16, k=k)
    ref_ids, ref_logits = flashhead_reference(*op_args(assets, h, probes, k))
    assert out.ids.dtype == torch.int64 and out.logits.dtype == torch.float32
    assert out.ids.shape == (B, k) and out.logits.shape == (B, k)
    assert torch.equal(out.ids, ref_ids)
    assert torch.equal(out.logits, ref_logits)
    assert bool((out.logits[:, :-1] >= out.logits[:, 1:]).all()), "best first"


def test_ties_break_by_smallest_id() -> None:
    weight = torch.zeros(32, 4)
    weight[:, 0] = 1.0  # every token has the same logit
    a = build_assets(weight, cluster_size=16)
    ids, _ = flashhead_reference(torch.ones(2, 4), a.centroids, a.weight, a.offsets, a.token_ids,
                                 2, 16, 5)
    assert ids.tolist() == [[0, 1, 2, 3, 4]] * 2


def test_centroid_noise_changes_probes(assets, fresh_seed) -> None:
    h = torch.randn(4, 96)
    base = flashhead_topk(*op_args(assets, h, 2, 8)[:5], probes=2, cluster_size=16, k=8)
    noise = torch.zeros(4, assets.num_clusters)
    noise[:, :] = -1e4
    noise[:, 5] = 1e4
    noise[:, 6] = 1e4
    forced = flashhead_topk(*op_args(assets, h, 2, 8)[:5], probes=2, cluster_size=16, k=8,
                            centroid_noise=noise)
    rows = torch.cat([assets.token_ids[int(assets.offsets[c]):int(assets.offsets[c + 1])]
                      for c in (5, 6)])
    assert bool(torch.isin(forced.ids, rows).all())
    assert not torch.equal(base.ids, forced.ids)


def test_fullgraph_compile_and_export(assets, fresh_seed) -> None:
    args = op_args(assets, torch.randn(3, 96))
    eager = torch.ops.flashhead.topk(*args)
    compiled = torch.compile(lambda *a: torch.ops.flashhead.topk(*a), fullgraph=True)(*args)
    assert torch.equal(compiled[0], eager[0])

    class Head(torch.nn.Module):
        def forward(self, h, c, w, o, t):
            return torch.ops.flashhead.topk(h, c, w, o, t, 8, 16, 4)

    ep = torch.export.export(Head(), args[:5])
    nodes = [n for n in ep.graph.nodes if n.target is torch.ops.flashhead.topk.default]
    assert len(nodes) == 1
    assert torch.equal(ep.module()(*args[:5])[0], eager[0])


def test_bad_inputs_raise_documented_errors(assets) -> None:
    h = torch.randn(2, 96)
    a = op_args(assets, h)

    def call(*args, **kw):
        base = dict(probes=8, cluster_size=16, k=4)
        base.update(kw)
        return flashhead_topk(*args, **base)

    with pytest.raises(FlashHeadInputError, match="bf16, fp16 or fp32"):
        call(h.to(torch.int32), *a[1:5])
    with pytest.raises(FlashHeadInputError, match="share one of"):
        call(h, a[1].double(), *a[2:5])
    with pytest.raises(FlashHeadInputError, match="hidden size mismatch"):
        call(torch.randn(2, 95), *a[1:5])
    with pytest.raises(FlashHeadInputError, match=r"\[B, D\]"):
        call(torch.randn(2, 1, 96), *a[1:5])
    with pytest.raises(FlashHeadInputError, match="probes must be in"):
        call(*a[:5], probes=0)
    with pytest.raises(FlashHeadInputError, match="probes must be in"):
        call(*a[:5], probes=assets.num_clusters + 1)
    with pytest.raises(FlashHeadInputError, match="k must be in"):
        call(*a[:5], k=8 * 16 + 1)
    with pytest.raises(FlashHeadInputError, match="offsets must be int64"):
        call(*a[:3], a[3].int(), a[4])
    with pytest.raises(FlashHeadInputError, match="contiguous"):
        wt = torch.randn(96, 1003).t()
        call(h, a[1], wt, *a[3:5])
    with pytest.raises(FlashHeadInputError, match="centroid_noise must be"):
        call(*a[:5], centroid_noise=torch.randn(3, 5))
    if torch.cuda.is_available():
        with pytest.raises(FlashHeadInputError, match="one device"):
            call(h.cuda(), *a[1:5])


def test_front_is_exported() -> None:
    assert set(custom_ops.__all__) >= {"flashhead_topk", "FlashHeadTopK", "FlashHeadInputError"}


def test_triton_topk_refuses_unknown_or_oversized_selection(assets) -> None:
    # The checks run before any kernel launch, so CPU tensors reach them.
    from custom_ops.flashhead_triton import triton_topk

    args = op_args(assets, torch.randn(2, 96))[:-1]
    with pytest.raises(ValueError, match="select must be 'auto', 'multi', 'single' or 'torch'"):
        triton_topk(*args, select="bitonic")
    wide = torch.zeros(16385, 96)                   # more clusters than one program holds
    with pytest.raises(ValueError, match="select='single' holds at most 16384 clusters.*'multi'"):
        triton_topk(args[0], wide, *args[2:], select="single")


def test_programmatic_dependent_launch_is_never_traced() -> None:
    # Inductor launches the kernels of a traced op itself and has no launch_pdl option for user
    # kernels, so a fake (traced) CUDA tensor, like a CPU one, must not ask for PDL launches.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from custom_ops.flashhead_triton import _pdl_usable

    assert not _pdl_usable(torch.empty(2, 8))
    with FakeTensorMode():
        fake = torch.empty(2, 8, device="cuda")
        assert fake.is_cuda and not _pdl_usable(fake)
