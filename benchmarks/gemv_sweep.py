"""GEMV sweep: launch plans of the fused decode linears (custom_ops/fused_linear_triton.py) on the
real decode shapes, against torch F.linear (cuBLAS) on the same inputs.

    python -m benchmarks.gemv_sweep [--quick] [--batch 1 16] [--shapes NAME ...] [--jobs 8]
                                    [--out results/gemv_sweep.json]

Shapes: every linear of a DeepSeek-R1-Distill-Qwen-1.5B and a Gemma-3-270M decode layer (fused
QKV and gate/up weights, with the norm prologue each gets in the fast decode step) and both dense
LM heads, bf16.  Candidates: the default plan first, Triton tiles (FMA rows at B = 1, tl.dot
tiles above), the same with K splits (split-K, for shapes with few blocks of output features),
and at B > 1 the composite plan (prologue in PyTorch ops + F.linear), timed as torch.compile
runs it: Inductor's fused prologue kernel + cuBLAS.  Each candidate is timed in CUDA graphs
(triton.testing.do_bench_cudagraph, median) over rotating copies of the weight (>= 3x the 60 MB
L2 in all), so every call reads its weight from HBM as in a decode step; GB/s = weight bytes /
time, beside the card's measured copy bandwidth.  Each candidate's output is checked against an
fp32 reference first; a wrong one is reported and never wins.  Kernels (and the composite graphs)
are compiled first by --jobs worker processes (Triton's and Inductor's disk caches), so a --quick
run takes ~3 minutes.  Printed last: a table per (shape, B), then the winners as the Python dict
to paste into GEMV_CONFIGS (custom_ops/fused_linear_config.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
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
    # split-K with a fresh zeroed counter buffer per call (one fill kernel), as torch.compile runs
    # it; False: the persistent buffer of eager calls (no fill)
    compiled_counters: bool = True
    out: Path = field(default_factory=lambda: Path("results/gemv_sweep.json"))

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        unknown = set(self.shapes) - set(_SHAPES)
        if unknown:
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {', '.join(_SHAPES)}")
        if self.rep_ms < 1 or self.max_copies < 1 or self.jobs < 0:
            raise ValueError("rep_ms and max_copies must be >= 1, jobs >= 0")


def kind_of(shape: GemvShape) -> str:
    """The shape's GEMV_CONFIGS kind: its prologue."""
    return "rms_norm" if shape.op == "rms_norm_linear" else shape.act


def candidates(shape: GemvShape, B: int, quick: bool) -> list:
    """Plans to time, the default plan first: FMA rows at B = 1, tl.dot tiles above, one of the
    other kind for comparison (tiles giving fewer than 64 programs, half an H100/H200's SMs, are
    skipped, except the narrowest); K splits of a few tiles that bring the grid to 2-8 (B = 1)
    or 1-4 (B > 1) programs per SM, for shapes with few blocks of output features; COMPOSITE at
    B > 1.  At B = 1 every FMA plan also requests its weight tiles ahead (num_stages 2), and
    with the RMSNorm prologue every one without splits also runs it in one pass (one_pass)."""
    import triton

    from custom_ops.fused_linear_config import (_SMS, COMPOSITE, MAX_SPLITS, GemvConfig,
                                                default_config, fit_config)

    if B == 1:
        grid = [(1, 2, 2048, 4, 1), (1, 4, 1024, 4, 1), (1, 4, 2048, 8, 1), (1, 8, 512, 4, 1),
                (1, 8, 1024, 8, 1), (1, 16, 256, 4, 1), (1, 16, 512, 8, 1), (16, 8, 256, 4, 3)]
        split_tiles = [(1, 8, 512, 4, 1), (1, 16, 512, 4, 1), (1, 4, 1024, 4, 1)]
        waves = (2, 4, 8)
    else:
        bb = 16 if B <= 16 else 32 if B <= 32 else 64
        grid = [(bb, 8, 256, 4, 3), (bb, 8, 128, 4, 4), (bb, 16, 256, 4, 3), (bb, 16, 128, 4, 4),
                (bb, 32, 256, 4, 3), (bb, 32, 128, 8, 4), (bb, 64, 128, 4, 3), (1, 8, 512, 4, 1)]
        split_tiles = [(bb, 64, 128, 4, 3), (bb, 64, 256, 8, 2), (bb, 32, 128, 4, 3)]
        waves = (1, 2, 4)
    if quick:
        grid, split_tiles = grid[1::2], split_tiles[:2]
    narrowest = min(g[1] for g in grid)
    out = [default_config(kind_of(shape), shape.N, shape.K, B)]
    out += [GemvConfig(*g) for g in grid if triton.cdiv(shape.N, g[1]) >= 64 or g[1] == narrowest]
    for tile in split_tiles:
        blocks = triton.cdiv(shape.N, tile[1])
        for w in waves:
            splits = min(MAX_SPLITS, triton.cdiv(w * _SMS, blocks))
            if splits >= 2:
                out.append(GemvConfig(*tile, splits=splits))
    if B == 1:                      # each FMA plan also with its weight tiles requested ahead
        out += [GemvConfig(c.block_b, c.block_n, c.block_k, c.num_warps, 2, c.splits)
                for c in out if c != COMPOSITE and c.block_b == 1]
        if kind_of(shape) == "rms_norm":    # and the norm in one pass, where it applies
            out += [replace(c, one_pass=True) for c in out
                    if c != COMPOSITE and c.block_b == 1 and c.splits == 1]
    if B > 1:
        out.append(COMPOSITE)
    fitted = [c if c == COMPOSITE else fit_config(c, shape.K, torch.bfloat16) for c in out]
    return list(dict.fromkeys(fitted))


