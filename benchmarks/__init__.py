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


def write_results(out, prog: str, argv: list[str] | None, meta: dict, rows: list[dict]) -> None:
    """Record the command line in meta, write {"meta", "rows"} as JSON to `out` (a Path), and
    say where."""
    import json

    meta["command"] = " ".join([f"python -m {prog}", *(argv if argv is not None else sys.argv[1:])])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")
