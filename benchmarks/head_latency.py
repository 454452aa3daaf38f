"""Head latency: dense LM head + argmax vs FlashHead (PyTorch reference, Triton op) on one GPU.

    python -m benchmarks.head_latency [--quick] [--out results/head_latency.json]

Every candidate is captured in CUDA graphs (one per rotated input h, replayed in turn) and timed
with triton.testing.do_bench (median; L2 flushed before every replay, as after the rest of a
decode step).  Speedups are against the dense head measured in the same run on the same card.
Weights and h are random: clusters are balanced but h has no structure, so the rows of a batch
share few clusters; the union (distinct clusters read) is the worst case a real model sees.
With --real-inputs FILE (benchmarks.real_inputs) the centroids and hidden states are a real
model's (each batch: one decode position from each of B different prompts), so the clusters
selected and shared are the real ones; the weight rows stay random (their values do not change
the speed; top1=ref still compares the op with the reference on the same rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks import cuda_missing

METHODS = ("dense", "reference", "triton", "triton_nopdl", "triton_single", "triton_topksel")


@dataclass
class HeadLatencyConfig:
    batch_sizes: tuple[int, ...] = (1, 4, 16, 32, 64)
    probes: tuple[int, ...] = (64, 128, 256, 512)
    vocab: int = 151936
    hidden: int = 1536
    cluster_size: int = 16
    k: int = 1
    rotations: int = 4          # distinct inputs h, one CUDA graph each, replayed in turn
    warmup_ms: int = 25
    rep_ms: int = 100
    # triton: the op (multi-program Triton cluster selection); triton_nopdl: the same without
    # programmatic dependent launch; triton_single: the same kernels with one selection program
    # per row; triton_topksel: with torch.topk picking the clusters.
    methods: tuple[str, ...] = METHODS
    profile: bool = False       # per-kernel GPU times of the Triton op at probes 256
    real_inputs: Path | None = None   # benchmarks.real_inputs file: real centroids and h
    out: Path = field(default_factory=lambda: Path("results/head_latency.json"))

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        K = -(-self.vocab // self.cluster_size)
        if not self.probes or min(self.probes) < 1 or max(self.probes) > K:
            raise ValueError(f"probes must be in [1, K={K}], got {self.probes}")
        if not 1 <= self.k <= min(self.probes) * (self.cluster_size - 1):
            raise ValueError(f"k must be in [1, min(probes) * (cluster_size - 1)], got {self.k}")
        if self.rotations < 1 or self.rep_ms < 1:
            raise ValueError("rotations and rep_ms must be >= 1")
        if self.real_inputs is not None and not Path(self.real_inputs).is_file():
            raise ValueError(f"--real-inputs {self.real_inputs}: no such file (write it with "
                             f"python -m benchmarks.real_inputs)")
        unknown = set(self.methods) - set(METHODS)
        if unknown or "dense" not in self.methods:
            raise ValueError(f"methods are {', '.join(METHODS)} (dense required); got "
                             f"{self.methods}")


def time_graphs(step: Callable[[torch.Tensor], object], inputs: list[torch.Tensor],
                cfg: HeadLatencyConfig) -> float:
    """Median ms of one call of `step`, captured once per input and replayed round-robin."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):             # compile / autotune outside the capture
        for h in inputs[:2]:
            step(h)
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for h in inputs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step(h)
        graphs.append(g)
    turn = [0]

    def replay() -> None:
        graphs[turn[0] % len(graphs)].replay()
        turn[0] += 1

    ms = triton.testing.do_bench(replay, warmup=cfg.warmup_ms, rep=cfg.rep_ms,
                                 return_mode="median")
    del graphs
    torch.cuda.empty_cache()
    return float(ms)


