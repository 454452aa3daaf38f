"""torch.export and ONNX round trips of the fast decode step beyond Qwen2: Llama and Gemma 3
(sliding-window layers, tied and scaled embeddings, q/k norms), tiny fp32 models on CPU.  The
reloaded programs and onnxruntime must reproduce the eager step's greedy tokens over a prompt
that crosses Gemma's window of 8."""

from __future__ import annotations

import pytest
import torch

from arch_models import VOCAB, tiny_arch
from export import onnx_export
from export.programs import Prompt, custom_op_counts, save_and_verify
from fh_compile import build_assets, swap_head
from fh_compile.decode import DecodeStep

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_fast_step_export_and_onnx_round_trip(arch, tmp_path):
    model = tiny_arch(arch)
    weight = model.get_output_embeddings().weight.detach()
    swap_head(model, build_assets(weight, cluster_size=16, coarse_iters=2, fine_iters=2),
              probes=4, k=8, dense_above_rows=2)
    step = DecodeStep(model, max_batch_size=2, max_cache_len=32, k=8)
    assert step.info.forward == "fast" and step.path == "flashhead"
    prompt = Prompt.make(2, 12, VOCAB, "cpu")
    programs, artifacts = save_and_verify(step, tmp_path, prompt, steps=6, verify=True)
    assert [a.verification.status for a in artifacts] == ["passed", "passed"], artifacts
    assert custom_op_counts(programs["decode"])["flashhead::rope_decode_attention"] == 2
    onnx_step = DecodeStep(model, max_batch_size=2, max_cache_len=32, k=8, kernels="torch")
    art = onnx_export.export_decode(onnx_step, tmp_path / "decode.onnx", prompt, 6, "cpu", True)
    assert art.verification.status == "passed", art.verification.detail


def test_transformers_forward_step_export_and_onnx_round_trip(tmp_path):
    """phi3 (no fast forward): transformers' forward with the decode-attention op, its counters
    in the state (the `_ws` op) for .pt2, none for the ONNX step (kernels="torch")."""
    model = tiny_arch("phi3")
    weight = model.get_output_embeddings().weight.detach()
    swap_head(model, build_assets(weight, cluster_size=16, coarse_iters=2, fine_iters=2),
              probes=4, k=8, dense_above_rows=2)
    step = DecodeStep(model, max_batch_size=2, max_cache_len=32, k=8)
    assert step.info.forward == "hf" and step.counters is not None
    prompt = Prompt.make(2, 12, VOCAB, "cpu")
    programs, artifacts = save_and_verify(step, tmp_path, prompt, steps=6, verify=True)
    assert [a.verification.status for a in artifacts] == ["passed", "passed"], artifacts
    layers = model.config.num_hidden_layers
    assert custom_op_counts(programs["decode"])["flashhead::decode_attention_ws"] == layers
    onnx_step = DecodeStep(model, max_batch_size=2, max_cache_len=32, k=8, kernels="torch")
    assert onnx_step.counters is None
    art = onnx_export.export_decode(onnx_step, tmp_path / "decode.onnx", prompt, 6, "cpu", True)
    assert art.verification.status == "passed", art.verification.detail
