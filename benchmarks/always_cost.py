"""What do always-scored ids cost?  The Triton op with A always-scored ids vs without, one GPU.

    python -m benchmarks.always_cost [--quick] [--out results/always_cost.json]

The end-of-turn / eos ids FlashHead scores at every step (issue 15) add A weight rows per step
(A * D * 2 bytes in bf16, 3 KB per id at D = 1536) and, in the union kernel, a comparison of each
cluster's rows with the A rows.  Each row times torch.ops.flashhead.topk with A ids (and their
rows, as FlashHeadLMHead passes them) against A = 0 measured in the same run on the same card,
with benchmarks.head_latency's method: one CUDA graph per rotated input h, replayed in turn,
triton.testing.do_bench median with L2 flushed.  Random weights and h; half of the always ids
lie in clusters the first row probes (the de-duplication path), half anywhere.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks import cuda_missing


@dataclass
class AlwaysCostConfig:
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    probes: tuple[int, ...] = (64, 256)
    always: tuple[int, ...] = (0, 2, 8, 64)        # A; 0 is the baseline of each row
    ks: tuple[int, ...] = (1, 64)                  # greedy, and a sampling candidate set
    vocab: int = 151936
    hidden: int = 1536
    cluster_size: int = 16
    rotations: int = 4
    warmup_ms: int = 25
    rep_ms: int = 100
    out: Path = field(default_factory=lambda: Path("results/always_cost.json"))

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        K = -(-self.vocab // self.cluster_size)
        if not self.probes or min(self.probes) < 1 or max(self.probes) > K:
            raise ValueError(f"probes must be in [1, K={K}], got {self.probes}")
        if 0 not in self.always or min(self.always) < 0 or max(self.always) > 64:
            raise ValueError(f"always counts must include 0 (the baseline) and lie in [0, 64], "
                             f"got {self.always}")
        if not self.ks or not 1 <= min(self.ks) <= max(self.ks) <= min(self.probes) * 15:
            raise ValueError(f"k must be in [1, min(probes) * 15], got {self.ks}")
        if self.rotations < 1 or self.rep_ms < 1:
            raise ValueError("rotations and rep_ms must be >= 1")


def always_ids(a, h: torch.Tensor, probes: int, A: int, gen: torch.Generator) -> torch.Tensor:
    """[A] int64 on h's device: A // 2 tokens of the clusters row 0 probes, the rest anywhere."""
    from custom_ops.reference import select_clusters

    sel = select_clusters(h[:1], a.centroids, probes)[0]
    inside = torch.cat([a.token_ids[int(a.offsets[c]):int(a.offsets[c + 1])] for c in sel[:A]])
    anywhere = torch.randperm(a.vocab_size, generator=gen)[:A - A // 2].to(h.device)
    return torch.cat([inside[:A // 2], anywhere])


def run(cfg: AlwaysCostConfig) -> tuple[dict, list[dict]]:
    import triton

    import custom_ops  # noqa: F401  (registers torch.ops.flashhead.topk)
    from benchmarks.head_latency import copy_bandwidth_gbps, time_graphs
    from custom_ops.reference import always_rows_of, flashhead_reference
    from fh_compile.build_assets import build_assets

    dt, V, D, C = torch.bfloat16, cfg.vocab, cfg.hidden, cfg.cluster_size
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(V, D, device="cuda", dtype=dt)                # W: [V, D] bf16
    a = build_assets(weight, cluster_size=C, coarse_iters=4, fine_iters=4)
    bw = copy_bandwidth_gbps()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "copy_bandwidth_gbps": round(bw, 1), "V": V, "D": D, "C": C, "K": a.num_clusters,
            "dtype": "bf16", "inputs": "random weights and h"}
    print(f"{meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}; V={V} D={D} C={C}",
          flush=True)
    rows = []
    for B in cfg.batch_sizes:
        hs = [torch.randn(B, D, device="cuda", dtype=dt) for _ in range(cfg.rotations)]
        for P in cfg.probes:
            for k in cfg.ks:
                args = (a.centroids, a.weight, a.offsets, a.token_ids, P, C, k, None)
                base_ms = None
                for A in sorted(cfg.always):
                    ids = always_ids(a, hs[0], P, A, gen) if A else None
                    rows_a = always_rows_of(ids, a.token_ids) if A else None
                    ms = time_graphs(lambda h: torch.ops.flashhead.topk(h, *args, ids, rows_a),
                                     hs, cfg)
                    base_ms = ms if A == 0 else base_ms
                    got = torch.ops.flashhead.topk(hs[0], *args, ids, rows_a)[0][:, 0]
                    ref = flashhead_reference(hs[0].float(), *args, ids, rows_a)[0][:, 0]
                    rows.append(dict(gpu=meta["gpu"], B=B, probes=P, k=k, always=A, ms=ms,
                                     vs_none=ms / base_ms, extra_us=(ms - base_ms) * 1e3,
                                     extra_bytes=A * D * weight.element_size(),
                                     top1_agree=float((got == ref).float().mean())))
                    print(f"B={B} P={P} k={k} A={A} {ms:.4f} ms ({ms / base_ms:.3f}x A=0)",
                          flush=True)
        del hs
    return meta, rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'B':>4} {'probes':>6} {'k':>3} {'A':>3} {'ms':>9} {'x A=0':>7} {'extra us':>9} "
            f"{'extra KB':>9} {'top1=ref':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['B']:>4} {r['probes']:>6} {r['k']:>3} {r['always']:>3} {r['ms']:>9.4f} "
              f"{r['vs_none']:>7.3f} {r['extra_us']:>9.2f} {r['extra_bytes'] / 1024:>9.1f} "
              f"{r['top1_agree']:>8.2f}")
    print("x A=0: time with A always-scored ids over the same op without them (same run); extra "
          "KB: the A weight rows read per step; top1=ref: agreement with the fp32 reference "
          "(bf16 h, near ties aside)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.always_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B in {1, 16}, probes 256, k 1")
    p.add_argument("--batch-sizes", type=int, nargs="+")
    p.add_argument("--probes", type=int, nargs="+")
    p.add_argument("--always", type=int, nargs="+", help="always-id counts A (0 always added)")
    p.add_argument("--out", type=Path, default=Path("results/always_cost.json"))
    args = p.parse_args(argv)
    if cuda_missing("benchmarks.always_cost", "the op's Triton kernels and CUDA graphs"):
        return 2
    kw: dict = {"out": args.out}
    if args.quick:
        kw.update(batch_sizes=(1, 16), probes=(256,), ks=(1,), rotations=2, rep_ms=50)
    if args.batch_sizes:
        kw["batch_sizes"] = tuple(args.batch_sizes)
    if args.probes:
        kw["probes"] = tuple(args.probes)
    if args.always:
        kw["always"] = tuple(sorted({0, *args.always}))
    try:
        cfg = AlwaysCostConfig(**kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta, rows = run(cfg)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    cfg.out.write_text(json.dumps({"meta": meta, "config": config, "rows": rows}, indent=2) + "\n")
    print_table(rows)
    print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
