"""The fast decode forward on the GPU: the custom ops' Triton kernels inside whole models.

* every fast architecture (tiny, fp32): compiled with CUDA graphs, greedy tokens equal to
  transformers' own generate, with a left-padded row and the sliding window crossed;
* DeepSeek-R1-Distill-Qwen-1.5B's architecture (random weights): fp32 greedy tokens equal to
  transformers' over 64 steps; the bf16 op path's hidden states no further from fp32 than
  1.5 times the plain-PyTorch bf16 path's (transformers' rounding), on the same tokens.
"""

from __future__ import annotations

import pytest
import torch

import fh_compile
from arch_models import FAST, VOCAB, tiny_arch

pytestmark = pytest.mark.cuda


def _prompt(B: int, T: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 5, (B, T), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[-1, :3] = 0                                                    # last row left padded
    return ids, mask


@pytest.mark.parametrize("arch", FAST)
def test_tiny_fast_forward_cuda_graphs_equal_transformers(arch, tmp_path):
    model = tiny_arch(arch).cuda()
    ids, mask = _prompt(3, 12, VOCAB)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
    fh_compile.compile_model(model, flashhead=False, mode="reduce-overhead", max_batch_size=3,
                             max_cache_len=128, forward="fast")
    out = fh_compile.generate(model, ids, attention_mask=mask, max_new_tokens=48, eos_token_id=[])
    assert model.fh_compiled.info.forward == "fast"
    assert torch.equal(out.sequences, expected)


@pytest.mark.slow
def test_r1_architecture_fp32_tokens_and_bf16_hidden_states():
    from benchmarks.random_models import random_model

    model = random_model("r1-1.5b", dtype=torch.float32)
    with torch.no_grad():   # spread the logits so greedy tokens are not near-ties
        model.lm_head.weight.mul_(8.0)
    ids, mask = _prompt(2, 24, model.config.vocab_size, seed=1)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
    fh_compile.compile_model(model, flashhead=False, mode=None, max_batch_size=2,
                             max_cache_len=256, forward="fast")
    out = fh_compile.generate(model, ids, attention_mask=mask, max_new_tokens=64, eos_token_id=[])
    assert torch.equal(out.sequences, expected)
    fh_compile.uncompile_model(model)

    # bf16: the op path and the plain-PyTorch path (transformers' rounding) on the same tokens,
    # each against fp32 hidden states: the ops may not add more than half again of bf16's own
    # error (measured on the H200 against each other: 3.6% relative after 28 random layers).
    from fh_compile.decode import DecodeStep

    tokens = out.sequences[:, 24:40]                                     # [2, 16] teacher-forced

    @torch.no_grad()
    def hidden_states(step: DecodeStep) -> torch.Tensor:
        step.prefill_hidden(ids, mask)
        return torch.stack([step.hidden(tokens[:, i:i + 1]).float() for i in range(16)])

    h32 = hidden_states(DecodeStep(model, max_batch_size=2, max_cache_len=256, kernels="torch"))
    model = model.to(torch.bfloat16)
    err = {k: ((hidden_states(DecodeStep(model, max_batch_size=2, max_cache_len=256, kernels=k))
                - h32).norm() / h32.norm()).item() for k in ("ops", "torch")}
    print(f"bf16 relative error of the hidden states vs fp32: ops {err['ops']:.2e}, plain "
          f"PyTorch {err['torch']:.2e}")
    assert err["ops"] <= 1.5 * err["torch"] + 1e-3
