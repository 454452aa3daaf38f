"""What programmatic dependent launch (PDL) would save in the decode step: the step's fused
linears alone, layer after layer, in one CUDA graph, launched plainly and with PDL.

    python -m benchmarks.pdl_chain [--arch r1-1.5b gemma3-270m] [--batch 1 16]
        [--replays 20] [--rounds 5] [--out results/pdl_chain.json]

Per layer the fast forward runs four GEMVs (custom_ops.fused_linear, the plans of
fused_linear_config): RMSNorm + QKV, the output projection, RMSNorm + gate/up, act-mul + down;
each reads the previous one's output (the output projection reads a fixed stand-in for the
attention's).  A step of B = 1 is a chain of short, latency-bound kernels; in a CUDA graph each
still waits for its predecessor to finish before it launches.  With PDL (sm_90+) every kernel
lets the next one launch at once and waits, inside, for its predecessor's writes
(`_fused_gemv_kernel`'s PDL), so launches overlap the predecessor's tail.  Inductor launches
user Triton kernels without the launch attribute (torch 2.11 to 2.13), so the compiled step
cannot use this yet; this script measures the gain that would be on the table.

Per (arch, B, launch): median microseconds per chain (CUDA events around `--replays` graph
replays, `--rounds` rounds interleaved), per kernel, the weight bytes' floor at the copy
bandwidth measured in the same run, and whether the PDL graph's outputs equal the plain
graph's bit for bit (the same kernels in the same order: they must).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks import cuda_missing, write_results
from benchmarks.random_models import ARCHS, arch_config

LAUNCHES = ("plain", "pdl")


@dataclass(frozen=True)
class PdlChainConfig:
    archs: tuple[str, ...] = ("r1-1.5b", "gemma3-270m")
    batches: tuple[int, ...] = (1, 16)
    replays: int = 20                 # graph replays per timed round
    rounds: int = 5
    out: Path = field(default_factory=lambda: Path("results/pdl_chain.json"))

    def __post_init__(self) -> None:
        if unknown := set(self.archs) - set(ARCHS):
            raise ValueError(f"unknown --arch {sorted(unknown)}; choose from {ARCHS}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batches}")
        if self.replays < 1 or self.rounds < 1:
            raise ValueError(f"--replays and --rounds must be >= 1, got {self.replays}, "
                             f"{self.rounds}")


@dataclass
class Chain:
    """The weights and inputs of every layer's four GEMVs, and the chain as one function."""

    arch: str
    B: int
    run: Callable[[bool], tuple[torch.Tensor, torch.Tensor]]   # pdl -> (h [B, D], res [B, D])
    kernels: int
    weight_bytes: int
    composite: int          # GEMVs per layer whose plan is the composite (cuBLAS): never PDL