def plan_tuple(plan) -> object:
    """A plan as the table and the JSON rows record it: a config tuple or "composite"."""
    from dataclasses import astuple

    if isinstance(plan, str):
        return plan
    t = astuple(plan)                   # one_pass last: 1 when set, left out when not
    return t[:-1] + (1,) if plan.one_pass else t[:-1]


def plan_of(value) -> object:
    """The inverse of `plan_tuple` (JSON turns tuples into lists)."""
    from custom_ops.fused_linear_config import plan_of_entry

    return plan_of_entry(value if isinstance(value, str) else tuple(value))


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


def composite_fn(shape: GemvShape, d: dict):
    """w -> out of the composite plan as torch.compile runs it inside the op (Inductor fuses the
    prologue into one kernel; F.linear stays cuBLAS); act "none" is F.linear alone (eager)."""
    from custom_ops.fused_linear_config import COMPOSITE

    def fn(w: torch.Tensor) -> torch.Tensor:
        return call(shape, d, w, COMPOSITE)

    if kind_of(shape) == "none":
        return fn
    torch._dynamo.reset()           # a fresh cache: one graph per (shape, B), no recompile limit
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _compile_job(job: tuple[str, int, object]) -> tuple[tuple, Optional[str]]:
    """Worker: compile one (shape, B, plan) by running it once (fills Triton's and Inductor's
    disk caches)."""
    import torch._inductor.config

    name, B, plan = job
    try:
        torch._inductor.config.compile_threads = 1      # the pool is the parallelism
        shape = _SHAPES[name]
        d = make_inputs(shape, B, 1)
        if plan == "composite":
            composite_fn(shape, d)(d["weights"][0])
        else:
            call(shape, d, d["weights"][0], plan_of(plan))
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
        precompile([(s.name, B, plan_tuple(c)) for s, B, cands in plan for c in cands],
                   cfg.jobs)
    rows: list[dict] = []
    with counters_as_compiled(cfg.compiled_counters):
        for shape, B, cands in plan:
            rows += time_plans(cfg, shape, B, cands)
    return meta, rows


@contextlib.contextmanager
def counters_as_compiled(on: bool):
    """Within: split-K launches take a fresh zeroed counter buffer per call (one fill kernel
    each), as in a torch.compile'd graph (Inductor keeps no state between calls)."""
    from custom_ops import counters

    saved = counters.is_traced
    if on:
        counters.is_traced = lambda t: True
    try:
        yield
    finally:
        counters.is_traced = saved


def time_plans(cfg: SweepConfig, shape: GemvShape, B: int, cands: list) -> list[dict]:
    """Rows of one (shape, B): cuBLAS, then every candidate plan (checked, then timed)."""
    rows: list[dict] = []
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
        composite = c == "composite"
        row = dict(base, method="composite" if composite else "triton",
                   config=c if composite else list(plan_tuple(c)))
        try:
            fn = composite_fn(shape, d) if composite else (
                lambda w, c=c: call(shape, d, w, c))
            out = fn(d["weights"][0]).float()
            err = float((out - ref).abs().max())
            if not bool(((out - ref).abs() <= tol).all()):
                raise AssertionError(f"wrong output: max abs error {err:.3g}")
            ms = time_rotating(fn, d["weights"], cfg.rep_ms)
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
    return rows


