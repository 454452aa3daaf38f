"""FlashHead-compile benchmarks: one module per question (README, "Benchmarks and evaluation")."""

from __future__ import annotations

import sys


def cuda_missing(prog: str, why: str) -> bool:
    """True, after saying so on stderr, when no CUDA GPU is visible; GPU benchmarks then exit 2."""
    import torch

    if torch.cuda.is_available():
        return False
    print(f"error: {prog} needs a CUDA GPU ({why}); run it on the GPU machine", file=sys.stderr)
    return True