def profile_kernels(step: Callable[[torch.Tensor], object], h: torch.Tensor, label: str,
                    calls: int = 50) -> list[dict]:
    """GPU time per kernel of `step(h)` (eager calls, torch.profiler), printed and returned.

    Kernel times are device-side, so they match the graph replays; the graph's total minus
    their sum is launch gaps."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step(h)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step(h)
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = e.cuda_time_total
        if us > 0 and e.count >= calls:
            out.append({"kernel": e.key[:70], "us_per_call": us / calls, "launches": e.count})
    out.sort(key=lambda r: -r["us_per_call"])
    total = sum(r["us_per_call"] for r in out)
    print(f"\nkernels of {label} (GPU us per call, {calls} eager calls; sum {total:.1f} us):")
    for r in out:
        print(f"  {r['us_per_call']:8.2f} us  x{r['launches'] // calls}  {r['kernel']}")
    return out


def copy_bandwidth_gbps() -> float:
    """Achieved device-memory bandwidth of a 1 GiB copy (read + write), the floor's yardstick."""
    import triton.testing

    src = torch.empty(1 << 29, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def run(cfg: HeadLatencyConfig) -> tuple[dict, list[dict]]:
    """(run metadata: card, versions, date, shapes; one row per (B, probes, method))."""
    import triton

    import custom_ops  # noqa: F401  (registers torch.ops.flashhead.topk)
    from custom_ops.flashhead_triton import triton_topk
    from custom_ops.reference import flashhead_reference, select_clusters
    from fh_compile.build_assets import build_assets

    dt, V, D, C = torch.bfloat16, cfg.vocab, cfg.hidden, cfg.cluster_size
    torch.manual_seed(0)
    weight = torch.randn(V, D, device="cuda", dtype=dt)                # W: [V, D] bf16
    a = build_assets(weight, cluster_size=C, coarse_iters=4, fine_iters=4)
    K, elt = a.num_clusters, weight.element_size()
    centroids, real = a.centroids, None                                 # [K, D] bf16
    if cfg.real_inputs is not None:
        from benchmarks.real_inputs import load

        real = load(cfg.real_inputs)
        if tuple(real.centroids.shape) != (K, D):
            raise ValueError(f"{cfg.real_inputs}: centroids {tuple(real.centroids.shape)}, but "
                             f"V={V}, C={C} gives K={K} clusters of D={D}")
        centroids = real.centroids.to("cuda", dt)
        gen = torch.Generator().manual_seed(0)
    bw = copy_bandwidth_gbps()
    now = datetime.datetime.now().isoformat(timespec="seconds")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "date": now,
            "copy_bandwidth_gbps": round(bw, 1), "V": V, "D": D, "C": C, "K": K, "k": cfg.k,
            "dtype": "bf16", "inputs": "random weights and h (worst case for cluster sharing)"
            if real is None else "real centroids and hidden states (one position from each of B "
            "prompts; see real_inputs), random weight rows", "real_inputs": real and real.meta}
    print(f"{meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}, copy bandwidth "
          f"{bw:.0f} GB/s; V={V} D={D} C={C} K={K} k={cfg.k}", flush=True)
    print(f"inputs: {meta['inputs']}", flush=True)
    rows = []

    def add(B: int, P: int | None, method: str, ms: float, dense_ms: float, union: float | None,
            nbytes: float, agree: float | None) -> None:
        rows.append(dict(gpu=meta["gpu"], B=B, probes=P, method=method, ms=ms,
                         speedup=dense_ms / ms, union=union, bytes=nbytes,
                         gbps=nbytes / ms / 1e6, floor_ms=nbytes / bw / 1e6, top1_agree=agree))
        extra = "" if union is None else f" (union {union:.0f} clusters)"
        print(f"B={B} P={P} {method} {ms:.4f} ms{extra}", flush=True)

    for B in cfg.batch_sizes:
        hs = [torch.randn(B, D, device="cuda", dtype=dt) if real is None else
              real.draw_batch(B, gen).to("cuda", dt) for _ in range(cfg.rotations)]
        dense_ms = time_graphs(lambda h: torch.matmul(h, weight.t()).argmax(-1), hs, cfg)
        add(B, None, "dense", dense_ms, dense_ms, None, V * D * elt, None)
        for P in cfg.probes:
            args = (centroids, a.weight, a.offsets, a.token_ids, P, C, cfg.k)
            union = sum(select_clusters(h, centroids, P).unique().numel() for h in hs) / len(hs)
            fh_bytes = (K * D + union * C * D) * elt
            steps = {"reference": lambda h: flashhead_reference(h, *args),
                     "triton": lambda h: torch.ops.flashhead.topk(h, *args, None),
                     "triton_nopdl": lambda h: triton_topk(h, *args, None, pdl=False),
                     "triton_single": lambda h: triton_topk(h, *args, None, select="single"),
                     "triton_topksel": lambda h: triton_topk(h, *args, None, select="torch")}
            ref_ids = flashhead_reference(hs[0], *args)[0]
            for method in (m for m in cfg.methods if m != "dense"):
                ms = time_graphs(steps[method], hs, cfg)
                agree = float((steps[method](hs[0])[0][:, 0] == ref_ids[:, 0]).float().mean())
                add(B, P, method, ms, dense_ms, union, fh_bytes, agree)
            if cfg.profile and P == 256:
                # Without PDL: a kernel launched early would count its wait as GPU time.
                meta.setdefault("profiles", {})[f"B={B} P={P} triton_nopdl"] = profile_kernels(
                    steps["triton_nopdl"], hs[0], f"the Triton op (no PDL) at B={B} P={P}")
        del hs
    return meta, rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'B':>4} {'probes':>6} {'method':<14} {'ms':>9} {'x dense':>8} {'GB/s':>7} "
            f"{'floor ms':>9} {'union':>7} {'top1=ref':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        probes = "-" if r["probes"] is None else str(r["probes"])
        union = "-" if r["union"] is None else f"{r['union']:.0f}"
        agree = "-" if r["top1_agree"] is None else f"{r['top1_agree']:.2f}"
        print(f"{r['B']:>4} {probes:>6} {r['method']:<14} {r['ms']:>9.4f} {r['speedup']:>8.2f} "
              f"{r['gbps']:>7.0f} {r['floor_ms']:>9.4f} {union:>7} {agree:>8}")
    print("floor ms: bytes that must be read (dense: W; FlashHead: centroids + the batch's union "
          "of clusters) at the measured copy bandwidth")
    print("union: distinct clusters selected across the batch (mean over inputs); random h is the "
          "worst case for sharing, a real model's batch shares more clusters")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.head_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B in {1, 16}, probes 256, short timing")
    p.add_argument("--batch-sizes", type=int, nargs="+")
    p.add_argument("--probes", type=int, nargs="+")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="dense is always run")
    p.add_argument("--profile", action="store_true",
                   help="also print per-kernel GPU times of the Triton op at probes 256")
    p.add_argument("--real-inputs", type=Path,
                   help="a benchmarks.real_inputs file: a real model's centroids and hidden states")
    p.add_argument("--out", type=Path, default=Path("results/head_latency.json"))
    args = p.parse_args(argv)
    if cuda_missing("benchmarks.head_latency", "the op's Triton kernels and CUDA graphs"):
        return 2
    kw: dict = {"out": args.out, "profile": args.profile, "real_inputs": args.real_inputs}
    if args.quick:
        kw.update(batch_sizes=(1, 16), probes=(256,), rotations=2, rep_ms=50)
    if args.batch_sizes:
        kw["batch_sizes"] = tuple(args.batch_sizes)
    if args.probes:
        kw["probes"] = tuple(args.probes)
    if args.methods:
        kw["methods"] = tuple(dict.fromkeys(["dense", *args.methods]))
    try:
        cfg = HeadLatencyConfig(**kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta, rows = run(cfg)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    command = " ".join(["python -m benchmarks.head_latency", *(argv if argv is not None
                                                               else sys.argv[1:])])
    cfg.out.write_text(json.dumps(dict(meta, command=command, config=config, rows=rows),
                                  indent=1))
    print_table(rows)
    print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
