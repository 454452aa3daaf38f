"""Sampling over FlashHead's candidate set: temperature, top-k, top-p, and stochastic probing.

Everything here is plain tensor code with fixed shapes (no host sync), so it compiles into the
decode graph.  Randomness comes from torch's global generator: `torch.manual_seed(s)` before a
run makes it reproducible, eager or compiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """do_sample=False is greedy.  top_k=0 and top_p=1.0 disable those filters."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stochastic_probing: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got "
                             f"{self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.stochastic_probing and not self.do_sample:
            raise ValueError("stochastic_probing needs do_sample=True")


def gumbel_probe_noise(rows: int, clusters: int, temperature: float,
                       device: torch.device) -> torch.Tensor:
    """[rows, K] noise T * Gumbel(0, 1): top-P of (scores + noise) samples P clusters from
    softmax(scores / T) without replacement (the Gumbel top-k trick)."""
    u = torch.rand(rows, clusters, device=device).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u)) * temperature


def sample_candidates(ids: torch.Tensor, logits: torch.Tensor,
                      cfg: SamplingConfig) -> torch.Tensor:
    """Pick one token per row from candidates sorted best first.

    ids [B, k] int64, logits [B, k] fp32 (descending, -inf allowed) -> tokens [B] int64.
    Greedy takes column 0 (FlashHead orders equal logits by smallest id, like argmax).
    """
    if not cfg.do_sample:
        return ids[:, 0]
    scores = logits / cfg.temperature
    col = torch.arange(scores.shape[1], device=scores.device)
    if 0 < cfg.top_k < scores.shape[1]:
        scores = scores.masked_fill(col >= cfg.top_k, float("-inf"))
    if cfg.top_p < 1.0:
        probs = torch.softmax(scores, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        before = torch.cumsum(probs, dim=-1) - probs
        scores = scores.masked_fill(before >= cfg.top_p, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, with no host sync.
    race = probs / torch.empty_like(probs).exponential_(1.0)
    return torch.gather(ids, 1, race.argmax(dim=-1, keepdim=True)).squeeze(1)
