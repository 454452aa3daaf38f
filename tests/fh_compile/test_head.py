"""FlashHeadLMHead: the automatic dense path is chosen, visible, and equal to the dense head."""

from __future__ import annotations

import torch

from fh_compile import build_assets
from fh_compile.head import FlashHeadConfig, FlashHeadLMHead, default_dense_above_rows


def test_default_rule_follows_the_measured_break_even() -> None:
    # Qwen2 head (V=151,936), C=16: FlashHead up to 64 rows at 64 probes, 37 at 256, 18 at 512.
    assert default_dense_above_rows(151936, 64, 16) == 64
    assert default_dense_above_rows(151936, 256, 16) == 37
    assert default_dense_above_rows(151936, 512, 16) == 18
    assert default_dense_above_rows(151936, 4096, 16) == 2
    assert default_dense_above_rows(275, 18, 16) == 0     # 18 probes read more than V


def test_dense_path_above_the_limit_matches_dense_logits(fresh_seed) -> None:
    weight = torch.randn(1003, 96)
    head = FlashHeadLMHead(build_assets(weight, cluster_size=16),
                           FlashHeadConfig(probes=4, k=8, dense_above_rows=2))
    assert head.path_for(2) == "flashhead" and head.path_for(3) == "dense"
    h = torch.randn(3, 96)
    torch.testing.assert_close(head(h), h @ weight.t(), rtol=1e-5, atol=1e-5)
    few = head(h[:2])                       # FlashHead path: -inf outside the k candidates
    assert int(torch.isfinite(few).sum(dim=1).max()) == 8
    assert torch.equal(few.argmax(-1), head.topk(h[:2]).ids[:, 0])
