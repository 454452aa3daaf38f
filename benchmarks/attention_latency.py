"""Decode attention of one layer: flashhead::decode_attention vs SDPA over the whole static cache.

    python -m benchmarks.attention_latency [--quick] [--sweep] [--out FILE.json]

Shapes: DeepSeek-R1-Distill-Qwen-1.5B (Hq/Hkv 12/2, Dh 128) and Gemma-3-270M (4/1, Dh 256)
layers, bf16, B in {1, 16}, cache capacity in {4096, 32768}, fill in {128, 8192} (starts 0).
Methods, each one call captured in a CUDA graph and replayed with triton.testing.do_bench
(median; L2 flushed before every replay, as after the rest of a decode step):
  sdpa_hf   repeat_kv + SDPA with a [B, 1, 1, L] boolean mask: what transformers' compiled decode
            step runs per layer (the mask is built once per step and not timed here);
  sdpa_gqa  SDPA with the mask and enable_gqa=True (no K/V copy; torch picks the backend);
  triton    the op, eager (one kernel: its counters persist between calls);
  triton_compiled  the op inside torch.compile (+ the zero fill of its counters: 2 kernels).
Bytes: the filled K/V (2 * B * Hkv * fill * Dh * 2), the floor every method is held to; GB/s =
those bytes / time, floor ms = those bytes at the copy bandwidth measured in the same run.
x sdpa_hf: speedup over sdpa_hf in the same run.  Every method's output is checked against
sdpa_hf first (max abs difference in the table).
--sweep also times launch settings of the op (block_n, min_chunk, splits, and the merge: up to
how many active splits it goes split after split, DecodeBlocks.combine_upto, and the tree's group
size above that, DecodeBlocks.tree_group) at every fill, to tune
custom_ops.decode_attention_triton.decode_blocks; the best per shape and fill is printed.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks import cuda_missing

SHAPES = {"r1-1.5b": (12, 2, 128), "gemma3-270m": (4, 1, 256)}     # Hq, Hkv, Dh
METHODS = ("sdpa_hf", "sdpa_gqa", "triton", "triton_compiled")


@dataclass(frozen=True)
class AttentionLatencyConfig:
    models: tuple[str, ...] = tuple(SHAPES)
    batches: tuple[int, ...] = (1, 16)
    capacities: tuple[int, ...] = (4096, 32768)
    fills: tuple[int, ...] = (128, 8192)
    methods: tuple[str, ...] = ("sdpa_hf", "sdpa_gqa", "triton")
    sweep: bool = False
    warmup_ms: int = 25
    rep_ms: int = 100
    out: Path = field(default_factory=lambda: Path("results/attention_latency.json"))

    def __post_init__(self) -> None:
        if not set(self.models) <= set(SHAPES):
            raise ValueError(f"models are {', '.join(SHAPES)}; got {self.models}")
        if not set(self.methods) <= set(METHODS) or "sdpa_hf" not in self.methods:
            raise ValueError(f"methods are {', '.join(METHODS)} (sdpa_hf required); got "
                             f"{self.methods}")
        if min(self.batches) < 1 or min(self.capacities) < 1 or min(self.fills) < 1:
            raise ValueError("batches, capacities and fills must be >= 1")


def time_graph(fn: Callable[[], torch.Tensor], cfg: AttentionLatencyConfig) -> float:
    """Median ms of one replay of a CUDA graph holding fn()."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                 # compile / autotune outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = triton.testing.do_bench(graph.replay, warmup=cfg.warmup_ms, rep=cfg.rep_ms,
                                 return_mode="median")
    del graph
    return float(ms)


