"""Always-scored ids of flashhead::topk on CPU: the op (CPU kernel) and the reference against an
independent oracle (dense logits restricted to the probed clusters' tokens and the always ids),
a planted end-of-turn token that probes never reach, opcheck, compile, export, and errors."""

from __future__ import annotations

import pytest
import torch

from custom_ops import FlashHeadInputError, flashhead_reference, flashhead_topk
from custom_ops.reference import always_rows_of, select_clusters, topk_by_logit_then_id
from fh_compile import build_assets

V, D, C = 1003, 96, 16      # V does not divide by C: the last clusters hold 15 rows


@pytest.fixture(scope="module")
def assets():
    return build_assets(torch.randn(V, D), cluster_size=C, coarse_iters=3, fine_iters=3)


def cluster_tokens(a, c: int) -> torch.Tensor:
    return a.token_ids[int(a.offsets[c]):int(a.offsets[c + 1])]


def oracle(a, h, probes, k, always_ids):
    """Top-k of the dense fp32 logits over {tokens of the probed clusters} U always_ids."""
    sel = select_clusters(h, a.centroids, probes)                       # [B, P]
    inv = always_rows_of(torch.arange(V), a.token_ids)                  # vocab id -> row
    logits = h.float() @ a.weight.float()[inv].t()                      # [B, V] vocab order
    allowed = torch.zeros(h.shape[0], V, dtype=torch.bool)
    for b in range(h.shape[0]):
        for c in sel[b].tolist():
            allowed[b, cluster_tokens(a, c)] = True
    allowed[:, always_ids] = True
    masked = logits.masked_fill(~allowed, float("-inf"))
    return topk_by_logit_then_id(masked, torch.arange(V).expand_as(masked), k)


def op(a, h, probes, k, always_ids=None, always_rows=None):
    return flashhead_topk(h, a.centroids, a.weight, a.offsets, a.token_ids, probes=probes,
                          cluster_size=C, k=k, always_ids=always_ids, always_rows=always_rows)


def plant(a, h, probes):
    """A copy of the assets whose one token, in a cluster that no row of h probes, gets the
    largest logit of every row (centroids unchanged, so the probed clusters stay the same).
    Returns (assets, that token's vocabulary id)."""
    sel = select_clusters(h, a.centroids, probes)
    unprobed = [c for c in range(a.num_clusters) if c not in set(sel.flatten().tolist())]
    c = unprobed[int(torch.randint(len(unprobed), ()))]
    row = int(a.offsets[c]) + int(torch.randint(int(a.offsets[c + 1] - a.offsets[c]), ()))
    weight = a.weight.clone()
    weight[row] = 20.0 * torch.nn.functional.normalize(h.float(), dim=1).sum(0)
    planted = type(a)(centroids=a.centroids, weight=weight, offsets=a.offsets,
                      token_ids=a.token_ids, cluster_size=C, fingerprint=a.fingerprint)
    return planted, int(a.token_ids[row])


@pytest.mark.parametrize("B,k", [(1, 1), (1, 4), (3, 1), (3, 5)])
def test_planted_eos_in_an_unprobed_cluster(assets, fresh_seed, B, k) -> None:
    h = torch.randn(B, D)
    a, eos = plant(assets, h, probes=1)
    dense = h @ a.weight.t()                                            # reordered rows
    assert bool((a.token_ids[dense.argmax(1)] == eos).all()), "the planted token is the argmax"
    without = op(a, h, 1, k)
    assert not bool((without.ids == eos).any()), "probes=1 never reaches the planted cluster"
    ids = torch.tensor([eos, 7])                                         # + an ordinary id
    for rows in (None, always_rows_of(ids, a.token_ids)):
        got = op(a, h, 1, k, ids, rows)
        assert bool((got.ids[:, 0] == eos).all())
        torch.testing.assert_close(got.logits[:, 0], dense.max(1).values, rtol=1e-5, atol=1e-5)
        ref = flashhead_reference(h, a.centroids, a.weight, a.offsets, a.token_ids, 1, C, k,
                                  None, ids, rows)
        assert torch.equal(got.ids, ref[0]) and torch.equal(got.logits, ref[1])


@pytest.mark.parametrize("B,probes,k", [(1, 1, 1), (1, 3, 7), (3, 4, 1), (3, 4, 16),
                                        (17, 2, 5)])
def test_candidates_are_the_probed_tokens_and_the_always_ids(assets, fresh_seed, B, probes,
                                                             k) -> None:
    h = torch.randn(B, D)
    sel0 = select_clusters(h, assets.centroids, probes)[0]
    inside = cluster_tokens(assets, int(sel0[0]))[:2]                  # probed by row 0
    outside = torch.randperm(V)[:5]
    always = torch.tensor(list(dict.fromkeys(torch.cat([outside, inside]).tolist())))  # distinct
    got = op(assets, h, probes, k, always)
    want_ids, want_logits = oracle(assets, h, probes, k, always)
    assert torch.equal(got.ids, want_ids)
    torch.testing.assert_close(got.logits, want_logits, rtol=1e-5, atol=1e-5)


def test_repeated_always_ids_are_refused(assets) -> None:
    h = torch.randn(2, D)
    with pytest.raises(FlashHeadInputError, match="distinct"):
        op(assets, h, 2, 4, torch.tensor([3, 7, 3]))


