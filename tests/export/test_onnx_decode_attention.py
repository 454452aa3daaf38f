"""The ONNX translation of torch.ops.flashhead.decode_attention against the op (the PyTorch
reference on CPU), in onnxruntime: GQA, left padding, an empty row, windows, soft-capping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import custom_ops  # noqa: F401  (registers the ops before export.onnx_decomp reads them)
from export.onnx_decomp import translation_table

ort = pytest.importorskip("onnxruntime")

B, HQ, HKV, L, DH = 3, 12, 2, 37, 64


class Attn(torch.nn.Module):
    def __init__(self, window: int, softcap: float) -> None:
        super().__init__()
        self.window, self.softcap = window, softcap

    def forward(self, q, k, v, starts, fill):
        return torch.ops.flashhead.decode_attention(q, k, v, starts, fill, 0.125, self.window,
                                                    self.softcap)


@pytest.mark.parametrize("dtype,window,softcap", [(torch.float32, 0, 0.0),
                                                  (torch.float32, 5, 0.0),
                                                  (torch.float32, 0, 1.5),
                                                  (torch.float16, 7, 0.0)])
def test_onnx_matches_op(fresh_seed, tmp_path, dtype, window, softcap) -> None:
    q = torch.randn(B, HQ, 1, DH).to(dtype)
    k, v = (torch.randn(B, HKV, L, DH).to(dtype) for _ in range(2))
    starts = torch.tensor([0, 4, 30])        # row 2 is empty at fill 30, full rows elsewhere
    fill = torch.tensor(30)
    module = Attn(window, softcap)
    program = torch.export.export(module, (q, k, v, starts, fill))
    onnx_program = torch.onnx.export(program, (), dynamo=True, verbose=False,
                                     custom_translation_table=translation_table(),
                                     input_names=["q", "k", "v", "starts", "fill"],
                                     output_names=["out"])
    path = tmp_path / "attn.onnx"
    onnx_program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for fill_value in (30, 1, L):            # the fill is an input: one graph for every step
        fill = torch.tensor(fill_value)
        feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "starts": starts.numpy(),
                "fill": fill.numpy()}
        feed = {i.name: feed[i.name] for i in sess.get_inputs()}
        (got,) = sess.run(["out"], feed)
        ref = module(q, k, v, starts, fill).float().numpy()
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        np.testing.assert_allclose(got.astype(np.float32), ref, rtol=tol, atol=tol)
        if fill_value <= 30:
            assert not got[2].any(), "a row with no valid slot is exactly 0"
