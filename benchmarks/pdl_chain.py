"""What programmatic dependent launch (PDL) would save in the decode step: the body's kernels,
layer after layer, in one CUDA graph, launched plainly and with PDL.

    python -m benchmarks.pdl_chain [--arch r1-1.5b gemma3-270m] [--batch 1 16]
        [--cache-len 16384] [--fill 128] [--replays 20] [--rounds 5]
        [--out results/pdl_chain.json]

Per layer the fast forward runs five kernels, each reading its predecessor's output: RMSNorm +
QKV (custom_ops.fused_linear, the plans of fused_linear_config), rotary + cache write +
attention over `--fill` slots (custom_ops.rope_attention's kernel), the output projection,
RMSNorm + gate/up and act-mul + down.  Without the embedding, the final norm and the head, that
is the body of the compiled step, launched the same way (CUDA graph, no Inductor).  A step of
B = 1 is a chain of short, latency-bound kernels; in a CUDA graph each still waits for its
predecessor to finish before it launches.  With PDL (sm_90+) every kernel
lets the next one launch at once and waits, inside, for its predecessor's writes
(`_fused_gemv_kernel`'s PDL), so launches overlap the predecessor's tail.  Inductor launches
user Triton kernels without the launch attribute (torch 2.11 to 2.13), so the compiled step
cannot use this yet; this script measures the gain that would be on the table.

Per (arch, B, launch): median microseconds per chain (CUDA events around `--replays` graph
replays, `--rounds` rounds interleaved), per kernel, the floor of the weights and filled K/V
at the copy bandwidth measured in the same run, and whether the PDL graph's outputs equal the
plain graph's bit for bit (the same kernels in the same order: they must).
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
    cache_len: int = 16384
    fill: int = 128                   # slots filled before the timed steps
    replays: int = 20                 # graph replays per timed round
    rounds: int = 5
    out: Path = field(default_factory=lambda: Path("results/pdl_chain.json"))

    def __post_init__(self) -> None:
        if unknown := set(self.archs) - set(ARCHS):
            raise ValueError(f"unknown --arch {sorted(unknown)}; choose from {ARCHS}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batches}")
        if not 1 <= self.fill < self.cache_len:
            raise ValueError(f"need 1 <= --fill < --cache-len, got {self.fill}, "
                             f"{self.cache_len}")
        if self.replays < 1 or self.rounds < 1:
            raise ValueError(f"--replays and --rounds must be >= 1, got {self.replays}, "
                             f"{self.rounds}")


@dataclass
class Chain:
    """Every layer's weights, KV cache and inputs, and the body's kernel chain as one function."""

    arch: str
    B: int
    run: Callable[[bool], tuple[torch.Tensor, torch.Tensor]]   # pdl -> (h [B, D], res [B, D])
    kernels: int
    floor_bytes: int        # weights + the filled K/V, read once
    composite: int          # GEMVs per layer whose plan is the composite (cuBLAS): never PDL


def build_chain(arch: str, B: int, device: str = "cuda", layers: int | None = None,
                cache_len: int = 16384, fill: int = 128) -> Chain:
    """Random bf16 weights and caches of `arch`'s shapes (`layers`: cut short), the caches
    filled to `fill` slots.  Per layer, the fast forward's five kernels: RMSNorm + QKV, rotary +
    cache write + attention (flashhead::rope_decode_attention's kernel), the output projection,
    RMSNorm + gate/up, act-mul + down.  Gemma's layers add its q/k norms, branch norms
    (post-norms), (1 + w) norms, sliding windows and GELU-tanh, as the fast forward runs them."""
    from custom_ops.fused_linear_triton import (ACT_PROLOGUES, COMPOSITE, RMS_NORM, fused_gemv,
                                                pick_config)
    from custom_ops.rope_attention_triton import triton_rope_decode_attention

    cfg = arch_config(arch, layers)
    gemma = cfg.model_type.startswith("gemma")
    D, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    Dh = getattr(cfg, "head_dim", None) or D // cfg.num_attention_heads
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    Nq, Nkv = Hq * Dh, Hkv * Dh
    act_kind = "gelu_tanh_mul" if gemma else "silu_mul"
    offset = 1.0 if gemma else 0.0
    windows = [cfg.sliding_window if kind == "sliding_attention" else 0
               for kind in (getattr(cfg, "layer_types", None) or ["full_attention"] * L)]
    scale = float(getattr(cfg, "query_pre_attn_scalar", None) or Dh) ** -0.5
    g = torch.Generator(device=device).manual_seed(B)

    def rnd(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(torch.bfloat16)

    weights = [dict(wqkv=rnd(Nq + 2 * Nkv, D), wo=rnd(D, Nq), wgu=rnd(2 * I, D), wd=rnd(D, I),
                    ln1=rnd(D, scale=0.1), ln2=rnd(D, scale=0.1),
                    post_attn=rnd(D, scale=0.1) if gemma else None,
                    post_ff=rnd(D, scale=0.1) if gemma else None,
                    q_norm=rnd(Dh, scale=0.1) if gemma else None,
                    k_norm=rnd(Dh, scale=0.1) if gemma else None) for _ in range(L)]
    caches = [(rnd(B, Hkv, cache_len, Dh, scale=1.0), rnd(B, Hkv, cache_len, Dh, scale=1.0))
              for _ in range(L)]                                        # [B, Hkv, L, Dh] each
    h0 = rnd(B, D, scale=1.0)                                           # [B, D]
    starts = torch.zeros(B, dtype=torch.int64, device=device)          # [B]
    fill_t = torch.full((1,), fill, dtype=torch.int64, device=device)  # [1]
    inv_freq = 10000.0 ** (-torch.arange(0, Dh, 2, device=device, dtype=torch.float32) / Dh)
    eps = float(cfg.rms_norm_eps)

    def run(pdl: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h, res, prev_post = h0, None, None
        for w, (kc, vc), window in zip(weights, caches, windows):
            qkv, res = fused_gemv(h, w["wqkv"], RMS_NORM, residual=res, branch_norm=prev_post,
                                  norm=w["ln1"], eps=eps, norm_offset=offset, pdl=pdl)
            attn = triton_rope_decode_attention(
                qkv, kc, vc, starts, fill_t, inv_freq, 1.0, Hq, w["q_norm"], w["k_norm"], eps,
                offset, scale, window, pdl=pdl)                         # [B, Hq, 1, Dh]
            o, _ = fused_gemv(attn.view(B, Nq), w["wo"], ACT_PROLOGUES["none"], pdl=pdl)
            gu, res = fused_gemv(o, w["wgu"], RMS_NORM, residual=res, branch_norm=w["post_attn"],
                                 norm=w["ln2"], eps=eps, norm_offset=offset, pdl=pdl)
            h, _ = fused_gemv(gu, w["wd"], ACT_PROLOGUES[act_kind], pdl=pdl)
            prev_post = w["post_ff"]
        assert res is not None
        return h, res

    nbytes = sum(t.numel() * t.element_size() for w in weights for t in w.values()
                 if t is not None)
    kv_bytes = sum(2 * B * Hkv * min(fill, window or fill) * Dh * 2 for window in windows)
    plans = [pick_config("rms_norm", Nq + 2 * Nkv, D, B, torch.bfloat16),
             pick_config("none", D, Nq, B, torch.bfloat16),
             pick_config("rms_norm", 2 * I, D, B, torch.bfloat16),
             pick_config(act_kind, D, I, B, torch.bfloat16)]
    return Chain(arch, B, run, 5 * L, nbytes + kv_bytes, sum(p == COMPOSITE for p in plans))


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
            chain = build_chain(arch, B, cache_len=cfg.cache_len, fill=cfg.fill)
            graphs = {launch: capture(chain, launch == "pdl") for launch in LAUNCHES}
            us: dict[str, list[float]] = {launch: [] for launch in LAUNCHES}
            for _ in range(cfg.rounds):
                for launch, (graph, _) in graphs.items():
                    us[launch].append(time_graph(graph, cfg.replays))
            same = all(torch.equal(a, b) for a, b in zip(graphs["plain"][1], graphs["pdl"][1]))
            floor_us = chain.floor_bytes / copy_gbs / 1e3
            for launch in LAUNCHES:
                med = statistics.median(us[launch])
                rows.append(dict(arch=arch, B=B, cache_len=cfg.cache_len, fill=cfg.fill,
                                 launch=launch, us_per_chain=med,
                                 kernels=chain.kernels, us_per_kernel=med / chain.kernels,
                                 floor_mb=chain.floor_bytes / 1e6, floor_us=floor_us,
                                 gb_per_s=chain.floor_bytes / med / 1e3,
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
    p.add_argument("--cache-len", type=int, default=PdlChainConfig.cache_len)
    p.add_argument("--fill", type=int, default=PdlChainConfig.fill,
                   help="filled cache slots the attention reads")
    p.add_argument("--replays", type=int, default=PdlChainConfig.replays)
    p.add_argument("--rounds", type=int, default=PdlChainConfig.rounds)
    p.add_argument("--out", type=Path, default=Path("results/pdl_chain.json"))
    a = p.parse_args(argv)
    cfg = PdlChainConfig(archs=tuple(a.arch), batches=tuple(a.batch), cache_len=a.cache_len,
                         fill=a.fill, replays=a.replays, rounds=a.rounds, out=a.out)
    if cuda_missing("benchmarks.pdl_chain", "it times CUDA graphs of Triton kernels"):
        return 2
    meta, rows = run(cfg)
    write_results(cfg.out, "benchmarks.pdl_chain", argv, meta, rows)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
