"""GEMV sweep: launch configs of the fused decode linears (custom_ops/fused_linear_triton.py) on
the real decode shapes, against torch F.linear (cuBLAS) on the same inputs.

    python -m benchmarks.gemv_sweep [--quick] [--batch 1 16] [--shapes NAME ...] [--jobs 8]
                                    [--out results/gemv_sweep.json]

Shapes: every linear of a DeepSeek-R1-Distill-Qwen-1.5B and a Gemma-3-270M decode layer (fused
QKV and gate/up weights, with the norm prologue each gets in the fast decode step) and both dense
LM heads, bf16.  Each candidate config is timed in CUDA graphs (triton.testing.do_bench_cudagraph,
median) over rotating copies of the weight (>= 3x the 60 MB L2 in all), so every call reads its
weight from HBM as in a decode step; GB/s = weight bytes / time, beside the card's measured copy
bandwidth.  Each candidate's output is checked against an fp32 reference first; a wrong one is
reported and never wins.  Kernels are compiled first by --jobs worker processes (Triton's disk
cache), so the run takes ~2-3 minutes.  Printed last: a table per (shape, B), then the winners as
the Python dict to paste into GEMV_CONFIGS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from benchmarks import cuda_missing


@dataclass(frozen=True)
class GemvShape:
    name: str
    op: str                     # "rms_norm_linear" | "act_linear"
    N: int
    K: int
    act: str = "none"           # act_linear's act
    bias: bool = False          # rms_norm_linear: bias, residual, branch_norm, norm_offset
    residual: bool = True
    branch_norm: bool = False
    norm_offset: float = 0.0


_GEMMA = dict(branch_norm=True, norm_offset=1.0)
SHAPES = (
    GemvShape("qwen1.5b/qkv", "rms_norm_linear", 2048, 1536, bias=True),
    GemvShape("qwen1.5b/o", "act_linear", 1536, 1536),
    GemvShape("qwen1.5b/gate_up", "rms_norm_linear", 17920, 1536),
    GemvShape("qwen1.5b/down", "act_linear", 1536, 8960, act="silu_mul"),
    GemvShape("qwen1.5b/lm_head", "act_linear", 151936, 1536),
    # Gemma-3-270M: D=640, 4 q heads + 1 kv head of 256 (q 1024 + k 256 + v 256 rows), I=2048
    GemvShape("gemma3-270m/qkv", "rms_norm_linear", 1536, 640, **_GEMMA),
    GemvShape("gemma3-270m/o", "act_linear", 640, 1024),
    GemvShape("gemma3-270m/gate_up", "rms_norm_linear", 4096, 640, **_GEMMA),
    GemvShape("gemma3-270m/down", "act_linear", 640, 2048, act="gelu_tanh_mul"),
    GemvShape("gemma3-270m/lm_head", "act_linear", 262144, 640),
)
_SHAPES = {s.name: s for s in SHAPES}


@dataclass
class SweepConfig:
    batch_sizes: tuple[int, ...] = (1, 16)
    shapes: tuple[str, ...] = tuple(_SHAPES)
    rep_ms: int = 20            # do_bench_cudagraph: ms of calls per graph replay
    rotate_bytes: float = 180e6  # weight copies per shape: >= this many bytes in all (3x L2)
    max_copies: int = 128
    quick: bool = False         # fewer candidates
    jobs: int = 8               # compile workers (0: compile in the timing loop)
    out: Path = field(default_factory=lambda: Path("results/gemv_sweep.json"))

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        unknown = set(self.shapes) - set(_SHAPES)
        if unknown:
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {', '.join(_SHAPES)}")
        if self.rep_ms < 1 or self.max_copies < 1 or self.jobs < 0:
            raise ValueError("rep_ms and max_copies must be >= 1, jobs >= 0")


def candidates(shape: GemvShape, B: int, quick: bool) -> list:
    """Configs to time: FMA rows at B = 1, tl.dot tiles above, plus the default and one of the
    other kind for comparison; blocks giving fewer than 64 programs (half an H100/H200's SMs)
    are skipped, except the narrowest."""
    import triton

    from custom_ops.fused_linear_triton import GemvConfig, default_config, fit_config

    if B == 1:
        grid = [(1, 2, 2048, 4, 1), (1, 4, 1024, 4, 1), (1, 4, 2048, 8, 1), (1, 8, 512, 4, 1),
                (1, 8, 1024, 8, 1), (1, 16, 256, 4, 1), (1, 16, 512, 8, 1), (16, 8, 256, 4, 3)]
    else:
        bb = 16 if B <= 16 else 32 if B <= 32 else 64
        grid = [(bb, 8, 256, 4, 3), (bb, 8, 128, 4, 4), (bb, 16, 256, 4, 3), (bb, 16, 128, 4, 4),
                (bb, 32, 256, 4, 3), (bb, 32, 128, 8, 4), (bb, 64, 128, 4, 3), (1, 8, 512, 4, 1)]
    if quick:
        grid = grid[1::2]
    narrowest = min(g[1] for g in grid)
    out = [default_config(shape.N, shape.K, B)]
    out += [GemvConfig(*g) for g in grid if triton.cdiv(shape.N, g[1]) >= 64 or g[1] == narrowest]
    return list(dict.fromkeys(fit_config(c, shape.K, torch.bfloat16) for c in out))


def make_inputs(shape: GemvShape, B: int, copies: int, seed: int = 0, device: str = "cuda",
                dtype: torch.dtype = torch.bfloat16) -> dict:
    """Random inputs: x, the prologue's tensors, `copies` weights [N, K] (outputs O(1))."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device=device) * scale).to(dtype)

    rms = shape.op == "rms_norm_linear"
    d = dict(x=rnd(B, shape.K if rms or shape.act == "none" else 2 * shape.K),
             weights=[rnd(shape.N, shape.K, scale=shape.K ** -0.5) for _ in range(copies)])
    if rms:
        d.update(residual=rnd(B, shape.K) if shape.residual else None,
                 branch_norm=rnd(shape.K, scale=0.2) if shape.branch_norm else None,
                 norm=rnd(shape.K, scale=0.2) + (0.0 if shape.norm_offset else 1.0),
                 bias=rnd(shape.N, scale=0.1) if shape.bias else None)
    d["h"] = rnd(B, shape.K)              # cuBLAS baseline input
    return d


def call(shape: GemvShape, d: dict, w: torch.Tensor, cfg) -> torch.Tensor:
    from custom_ops import fused_linear_triton as flt

    if shape.op == "rms_norm_linear":
        return flt.fused_gemv(d["x"], w, flt.RMS_NORM, residual=d["residual"],
                              branch_norm=d["branch_norm"], norm=d["norm"], bias=d["bias"],
                              eps=1e-6, norm_offset=shape.norm_offset, config=cfg)[0]
    return flt.fused_gemv(d["x"], w, flt.ACT_PROLOGUES[shape.act], config=cfg)[0]


def reference(shape: GemvShape, d: dict, w: torch.Tensor) -> torch.Tensor:
    from custom_ops.fused_linear import act_linear_reference, rms_norm_linear_reference

    if shape.op == "rms_norm_linear":
        return rms_norm_linear_reference(d["x"], d["residual"], d["branch_norm"], d["norm"], w,
                                         d["bias"], 1e-6, shape.norm_offset)[0]
    return act_linear_reference(d["x"], w, shape.act)


def _compile_job(job: tuple[str, int, tuple]) -> tuple[tuple, Optional[str]]:
    """Worker: compile one (shape, B, config) by running it once (fills Triton's disk cache)."""
    from custom_ops.fused_linear_triton import GemvConfig

    name, B, cfg = job
    try:
        shape = _SHAPES[name]
        d = make_inputs(shape, B, 1)
        call(shape, d, d["weights"][0], GemvConfig(*cfg))
        torch.cuda.synchronize()
        return job, None
    except Exception as e:                          # reported by the timing loop again
        return job, f"{type(e).__name__}: {e}"[:300]


def precompile(jobs: list[tuple[str, int, tuple]], workers: int) -> None:
    import concurrent.futures
    import multiprocessing

    t0 = time.time()
    try:
        with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            failed = [r for r in pool.map(_compile_job, jobs) if r[1] is not None]
        print(f"compiled {len(jobs)} kernels in {time.time() - t0:.0f} s with {workers} "
              f"workers ({len(failed)} failed)", flush=True)
    except Exception as e:                          # compile in the timing loop instead
        print(f"warning: parallel compile failed ({e}); compiling one by one", flush=True)


def time_rotating(fn, weights: list[torch.Tensor], rep_ms: int) -> float:
    """Median ms of one call fn(w), over CUDA-graph replays that cycle through the weights."""
    import triton.testing

    def all_copies():
        for w in weights:
            fn(w)

    return triton.testing.do_bench_cudagraph(all_copies, rep=rep_ms,
                                             return_mode="median") / len(weights)


def run(cfg: SweepConfig) -> tuple[dict, list[dict]]:
    import triton

    import custom_ops  # noqa: F401
    from benchmarks.head_latency import copy_bandwidth_gbps

    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth_gbps()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "copy_gbps": bw,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"{meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}, copy bandwidth "
          f"{bw:.0f} GB/s", flush=True)
    plan = [(_SHAPES[n], B, candidates(_SHAPES[n], B, cfg.quick))
            for n in cfg.shapes for B in cfg.batch_sizes]
    if cfg.jobs > 0:
        precompile([(s.name, B, tuple(asdict(c).values())) for s, B, cands in plan
                    for c in cands], cfg.jobs)
    rows: list[dict] = []
    for shape, B, cands in plan:
        wbytes = shape.N * shape.K * 2
        copies = max(1, min(cfg.max_copies, math.ceil(cfg.rotate_bytes / wbytes)))
        d = make_inputs(shape, B, copies)
        ref = reference(shape, d, d["weights"][0]).float()
        tol = 2e-2 * (1.0 + ref.abs())
        base = dict(shape=shape.name, op=shape.op, act=shape.act, N=shape.N, K=shape.K, B=B,
                    weight_bytes=wbytes, copies=copies)
        bias = d.get("bias")
        ms = time_rotating(lambda w: torch.nn.functional.linear(d["h"], w, bias), d["weights"],
                           cfg.rep_ms)
        rows.append(dict(base, method="cublas", config=None, ms=ms, gbps=wbytes / ms / 1e6))
        for c in cands:
            row = dict(base, method="triton", config=list(asdict(c).values()))
            try:
                out = call(shape, d, d["weights"][0], c).float()
                err = float((out - ref).abs().max())
                if not bool(((out - ref).abs() <= tol).all()):
                    raise AssertionError(f"wrong output: max abs error {err:.3g}")
                ms = time_rotating(lambda w: call(shape, d, w, c), d["weights"], cfg.rep_ms)
                row.update(ms=ms, gbps=wbytes / ms / 1e6, max_err=err)
            except Exception as e:                  # one bad config must not end the sweep
                row.update(ms=None, gbps=None, error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
        best = min((r for r in rows[-len(cands):] if r["ms"] is not None),
                   key=lambda r: r["ms"], default=None)
        print(f"{shape.name:22s} B={B:<3d} cuBLAS {rows[-len(cands) - 1]['ms'] * 1e3:7.1f} us  "
              f"best {best['ms'] * 1e3 if best else float('nan'):7.1f} us "
              f"{best['config'] if best else None}", flush=True)
        del d
        torch.cuda.empty_cache()
    return meta, rows


def winners(rows: list[dict]) -> dict:
    """{(N, K, bucket): config tuple} of the fastest correct candidate per (shape, B)."""
    from custom_ops.fused_linear_triton import batch_bucket

    best: dict = {}
    for r in rows:
        if r["method"] == "triton" and r["ms"] is not None:
            key = (r["N"], r["K"], batch_bucket(r["B"]))
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    return {k: tuple(r["config"]) for k, r in best.items()}


def print_table(meta: dict, rows: list[dict]) -> None:
    bw = meta["copy_gbps"]
    print(f"\n{meta['gpu']}, bf16, copy bandwidth {bw:.0f} GB/s; GB/s = weight bytes / time")
    print(f"{'shape':22s} {'B':>3s} {'MB':>6s} {'cuBLAS us':>9s} {'GB/s':>6s} "
          f"{'default us':>10s} {'best us':>8s} {'GB/s':>6s} {'%copy':>6s} {'vs cuBLAS':>9s}  best")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["shape"], r["B"]), []).append(r)
    for (name, B), rs in groups.items():
        cub = next(r for r in rs if r["method"] == "cublas")
        tri = [r for r in rs if r["method"] == "triton" and r["ms"] is not None]
        if not tri:
            print(f"{name:22s} {B:3d}  no config ran: {rs[-1].get('error')}")
            continue
        best = min(tri, key=lambda r: r["ms"])
        dflt = rs[1]                                # candidates() puts the default first
        dms = f"{dflt['ms'] * 1e3:10.1f}" if dflt["ms"] is not None else f"{'error':>10s}"
        print(f"{name:22s} {B:3d} {cub['weight_bytes'] / 1e6:6.1f} {cub['ms'] * 1e3:9.1f} "
              f"{cub['gbps']:6.0f} {dms} {best['ms'] * 1e3:8.1f} {best['gbps']:6.0f} "
              f"{100 * best['gbps'] / bw:5.0f}% {cub['ms'] / best['ms']:8.2f}x  "
              f"{tuple(best['config'])}")
    bad = [r for r in rows if r.get("error")]
    if bad:
        print(f"{len(bad)} candidate(s) failed, e.g. {bad[0]['shape']} B={bad[0]['B']} "
              f"{bad[0]['config']}: {bad[0]['error']}")
    print("\n# (N, K, bucket): (block_b, block_n, block_k, num_warps, num_stages); paste into "
          "custom_ops/fused_linear_triton.py GEMV_CONFIGS")
    print("GEMV_CONFIGS = {")
    for k, v in sorted(winners(rows).items()):
        print(f"    {k!r}: {v!r},")
    print("}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gemv_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="half the candidate configs")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 16)")
    p.add_argument("--shapes", nargs="+", choices=list(_SHAPES), help="default: all")
    p.add_argument("--jobs", type=int, default=8, help="compile workers (0: none)")
    p.add_argument("--out", type=Path, default=Path("results/gemv_sweep.json"))
    args = p.parse_args(argv)
    if cuda_missing("benchmarks.gemv_sweep", "the Triton GEMV kernels and CUDA graphs"):
        return 2
    kw: dict = dict(out=args.out, quick=args.quick, jobs=args.jobs)
    if args.batch:
        kw["batch_sizes"] = tuple(args.batch)
    if args.shapes:
        kw["shapes"] = tuple(args.shapes)
    try:
        cfg = SweepConfig(**kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    meta, rows = run(cfg)
    meta["seconds"] = round(time.time() - t0, 1)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    table = {repr(k): v for k, v in winners(rows).items()}
    cfg.out.write_text(json.dumps(dict(meta, config=config, winners=table, rows=rows), indent=1))
    print_table(meta, rows)
    print(f"wrote {cfg.out} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
