"""Time per output token of the compiled decode step: transformers' forward vs the fast forward,
dense head vs FlashHead, at the cache capacities and fills a reasoning trace needs.

    python -m benchmarks.tpot [--arch r1-1.5b | --model PATH] [--batch 1 16]
        [--cache-len 16384 256] [--position 128 8192] [--variants hf-dense fast-body ...]
        [--other-cache-variants fast-body]
        [--mode reduce-overhead] [--out results/tpot.json] [--quick]

Variants are `<forward>-<head>`:  forward "hf" = transformers' forward and attention (what users
run today with torch.compile), "hfa" = transformers' forward with flashhead::decode_attention
through its attention interface, "fast" = the fast forward (fh_compile.fast_decoder); head
"dense", "fh" (FlashHead, Triton op) or "body" (no head: the step's floor without a head).

Every variant is the product's decode step (fh_compile.compile_model, greedy step function).  The
variants of one (forward, B, capacity) share one decode step and one compiled body graph; each head
adds its own small graph.  Before timing, a prompt of `--position` tokens fills the cache; then
`--new-tokens` steps are timed with CUDA events, in `--rounds` rounds interleaved over all
variants (clock drift hits all alike).  Several positions reuse the compiled steps: each is
timed (and profiled) at every capacity that holds it.  Per row: median ms per token, kernels per
step (profiled), the byte floor (benchmarks.step_cost), achieved GB/s against it, and the
fraction of the copy bandwidth measured in the same run.  Ratios are taken within the run only.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks import cuda_missing, write_results
from benchmarks.random_models import ARCHS, random_model
from benchmarks.head_latency import copy_bandwidth_gbps
from benchmarks.step_cost import profile_step, step_bytes

# fastu: the fast forward with rotary + cache write as their own op (the fused op's A/B baseline)
FORWARDS = {"hf": dict(forward="hf", attention="hf"), "hfa": dict(forward="hf"),
            "fast": dict(forward="fast"),
            "fastu": dict(forward="fast", decode_kernels="ops-unfused")}
HEADS = ("body", "dense", "fh")
VARIANTS = tuple(f"{f}-{h}" for f in FORWARDS for h in HEADS)
BASELINE = "hf-dense"


@dataclass(frozen=True)
class TpotConfig:
    arch: str = "r1-1.5b"
    model: str | None = None          # a checkpoint instead of a random architecture
    batches: tuple[int, ...] = (1, 16)
    cache_lens: tuple[int, ...] = (16384, 256)
    positions: tuple[int, ...] = (128,)   # slots filled before timing (each one a row)
    variants: tuple[str, ...] = ("hf-dense", "hf-fh", "fast-body", "fast-dense", "fast-fh")
    other_cache_variants: tuple[str, ...] = ("fast-body",)   # at the capacities after the first
    mode: str = "reduce-overhead"
    compare_mode: str | None = None   # also time fast-fh / fast-dense at the first B and L in it
    new_tokens: int = 32
    rounds: int = 3
    warmup: int = 4
    probes: int = 256
    k: int = 64
    build_iters: int = 2
    budget_s: float = 420.0           # no new group is compiled after this many seconds
    out: Path = field(default_factory=lambda: Path("results/tpot.json"))

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batches}")
        if unknown := set(self.variants + self.other_cache_variants) - set(VARIANTS):
            raise ValueError(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown --arch {self.arch!r}; choose from {ARCHS}")
        if not self.positions or min(self.positions) < 1:
            raise ValueError(f"positions must be >= 1, got {self.positions}")
        if unheld := [P for P in self.positions if not self.capacities_holding(P)]:
            raise ValueError(f"no cache length in {self.cache_lens} can hold --position "
                             f"{unheld} plus the timed steps; raise --cache-len or lower "
                             f"--position")

    def capacities_holding(self, position: int) -> list[int]:
        """The cache lengths with room for `position` slots plus the warm-up and timed steps."""
        need = position + self.warmup + 2 + self.new_tokens + 8
        return [L for L in self.cache_lens if L >= need]


@dataclass
class Variant:
    """One decode step function, kept alive so timing rounds can interleave."""

    name: str
    B: int
    cache_len: int
    mode: str | None
    step: object
    call: Callable[[], object]
    path: str
    forward: str
    attention: str
    first_call_s: float
    ran_mode: str | None = None      # the mode compile_model used, when it had to change it
    mode_note: str | None = None     # and why
    ms: dict[int, list[float]] = field(default_factory=dict)       # position -> ms per step
    profile: dict[int, dict] = field(default_factory=dict)        # position -> profile_step


def model_view(model: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy sharing every submodule and weight but with its own module slots, so a
    group can swap heads without touching the model or another group."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.__dict__.pop("fh_compiled", None)
    return view


def group(model: torch.nn.Module, assets, forward: str, heads: list[str], B: int,
          cache_len: int, cfg: TpotConfig, mode: str | None) -> list[Variant]:
    """The variants `forward`-`head` for heads in order, sharing one decode step."""
    from fh_compile import compile_model, restore_dense_head, swap_head
    from fh_compile.decode import head_path
    from fh_compile.head import FlashHeadLMHead
    from fh_compile.sampling import SamplingConfig

    view = model_view(model)
    compile_model(view, None, k=cfg.k, mode=mode, flashhead=False, max_batch_size=B,
                  max_cache_len=cache_len, **FORWARDS[forward])
    dec = view.fh_compiled
    dev = dec.step.device
    tok = torch.randint(0, min(1000, model.config.vocab_size), (B,), device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = []
    for head in heads:
        if isinstance(view.get_output_embeddings(), FlashHeadLMHead):
            restore_dense_head(view)
        if head == "body":
            body = dec.body_fn()
            fn = lambda: body(tok)  # noqa: E731
        else:
            if head == "fh":
                swap_head(view, assets, probes=cfg.probes, k=cfg.k)
            step_fn = dec.step_fn(SamplingConfig(), (), 0)
            fn = lambda f=step_fn: f(tok, done)  # noqa: E731

        def call(fn: Callable[[], object] = fn) -> None:
            torch.compiler.cudagraph_mark_step_begin()
            fn()

        with torch.no_grad():
            prefill(dec.step, B, min(cfg.positions))
            t0 = time.perf_counter()
            call()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            for _ in range(cfg.warmup):
                call()
        path = "none" if head == "body" else head_path(view.get_output_embeddings(), B)
        out.append(Variant(f"{forward}-{head}", B, cache_len, mode, dec.step, call, path,
                           dec.info.forward, dec.info.attention, round(first, 2),
                           *((dec.info.mode, dec.info.fallback) if dec.info.mode != mode
                             else ())))
    return out


def prefill(step, B: int, position: int) -> None:
    dev = step.device
    g = torch.Generator(device=dev).manual_seed(B)
    hi = min(1000, step.model.config.vocab_size)
    step.prefill_hidden(torch.randint(0, hi, (B, position), device=dev, generator=g))


@torch.no_grad()
def time_round(v: Variant, cfg: TpotConfig, position: int) -> None:
    """Refill the cache with a prompt of `position` tokens, then time `new_tokens` calls with
    CUDA events."""
    prefill(v.step, v.B, position)
    for _ in range(2):
        v.call()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(cfg.new_tokens + 1)]
    events[0].record()
    for i in range(cfg.new_tokens):
        v.call()
        events[i + 1].record()
    torch.cuda.synchronize()
    v.ms.setdefault(position, []).extend(a.elapsed_time(b) for a, b in zip(events, events[1:]))


def row_of(v: Variant, position: int, model: torch.nn.Module, assets, cfg: TpotConfig,
           copy_gbs: float) -> dict:
    ms, profile = v.ms[position], v.profile[position]
    med = statistics.median(ms)
    filled = position + 2 + cfg.new_tokens // 2                # the middle of the timed steps
    floor = step_bytes(model, v.step, assets, v.name.split("-", 1)[1], v.B, cfg.probes, filled)
    name = v.name if v.mode == cfg.mode else f"{v.name}@{v.mode}"
    changed = {} if v.ran_mode is None else dict(asked_mode=v.mode, mode_note=v.mode_note)
    return dict(variant=name, forward=v.forward, attention=v.attention, B=v.B,
                cache_len=v.cache_len, position=position, path=v.path,
                mode=v.ran_mode or v.mode, **changed,
                tpot_ms=med, tpot_ms_mean=statistics.fmean(ms), steps=len(ms),
                tok_per_s=v.B * 1e3 / med, floor_bytes=floor, floor_ms=floor / copy_gbs / 1e6,
                gb_per_s=floor / med / 1e6, bw_fraction=floor / med / 1e6 / copy_gbs,
                kernels_per_step=profile.get("kernels_per_step"), profile=profile,
                first_call_s=v.first_call_s, raw_ms=[round(x, 4) for x in ms])


def plan(cfg: TpotConfig) -> list[tuple[str, list[str], int, int, str | None]]:
    """(forward, heads, B, cache_len, mode) groups, most important first: every B at the first
    capacity, then the others, then the fast step in --compare-mode at the first B and L."""
    out = []
    for L in cfg.cache_lens:
        variants = cfg.variants if L == cfg.cache_lens[0] else cfg.other_cache_variants
        for B in cfg.batches:
            for fwd in FORWARDS:
                heads = [h for h in HEADS if f"{fwd}-{h}" in variants]
                if heads:
                    out.append((fwd, heads, B, L, cfg.mode))
    if cfg.compare_mode:
        out.append(("fast", ["dense", "fh"], cfg.batches[0], cfg.cache_lens[0], cfg.compare_mode))
    return out


@torch.no_grad()
def run(cfg: TpotConfig) -> tuple[dict, list[dict]]:
    import transformers
    import triton
    from torch._dynamo.utils import counters

    from fh_compile.compile import cached_assets

    t_start = time.perf_counter()
    if cfg.model:
        from fh_compile.loading import load_model
        model = load_model(cfg.model)[0].cuda().eval()
        name = cfg.model
    else:
        model, name = random_model(cfg.arch), f"random {cfg.arch} architecture"
    assets = None
    if any(v.endswith("-fh") for v in cfg.variants):
        t0 = time.perf_counter()
        assets, folder, built = cached_assets(
            model.get_output_embeddings().weight, 16,
            build_kwargs=dict(coarse_iters=cfg.build_iters, fine_iters=cfg.build_iters))
        print(f"assets {'built' if built else 'loaded'} in {time.perf_counter() - t0:.1f} s "
              f"({folder})", flush=True)
    copy_gbs = copy_bandwidth_gbps()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, transformers=transformers.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), model=name,
                dtype=str(next(model.parameters()).dtype), copy_gb_per_s=round(copy_gbs, 1),
                config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()})
    print(f"{meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}, transformers "
          f"{meta['transformers']}; {name}; copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    counters.clear()
    ready: list[Variant] = []
    skipped: list[dict] = []
    for fwd, heads, B, L, mode in plan(cfg):
        spent = time.perf_counter() - t_start
        if spent > cfg.budget_s:
            print(f"skip {fwd} B={B} L={L}: {spent:.0f} s spent (--budget-s)", flush=True)
            skipped += [dict(variant=f"{fwd}-{h}", B=B, cache_len=L, skipped=True) for h in heads]
            continue
        try:
            vs = group(model, assets, fwd, heads, B, L, cfg, mode)
        except Exception as e:  # noqa: BLE001  (a failed group is reported, the rest still run)
            print(f"FAILED {fwd} B={B} L={L}: {type(e).__name__}: {e}", flush=True)
            skipped += [dict(variant=f"{fwd}-{h}", B=B, cache_len=L, error=f"{type(e).__name__}: "
                             f"{str(e)[:300]}") for h in heads]
            continue
        for v in vs:
            print(f"compiled {v.name:<11} B={B:<3} L={L:<6} ({v.forward}, {v.attention}, "
                  f"{v.ran_mode or mode}) first call {v.first_call_s:.1f} s", flush=True)
        ready += vs
    timed = [(v, P) for P in cfg.positions for v in ready
             if v.cache_len in cfg.capacities_holding(P)]
    for _ in range(cfg.rounds):
        for v, P in timed:
            time_round(v, cfg, P)
    for v, P in timed:   # after a prefill the first replays may re-record: profile warm replays
        prefill(v.step, v.B, P)
        for _ in range(3):
            v.call()
        v.profile[P] = profile_step(v.call)
    rows = [row_of(v, P, model, assets, cfg, copy_gbs) for v, P in timed] + skipped
    meta["graph_breaks"] = sum(counters["graph_break"].values())
    meta["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    meta["run_s"] = round(time.perf_counter() - t_start, 1)
    return meta, rows


def print_table(rows: list[dict]) -> None:
    base = {(r["B"], r["cache_len"], r["position"]): r["tpot_ms"] for r in rows
            if r.get("variant") == BASELINE and "tpot_ms" in r}
    head = (f"{'variant':<11}{'B':>4}{'L':>7}{'pos':>6} {'path':<10}{'ms/tok':>8}{'kern':>6}"
            f"{'floor ms':>9}{'GB/s':>7}{'%bw':>5}{'x ' + BASELINE:>12}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if "tpot_ms" not in r:
            why = r.get("error", "skipped (budget)")
            print(f"{r['variant']:<11}{r['B']:>4}{r['cache_len']:>7}  {why[:70]}")
            continue
        b = base.get((r["B"], r["cache_len"], r["position"]))
        x = f"{b / r['tpot_ms']:.2f}" if b else "-"
        kern = r["kernels_per_step"]
        print(f"{r['variant']:<11}{r['B']:>4}{r['cache_len']:>7}{r['position']:>6} {r['path']:<10}"
              f"{r['tpot_ms']:>8.3f}{kern if kern is None else round(kern):>6}"
              f"{r['floor_ms']:>9.3f}{r['gb_per_s']:>7.0f}{100 * r['bw_fraction']:>5.0f}{x:>12}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tpot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="r1-1.5b", choices=ARCHS,
                   help="random-weight architecture (default r1-1.5b)")
    p.add_argument("--model", help="HF folder / hub id / .gguf instead of --arch")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--cache-len", type=int, nargs="+", default=[16384, 256],
                   help="static cache capacities (slots)")
    p.add_argument("--position", type=int, nargs="+", default=[128],
                   help="slots filled before timing (several: one row each, same compiled steps)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   default=list(TpotConfig.variants))
    p.add_argument("--other-cache-variants", nargs="*", choices=VARIANTS, default=["fast-body"],
                   help="variants timed at the capacities after the first --cache-len")
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode")
    p.add_argument("--compare-mode", help="also time the fast step (dense, fh) in this mode at "
                                          "the first --batch and --cache-len")
    p.add_argument("--new-tokens", type=int, default=32, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--probes", type=int, default=256)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="compile no new group after this many seconds")
    p.add_argument("--out", type=Path, default=Path("results/tpot.json"))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: first --batch and --cache-len only, 8 tokens, 1 round")
    a = p.parse_args(argv)
    if cuda_missing("benchmarks.tpot", "time per output token is measured with CUDA events "
                    "and CUDA graphs"):
        return 2
    kw = dict(arch=a.arch, model=a.model, batches=tuple(a.batch), cache_lens=tuple(a.cache_len),
              positions=tuple(a.position), variants=tuple(a.variants), mode=a.mode,
              compare_mode=a.compare_mode, other_cache_variants=tuple(a.other_cache_variants),
              new_tokens=a.new_tokens, rounds=a.rounds, probes=a.probes, budget_s=a.budget_s,
              out=a.out)
    if a.quick:
        kw.update(batches=kw["batches"][:1], cache_lens=kw["cache_lens"][:1], new_tokens=8,
                  rounds=1)
    cfg = TpotConfig(**kw)
    meta, rows = run(cfg)
    write_results(cfg.out, "benchmarks.tpot", argv, meta, rows)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
