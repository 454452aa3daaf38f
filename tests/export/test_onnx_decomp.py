"""The ONNX translation of torch.ops.flashhead.topk against the op (the PyTorch reference on CPU),
in onnxruntime: odd shapes, each float dtype, centroid noise, and exact logit ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import custom_ops  # noqa: F401
from export.onnx_decomp import translation_table

ort = pytest.importorskip("onnxruntime")

V, D, C, P, KTOP = 1000, 96, 16, 5, 7     # V is not a multiple of C: the last 8 clusters hold 15


class OpModule(torch.nn.Module):
    def __init__(self, centroids, weight, offsets, token_ids, noise: bool) -> None:
        super().__init__()
        for name, t in (("centroids", centroids), ("weight", weight), ("offsets", offsets),
                        ("token_ids", token_ids)):
            self.register_buffer(name, t)
        self.noise = noise

    def forward(self, h, noise):
        return torch.ops.flashhead.topk(h, self.centroids, self.weight, self.offsets,
                                        self.token_ids, P, C, KTOP,
                                        noise if self.noise else None)


def layout(dtype: torch.dtype, integer_rows: bool = False):
    """Random clustered head: K = 63 clusters (55 of 16 rows, 8 of 15), rows of a cluster near
    a random centre, token_ids a random permutation."""
    K = -(-V // C)
    sizes = torch.full((K,), C)
    sizes[K - (K * C - V):] -= 1                                          # [K] sums to V
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    centres = torch.randn(K, D)
    rows = centres.repeat_interleave(sizes, 0) + 0.5 * torch.randn(V, D)   # [V, D]
    if integer_rows:  # small integers: every dot product is exact in fp32, so ties are exact
        rows = rows.round().clamp(-2, 2)
    centroids = torch.stack([rows[offsets[c]:offsets[c + 1]].mean(0) for c in range(K)])
    return (centroids.to(dtype), rows.to(dtype).contiguous(), offsets,
            torch.randperm(V, dtype=torch.int64))


def run_both(module: OpModule, h: torch.Tensor, noise: torch.Tensor, tmp_path):
    program = torch.export.export(module, (h, noise))
    onnx_program = torch.onnx.export(program, (), dynamo=True, verbose=False,
                                     custom_translation_table=translation_table(),
                                     input_names=["h", "noise"], output_names=["ids", "logits"])
    path = tmp_path / "op.onnx"
    onnx_program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"h": h.numpy(), "noise": noise.numpy()}
    feed = {i.name: feed[i.name] for i in sess.get_inputs()}  # an unused input is dropped
    got_ids, got_logits = sess.run(["ids", "logits"], feed)
    ref_ids, ref_logits = module(h, noise)
    return (ref_ids.numpy(), ref_logits.numpy()), (got_ids, got_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("noise", [False, True])
def test_onnx_matches_op(dtype, noise, fresh_seed, tmp_path):
    module = OpModule(*layout(dtype), noise=noise)
    h = torch.randn(3, D).to(dtype)                                       # B = 3
    gumbel = -torch.log(-torch.log(torch.rand(3, -(-V // C)).clamp(1e-20, 1 - 1e-7)))
    (ref_ids, ref_logits), (ids, logits) = run_both(module, h, gumbel, tmp_path)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_onnx_orders_exact_ties_by_smallest_id(fresh_seed, tmp_path):
    module = OpModule(*layout(torch.float32, integer_rows=True), noise=False)
    h = torch.randint(-2, 3, (4, D)).float()                              # exact integer logits
    (ref_ids, ref_logits), (ids, logits) = run_both(module, h, torch.zeros(4, 63), tmp_path)
    assert (np.diff(ref_logits, axis=1) == 0).any(), "the layout should produce exact ties"
    np.testing.assert_array_equal(logits, ref_logits)
    np.testing.assert_array_equal(ids, ref_ids)


class AlwaysModule(OpModule):
    """OpModule with always-scored ids (and their rows, or the lookup inside the graph)."""

    def __init__(self, centroids, weight, offsets, token_ids, always, with_rows: bool) -> None:
        super().__init__(centroids, weight, offsets, token_ids, noise=True)
        inverse = torch.argsort(token_ids)                               # vocab id -> row
        self.register_buffer("always", always)
        self.register_buffer("rows", inverse[always] if with_rows else None)

    def forward(self, h, noise):
        return torch.ops.flashhead.topk(h, self.centroids, self.weight, self.offsets,
                                        self.token_ids, P, C, KTOP, noise, self.always, self.rows)


@pytest.mark.parametrize("with_rows", [True, False])
def test_onnx_matches_op_with_always_ids(with_rows, fresh_seed, tmp_path):
    from custom_ops.reference import select_clusters

    centroids, weight, offsets, token_ids = layout(torch.float32)
    h = torch.randn(3, D)
    noise = torch.zeros(3, -(-V // C))
    c = int(select_clusters(h, centroids, P)[0, 0])                      # probed by row 0
    inside = token_ids[int(offsets[c]):int(offsets[c]) + 2]
    # A row beyond the probes with the largest logit of every row: only the always ids find it.
    far = next(c for c in range(len(offsets) - 1)
               if c not in set(select_clusters(h, centroids, P + 1).flatten().tolist()))
    weight[int(offsets[far])] = 20.0 * torch.nn.functional.normalize(h, dim=1).sum(0)
    eos = token_ids[int(offsets[far])]
    ids = [int(eos), int(inside[0]), int(inside[1]), 17]
    always = torch.tensor(list(dict.fromkeys(ids)))                     # distinct, as the op needs
    module = AlwaysModule(centroids, weight, offsets, token_ids, always, with_rows)
    (ref_ids, ref_logits), (ids, logits) = run_both(module, h, noise, tmp_path)
    assert (ref_ids[:, 0] == int(eos)).all(), "the planted always id is every row's top-1"
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