def build_chain(arch: str, B: int, device: str = "cuda", layers: int | None = None) -> Chain:
    """Random bf16 weights of `arch`'s shapes (`layers`: cut short); Gemma's layers add its
    branch norms (post-norms), (1 + w) norms and GELU-tanh, as the fast forward runs them."""
    from custom_ops.fused_linear_triton import (ACT_PROLOGUES, COMPOSITE, RMS_NORM, fused_gemv,
                                                pick_config)

    cfg = arch_config(arch, layers)
    gemma = cfg.model_type.startswith("gemma")
    D, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    Dh = getattr(cfg, "head_dim", None) or D // cfg.num_attention_heads
    Nq, Nkv = cfg.num_attention_heads * Dh, cfg.num_key_value_heads * Dh
    act = ACT_PROLOGUES["gelu_tanh_mul" if gemma else "silu_mul"]
    offset = 1.0 if gemma else 0.0
    g = torch.Generator(device=device).manual_seed(B)

    def rnd(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(torch.bfloat16)

    weights = [dict(wqkv=rnd(Nq + 2 * Nkv, D), wo=rnd(D, Nq), wgu=rnd(2 * I, D), wd=rnd(D, I),
                   ln1=rnd(D, scale=0.1), ln2=rnd(D, scale=0.1),
                   post_attn=rnd(D, scale=0.1) if gemma else None,
                   post_ff=rnd(D, scale=0.1) if gemma else None) for _ in range(L)]
    h0, attn = rnd(B, D, scale=1.0), rnd(B, Nq, scale=1.0)             # [B, D], [B, Hq * Dh]
    eps = float(cfg.rms_norm_eps)

    def run(pdl: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h, res, prev_post = h0, None, None
        for w in weights:
            _, res = fused_gemv(h, w["wqkv"], RMS_NORM, residual=res, branch_norm=prev_post,
                                norm=w["ln1"], eps=eps, norm_offset=offset, pdl=pdl)
            o, _ = fused_gemv(attn, w["wo"], ACT_PROLOGUES["none"], pdl=pdl)
            gu, res = fused_gemv(o, w["wgu"], RMS_NORM, residual=res, branch_norm=w["post_attn"],
                                 norm=w["ln2"], eps=eps, norm_offset=offset, pdl=pdl)
            h, _ = fused_gemv(gu, w["wd"], act, pdl=pdl)
            prev_post = w["post_ff"]
        assert res is not None
        return h, res

    nbytes = sum(t.numel() * t.element_size() for w in weights for t in w.values()
                 if t is not None)
    act_kind = "gelu_tanh_mul" if gemma else "silu_mul"
    plans = [pick_config("rms_norm", Nq + 2 * Nkv, D, B, torch.bfloat16),
             pick_config("none", D, Nq, B, torch.bfloat16),
             pick_config("rms_norm", 2 * I, D, B, torch.bfloat16),
             pick_config(act_kind, D, I, B, torch.bfloat16)]
    return Chain(arch, B, run, 4 * L, nbytes, sum(p == COMPOSITE for p in plans))


def capture(chain: Chain, pdl: bool) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
    """A CUDA graph of the chain (after two eager warm-up runs: compiles, the counter pool)."""
    for _ in range(2):
        chain.run(pdl)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain.run(pdl)
    return graph, outs


def time_graph(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Microseconds per replay over `replays` back-to-back replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


@torch.no_grad()
def run(cfg: PdlChainConfig) -> tuple[dict, list[dict]]:
    import triton

    from benchmarks.head_latency import copy_bandwidth_gbps

    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        raise SystemExit(f"PDL needs compute capability 9.0 or newer; this GPU has "
                         f"{major}.{minor}")
    copy_gbs = copy_bandwidth_gbps()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, copy_gb_per_s=round(copy_gbs, 1),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()})
    print(f"{meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}; copy bandwidth "
          f"{copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for arch in cfg.archs:
        for B in cfg.batches:
            chain = build_chain(arch, B)
            graphs = {launch: capture(chain, launch == "pdl") for launch in LAUNCHES}
            us: dict[str, list[float]] = {launch: [] for launch in LAUNCHES}
            for _ in range(cfg.rounds):
                for launch, (graph, _) in graphs.items():
                    us[launch].append(time_graph(graph, cfg.replays))
            same = all(torch.equal(a, b) for a, b in zip(graphs["plain"][1], graphs["pdl"][1]))
            floor_us = chain.weight_bytes / copy_gbs / 1e3
            for launch in LAUNCHES:
                med = statistics.median(us[launch])
                rows.append(dict(arch=arch, B=B, launch=launch, us_per_chain=med,
                                 kernels=chain.kernels, us_per_kernel=med / chain.kernels,
                                 weight_mb=chain.weight_bytes / 1e6, floor_us=floor_us,
                                 gb_per_s=chain.weight_bytes / med / 1e3,
                                 bw_fraction=floor_us / med, same_output=same,
                                 composite_per_layer=chain.composite,
                                 raw_us=[round(x, 2) for x in us[launch]]))
            print(f"{arch} B={B}: plain {statistics.median(us['plain']):.1f} us, pdl "
                  f"{statistics.median(us['pdl']):.1f} us, outputs equal: {same}", flush=True)
            del graphs, chain
            torch.cuda.empty_cache()
    return meta, rows


def print_table(rows: list[dict]) -> None:
    plain = {(r["arch"], r["B"]): r["us_per_chain"] for r in rows if r["launch"] == "plain"}
    head = (f"{'arch':<13}{'B':>4} {'launch':<7}{'us/chain':>10}{'kern':>6}{'us/kern':>9}"
            f"{'floor us':>10}{'GB/s':>7}{'%bw':>5}{'x plain':>9}  same")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        x = plain[(r["arch"], r["B"])] / r["us_per_chain"]
        print(f"{r['arch']:<13}{r['B']:>4} {r['launch']:<7}{r['us_per_chain']:>10.1f}"
              f"{r['kernels']:>6}{r['us_per_kernel']:>9.2f}{r['floor_us']:>10.1f}"
              f"{r['gb_per_s']:>7.0f}{100 * r['bw_fraction']:>5.0f}{x:>9.3f}  {r['same_output']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pdl_chain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=list(PdlChainConfig.archs), choices=ARCHS)
    p.add_argument("--batch", type=int, nargs="+", default=list(PdlChainConfig.batches))
    p.add_argument("--replays", type=int, default=PdlChainConfig.replays)
    p.add_argument("--rounds", type=int, default=PdlChainConfig.rounds)
    p.add_argument("--out", type=Path, default=Path("results/pdl_chain.json"))
    a = p.parse_args(argv)
    cfg = PdlChainConfig(archs=tuple(a.arch), batches=tuple(a.batch), replays=a.replays,
                         rounds=a.rounds, out=a.out)
    if cuda_missing("benchmarks.pdl_chain", "it times CUDA graphs of Triton kernels"):
        return 2
    meta, rows = run(cfg)
    write_results(cfg.out, "benchmarks.pdl_chain", argv, meta, rows)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
