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