def winners(rows: list[dict]) -> dict:
    """{(kind, N, K, bucket): config tuple or "composite"} of the fastest correct candidate per
    (shape, B)."""
    from custom_ops.fused_linear_config import batch_bucket

    best: dict = {}
    for r in rows:
        if r["method"] in ("triton", "composite") and r["ms"] is not None:
            kind = "rms_norm" if r["op"] == "rms_norm_linear" else r["act"]
            key = (kind, r["N"], r["K"], batch_bucket(r["B"]))
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    return {k: r["config"] if isinstance(r["config"], str) else tuple(r["config"])
            for k, r in best.items()}


def _us(rs: list[dict]) -> str:
    """The fastest correct time of rows rs in us, as a 9-wide column ("-" if none ran)."""
    ok = [r["ms"] for r in rs if r["ms"] is not None]
    return f"{min(ok) * 1e3:9.1f}" if ok else f"{'-':>9s}"


def _split(r: dict) -> bool:
    return r["method"] == "triton" and len(r["config"]) > 5 and r["config"][5] > 1


def print_table(meta: dict, rows: list[dict]) -> None:
    bw = meta["copy_gbps"]
    print(f"\n{meta['gpu']}, bf16, copy bandwidth {bw:.0f} GB/s; GB/s = weight bytes / time; "
          f"times in us: cuBLAS F.linear (no prologue), the default plan, the best Triton tiles "
          f"without / with K splits (with one counter fill each, as compiled, unless "
          f"--eager-counters), the composite plan (compiled), the best of all")
    print(f"{'shape':22s} {'B':>3s} {'MB':>6s} {'cuBLAS':>9s} {'default':>9s} {'tiles':>9s} "
          f"{'split-K':>9s} {'composite':>9s} {'best':>9s} {'GB/s':>6s} {'%copy':>6s} "
          f"{'vs cuBLAS':>9s}  best plan")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["shape"], r["B"]), []).append(r)
    for (name, B), rs in groups.items():
        cub = next(r for r in rs if r["method"] == "cublas")
        ran = [r for r in rs if r["method"] != "cublas" and r["ms"] is not None]
        if not ran:
            print(f"{name:22s} {B:3d}  no plan ran: {rs[-1].get('error')}")
            continue
        best = min(ran, key=lambda r: r["ms"])
        plan = best["config"] if isinstance(best["config"], str) else tuple(best["config"])
        tiles = [r for r in rs if r["method"] == "triton" and not _split(r)]
        print(f"{name:22s} {B:3d} {cub['weight_bytes'] / 1e6:6.1f} {cub['ms'] * 1e3:9.1f} "
              f"{_us(rs[1:2])} {_us(tiles)} {_us([r for r in rs if _split(r)])} "
              f"{_us([r for r in rs if r['method'] == 'composite'])} {best['ms'] * 1e3:9.1f} "
              f"{best['gbps']:6.0f} {100 * best['gbps'] / bw:5.0f}% "
              f"{cub['ms'] / best['ms']:8.2f}x  {plan}")       # rs[1]: the default plan
    bad = [r for r in rows if r.get("error")]
    if bad:
        print(f"{len(bad)} candidate(s) failed, e.g. {bad[0]['shape']} B={bad[0]['B']} "
              f"{bad[0]['config']}: {bad[0]['error']}")
    print("\n# (kind, N, K, bucket): (block_b, block_n, block_k, num_warps, num_stages, splits) "
          "or 'composite'; paste into custom_ops/fused_linear_config.py GEMV_CONFIGS")
    print("GEMV_CONFIGS = {")
    for k, v in sorted(winners(rows).items()):
        print(f"    {k!r}: {v!r},")
    print("}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gemv_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about half the candidate plans")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 16)")
    p.add_argument("--shapes", nargs="+", choices=list(_SHAPES), help="default: all")
    p.add_argument("--jobs", type=int, default=8, help="compile workers (0: none)")
    p.add_argument("--eager-counters", action="store_true",
                   help="time split-K with the persistent counters of eager calls (default: a "
                        "zeroed buffer per call, as under torch.compile)")
    p.add_argument("--out", type=Path, default=Path("results/gemv_sweep.json"))
    args = p.parse_args(argv)
    if cuda_missing("benchmarks.gemv_sweep", "the Triton GEMV kernels and CUDA graphs"):
        return 2
    kw: dict = dict(out=args.out, quick=args.quick, jobs=args.jobs,
                    compiled_counters=not args.eager_counters)
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
