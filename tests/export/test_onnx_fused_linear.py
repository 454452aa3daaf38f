"""The ONNX translations of flashhead::rms_norm_linear and flashhead::act_linear
(export/onnx_decomp.py) against the ops (the PyTorch references on CPU), in onnxruntime: odd
shapes, fp32 and fp16, every optional input and activation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import custom_ops
from export.onnx_decomp import translation_table

ort = pytest.importorskip("onnxruntime")

B, K, N = 3, 96, 40
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


class Layer(torch.nn.Module):
    """Two rms_norm_linear calls (with and without each optional input) and one act_linear each
    way, so one export covers every branch of the translations that the parameters select."""

    def __init__(self, dtype, act: str, gemma: bool) -> None:
        super().__init__()
        g = (lambda *s: torch.randn(*s).to(dtype))
        self.offset = 1.0 if gemma else 0.0
        self.post = torch.nn.Parameter(g(K) * 0.2) if gemma else None
        self.norm1 = torch.nn.Parameter(g(K) * 0.2 + (0.0 if gemma else 1.0))
        self.norm2 = torch.nn.Parameter(g(K) * 0.2 + (0.0 if gemma else 1.0))
        self.wqkv = torch.nn.Parameter(g(N, K) / K ** 0.5)
        self.bqkv = torch.nn.Parameter(g(N) * 0.1)
        self.w13 = torch.nn.Parameter(g(2 * N, K) / K ** 0.5)
        self.w2 = torch.nn.Parameter(g(K, N) / N ** 0.5)
        self.wo = torch.nn.Parameter(g(K, N) / N ** 0.5)
        self.act = act

    def forward(self, x, residual):
        qkv, r1 = custom_ops.rms_norm_linear(x, None, None, self.norm1, self.wqkv, self.bqkv,
                                             1e-6, self.offset)
        o = custom_ops.act_linear(qkv, self.wo, "none")
        gu, r2 = custom_ops.rms_norm_linear(o, residual, self.post, self.norm2, self.w13, None,
                                            1e-5, self.offset)
        return custom_ops.act_linear(gu, self.w2, self.act), r1, r2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act,gemma", [("silu_mul", False), ("gelu_tanh_mul", True)])
def test_onnx_matches_ops(dtype, act, gemma, fresh_seed, tmp_path) -> None:
    layer = Layer(dtype, act, gemma).requires_grad_(False)
    x, residual = torch.randn(B, K).to(dtype), torch.randn(B, K).to(dtype)
    program = torch.export.export(layer, (x, residual))
    onnx_program = torch.onnx.export(program, (), dynamo=True, verbose=False,
                                     custom_translation_table=translation_table(),
                                     input_names=["x", "residual"],
                                     output_names=["out", "r1", "r2"])
    path = tmp_path / "layer.onnx"
    onnx_program.save(str(path))
    ops = {n.op_type for n in onnx_program.model_proto.graph.node}
    assert not any("flashhead" in o for o in ops), f"custom op left in the graph: {ops}"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["out", "r1", "r2"], {"x": x.numpy(), "residual": residual.numpy()})
    ref = [t.numpy() for t in layer(x, residual)]
    tol = TOL[dtype]
    for g, r, name in zip(got, ref, ("out", "r1", "r2")):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        np.testing.assert_allclose(g.astype(np.float32), r.astype(np.float32), rtol=tol,
                                   atol=tol, err_msg=name)