def test_an_always_id_in_a_probed_cluster_is_scored_once(assets, fresh_seed) -> None:
    probes, B = 3, 2
    h = torch.randn(B, D)
    sel = select_clusters(h, assets.centroids, probes)
    always = torch.cat([cluster_tokens(assets, int(sel[0, 0]))[:3],       # probed by row 0
                        cluster_tokens(assets, int(sel[1, 2]))[-1:]])      # probed by row 1
    k = probes * C                                                       # the most k can be
    got = op(assets, h, probes, k, always)
    want_ids, _ = oracle(assets, h, probes, k, always)
    for b in range(B):
        finite = torch.isfinite(got.logits[b])
        ids = got.ids[b][finite]
        assert ids.numel() == ids.unique().numel(), "no id twice"
        assert set(ids.tolist()) == set(want_ids[b][finite].tolist())
    # Row 0: its probed clusters hold its always ids, so it has no more candidates than rows.
    rows0 = sum(len(cluster_tokens(assets, c)) for c in sel[0].tolist())
    assert int(torch.isfinite(got.logits[0]).sum()) == min(k, rows0 + 1)   # + row 1's id


def test_empty_always_ids_is_the_plain_op(assets, fresh_seed) -> None:
    h = torch.randn(3, D)
    plain = op(assets, h, 4, 6)
    empty = op(assets, h, 4, 6, torch.empty(0, dtype=torch.int64))
    assert torch.equal(plain.ids, empty.ids) and torch.equal(plain.logits, empty.logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck_with_always_ids(assets, fresh_seed, dtype) -> None:
    always = torch.tensor([3, V - 1, 500])
    base = (torch.randn(3, D).to(dtype), assets.centroids.to(dtype), assets.weight.to(dtype),
            assets.offsets, assets.token_ids, 4, C, 5)
    torch.library.opcheck(torch.ops.flashhead.topk.default, (*base, None, always))
    rows = always_rows_of(always, assets.token_ids)
    noise = torch.randn(3, assets.num_clusters)
    torch.library.opcheck(torch.ops.flashhead.topk.default, (*base, noise, always, rows))


def test_compile_and_export_round_trip_with_always_ids(assets, fresh_seed) -> None:
    always = torch.tensor([11, 400])
    rows = always_rows_of(always, assets.token_ids)

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in ("centroids", "weight", "offsets", "token_ids"):
                self.register_buffer(name, getattr(assets, name))
            self.register_buffer("always", always)
            self.register_buffer("rows", rows)

        def forward(self, h):
            return torch.ops.flashhead.topk(h, self.centroids, self.weight, self.offsets,
                                            self.token_ids, 2, C, 4, None, self.always, self.rows)

    head = Head()
    h = torch.randn(3, D)
    eager = head(h)
    assert torch.equal(eager[0], oracle(assets, h, 2, 4, always)[0])
    compiled = torch.compile(head, fullgraph=True)(h)
    assert torch.equal(compiled[0], eager[0])          # Inductor may sum in another order:
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-5)
    ep = torch.export.export(head, (h,))
    nodes = [n for n in ep.graph.nodes if n.target is torch.ops.flashhead.topk.default]
    assert len(nodes) == 1
    h2 = torch.randn(3, D)
    assert torch.equal(ep.module()(h2)[0], head(h2)[0])


def test_bad_always_ids_raise_documented_errors(assets) -> None:
    h = torch.randn(2, D)

    def call(always, rows=None):
        return op(assets, h, 4, 3, always, rows)

    with pytest.raises(FlashHeadInputError, match="1-D int64"):
        call(torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(FlashHeadInputError, match="1-D int64"):
        call(torch.tensor([[1, 2]]))
    with pytest.raises(FlashHeadInputError, match=r"vocabulary ids in \[0, V=1003\)"):
        call(torch.tensor([1, V]))
    with pytest.raises(FlashHeadInputError, match=r"vocabulary ids in \[0, V=1003\)"):
        call(torch.tensor([-1]))
    with pytest.raises(FlashHeadInputError, match="at most 64"):
        call(torch.arange(65))
    with pytest.raises(FlashHeadInputError, match="always_rows needs always_ids"):
        op(assets, h, 4, 3, None, torch.tensor([0]))
    with pytest.raises(FlashHeadInputError, match="one row per id"):
        call(torch.tensor([1, 2]), torch.tensor([0]))
    with pytest.raises(FlashHeadInputError, match=r"token_ids\[always_rows\] == always_ids"):
        call(torch.tensor([1, 2]), always_rows_of(torch.tensor([2, 1]), assets.token_ids))
    with pytest.raises(FlashHeadInputError, match=r"token_ids\[always_rows\] == always_ids"):
        call(torch.tensor([1]), torch.tensor([V + 5]))
    with pytest.raises(FlashHeadInputError, match="contiguous"):
        call(torch.arange(8)[::2])
    always = torch.tensor([1, 2])
    call(always)                            # checked once per tensor version, then remembered
    always[1] = V                           # an in-place change is a new version: checked again
    with pytest.raises(FlashHeadInputError, match="vocabulary ids"):
        call(always)
    if torch.cuda.is_available():
        with pytest.raises(FlashHeadInputError, match="one device"):
            call(torch.tensor([1]).cuda())