def methods_for(q, k, v, starts, fill, scale: float) -> dict[str, Callable[[], torch.Tensor]]:
    from custom_ops.decode_attention import valid_slots

    B, Hq, _, Dh = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    mask = valid_slots(starts, fill, L)[:, None, None, :]               # [B, 1, 1, L] bool
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa_hf():
        kk = k[:, :, None].expand(B, Hkv, Hq // Hkv, L, Dh).reshape(B, Hq, L, Dh)
        vv = v[:, :, None].expand(B, Hkv, Hq // Hkv, L, Dh).reshape(B, Hq, L, Dh)
        return sdpa(q, kk, vv, attn_mask=mask, scale=scale)

    def op():
        return torch.ops.flashhead.decode_attention(q, k, v, starts, fill, scale)

    return {"sdpa_hf": sdpa_hf,
            "sdpa_gqa": lambda: sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
            "triton": op, "triton_compiled": torch.compile(op, fullgraph=True)}


def run(cfg: AttentionLatencyConfig) -> tuple[dict, list[dict], list[dict]]:
    import triton

    import custom_ops  # noqa: F401  (registers torch.ops.flashhead.decode_attention)
    from benchmarks.head_latency import copy_bandwidth_gbps
    from benchmarks.step_cost import profile_step
    from custom_ops import decode_attention_triton as dat

    bw = copy_bandwidth_gbps()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "copy_bandwidth_gbps": round(bw, 1), "dtype": "bf16"}
    print(f"{meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}, copy bandwidth "
          f"{bw:.0f} GB/s", flush=True)
    rows: list[dict] = []
    sweep_rows: list[dict] = []
    dt = torch.bfloat16
    torch.manual_seed(0)
    for model, B, L in itertools.product(cfg.models, cfg.batches, cfg.capacities):
        Hq, Hkv, Dh = SHAPES[model]
        q = torch.randn(B, Hq, 1, Dh, device="cuda", dtype=dt)
        k = torch.randn(B, Hkv, L, Dh, device="cuda", dtype=dt)
        v = torch.randn(B, Hkv, L, Dh, device="cuda", dtype=dt)
        starts = torch.zeros(B, dtype=torch.int64, device="cuda")
        for F in (f for f in cfg.fills if f <= L):
            fill = torch.tensor(F, device="cuda")
            fns = methods_for(q, k, v, starts, fill, Dh ** -0.5)
            filled = 2 * B * Hkv * F * Dh * 2
            base = dict(gpu=meta["gpu"], model=model, B=B, capacity=L, fill=F, bytes=filled,
                        floor_ms=filled / bw / 1e6)
            ref = fns["sdpa_hf"]().float()
            base_ms = None
            for method in cfg.methods:
                row = dict(base, method=method)
                try:
                    err = float((fns[method]().float() - ref).abs().max())
                    ms = time_graph(fns[method], cfg)
                    prof = profile_step(fns[method], steps=2, top=3)
                    base_ms = ms if method == "sdpa_hf" else base_ms
                    row.update(ms=ms, gbps=filled / ms / 1e6, max_err=err,
                               kernels=prof["kernels_per_step"] + prof["memsets_per_step"],
                               kernel_us=prof["kernel_us_per_step"],
                               x_sdpa_hf=(base_ms / ms) if base_ms else None)
                    if method == "triton":
                        row["blocks"] = dat.decode_blocks(B, Hkv, Hq // Hkv, L, Dh, dt,
                                                          q.device)._asdict()
                except Exception as e:      # one failing method must not lose the others
                    row["error"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                rows.append(row)
                print(_row_line(row), flush=True)
            if cfg.sweep:
                sweep_rows += sweep(q, k, v, starts, fill, ref, base, cfg)
        del q, k, v
        torch.cuda.empty_cache()
    return meta, rows, sweep_rows


def sweep(q, k, v, starts, fill, ref, base: dict, cfg: AttentionLatencyConfig) -> list[dict]:
    """Time launch settings of the op at one shape; each output is checked against ref first."""
    from custom_ops import decode_attention_triton as dat

    B, Hq, _, Dh = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    default = dat.decode_blocks(B, Hkv, Hq // Hkv, L, Dh, q.dtype, q.device)
    out = []
    block_ns = (32, 64) if Dh <= 128 else (16, 32)
    settings = {default}
    for bn, chunk_blocks, split_mul, (combine_upto, tree_group) in itertools.product(
            block_ns, (1, 2, 4, 8), (1, 2), ((0, 8), (16, 4), (16, 8), (16, 16))):
        splits = min(default.splits * split_mul, dat.MAX_SPLITS)
        settings.add(dat.DecodeBlocks(splits, bn, default.block_d, chunk_blocks * bn, 4, 2,
                                      combine_upto, tree_group))
    for blk in sorted(settings):
        row = dict(base, method="triton_sweep", blocks=blk._asdict(), default=blk == default)
        try:
            def fn(blk=blk):
                return dat.triton_decode_attention(q, k, v, starts, fill, Dh ** -0.5, blocks=blk)

            err = float((fn().float() - ref).abs().max())
            if err > 5e-2:
                raise ValueError(f"wrong output: max abs error {err:.3g}")
            ms = time_graph(fn, cfg)
            row.update(ms=ms, gbps=base["bytes"] / ms / 1e6, max_err=err)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        out.append(row)
    return out


def _row_line(r: dict) -> str:
    head = f"{r['model']:<12} {r['B']:>3} {r['capacity']:>6} {r['fill']:>5} {r['method']:<16}"
    if "error" in r:
        return f"{head} ERROR {r['error'][:60]}"
    x = "-" if r.get("x_sdpa_hf") is None else f"{r['x_sdpa_hf']:.2f}"
    return (f"{head} {r['ms'] * 1e3:>9.1f} {x:>8} {r['gbps']:>7.0f} {r['floor_ms'] * 1e3:>8.1f} "
            f"{r['kernels']:>7.1f} {r['max_err']:>8.1e}")


def print_tables(rows: list[dict], sweep_rows: list[dict]) -> None:
    if sweep_rows:
        print("\nlaunch-setting sweep (best 3 per shape and fill; * = decode_blocks' "
              "defaults):")
        keyf = (lambda r: (r["model"], r["B"], r["capacity"], r["fill"]))
        for key in dict.fromkeys(keyf(r) for r in sweep_rows):
            ok = sorted((r for r in sweep_rows if keyf(r) == key and "ms" in r),
                        key=lambda r: r["ms"])
            bad = sum(1 for r in sweep_rows if keyf(r) == key and "error" in r)
            default = [r for r in ok if r["default"]]
            for r in ok[:3] + [r for r in default if r not in ok[:3]]:
                print(f"  {key}  {r['ms'] * 1e3:7.1f} us  {r['gbps']:5.0f} GB/s  {r['blocks']}"
                      f"{' *' if r['default'] else ''}")
            if bad:
                print(f"  {key}  {bad} settings failed (see JSON)")
    head = (f"{'model':<12} {'B':>3} {'cap':>6} {'fill':>5} {'method':<16} {'us':>9} "
            f"{'x sdpa_hf':>8} {'GB/s':>7} {'floor us':>8} {'kernels':>7} {'max err':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(_row_line(r))
    print("GB/s and floor: the filled K/V bytes (what a decode step must read); sdpa_* read the "
          "whole capacity.  kernels: launches per call (memsets included), profiled.")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="capacity 32768 only, short timing")
    p.add_argument("--sweep", action="store_true", help="also sweep the op's launch settings")
    p.add_argument("--models", nargs="+", choices=tuple(SHAPES))
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--capacities", type=int, nargs="+")
    p.add_argument("--fills", type=int, nargs="+")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="sdpa_hf is always run")
    p.add_argument("--out", type=Path, default=Path("results/attention_latency.json"))
    args = p.parse_args(argv)
    if cuda_missing("benchmarks.attention_latency", "the op's Triton kernel and CUDA graphs"):
        return 2
    kw: dict = {"out": args.out, "sweep": args.sweep}
    if args.quick:
        kw.update(capacities=(32768,), rep_ms=50)
    for name in ("models", "batches", "capacities", "fills"):
        if getattr(args, name):
            kw[name] = tuple(getattr(args, name))
    if args.methods:
        kw["methods"] = tuple(dict.fromkeys(["sdpa_hf", *args.methods]))
    try:
        cfg = AttentionLatencyConfig(**kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta, rows, sweep_rows = run(cfg)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    command = " ".join(["python -m benchmarks.attention_latency",
                        *(argv if argv is not None else sys.argv[1:])])
    cfg.out.write_text(json.dumps(dict(meta, command=command, config=config, rows=rows,
                                       sweep=sweep_rows), indent=1))
    print_tables(rows, sweep_rows)
    print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
