"""Time per output token: eager vs compiled decode, dense head vs FlashHead, and the body alone.

    python -m benchmarks.tpot [--model PATH] [--batch 1 16] [--prompt-len 128] [--new-tokens 32]
                              [--out results/tpot.json] [--quick]

Default model: the DeepSeek-R1-Distill-Qwen-1.5B architecture (Qwen2, D=1536, 28 layers, 12/2
heads, V=151936, untied head) with random bf16 weights (speed does not depend on the values);
FlashHead assets are built on the GPU with few k-means iterations and cached on disk.

Every variant is the product's decode step (fh_compile.compile_model, greedy step function) over
a static cache after a `--prompt-len` prompt.  Per (exec, B) the variants share one decode step:
one compiled body graph (autotuned once, then reused) and a small graph per head, so "body" (the
step without any head: the ceiling for a head) is the very graph the heads run after.  The row
fh-triton-fused is the single-graph step (compile_model(fuse=True)) at the first B, to show what
the split costs.  Per-token times are CUDA-event medians over `--new-tokens` steps x 3 rounds,
interleaved over the compiled variants so clock drift hits all alike; ratios are taken within
the run.  Compilation dominates the run time; a group of compiled variants starts only while the
run is under `--budget-s`.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks import cuda_missing

HEADS = ("body", "dense", "fh-triton", "fh-reference")


@dataclass(frozen=True)
class TpotConfig:
    model: str | None = None
    batches: tuple[int, ...] = (1, 16)
    prompt_len: int = 128
    new_tokens: int = 32          # timed decode steps per variant and round
    rounds: int = 3               # timing rounds, interleaved over the compiled variants
    warmup: int = 6               # untimed steps after the first (compiling) call
    eager_tokens: int = 16        # timed steps for eager variants (slow, and stable)
    probes: int = 256
    k: int = 64
    mode: str = "max-autotune"
    heads: tuple[str, ...] = HEADS
    budget_s: float = 330.0       # compiled variants start only while the run is under this
    build_iters: int = 2
    fused_check: bool = True      # also time FlashHead as one fused graph at the first B
    out: Path = field(default_factory=lambda: Path("results/tpot.json"))

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batches}")
        if self.prompt_len < 1 or self.new_tokens < 1 or self.eager_tokens < 1:
            raise ValueError("prompt_len, new_tokens and eager_tokens must be >= 1")
        if unknown := set(self.heads) - set(HEADS):
            raise ValueError(f"unknown heads {sorted(unknown)}; choose from {HEADS}")


def r1_distill_qwen_1p5b(dtype: torch.dtype = torch.bfloat16, layers: int = 28) -> torch.nn.Module:
    """DeepSeek-R1-Distill-Qwen-1.5B's architecture with seeded random weights, on the GPU
    (`layers` < 28: the same model cut short, for diagnostics)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                      num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=2,
                      max_position_embeddings=131072, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      rms_norm_eps=1e-6, use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


@dataclass
class Variant:
    """One (head, exec, B) decode step function, kept alive so timing rounds can interleave."""

    head: str
    mode: str | None
    B: int
    step: object
    call: Callable[[], object]
    path: str
    first_call_s: float
    fused: bool = False
    ms: list[float] = field(default_factory=list)


def model_view(model: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy sharing every submodule and weight but with its own module slots, so a
    group of variants can swap heads without touching the model or another group."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.__dict__.pop("fh_compiled", None)
    return view


def install(view: torch.nn.Module, assets, head: str, cfg: TpotConfig) -> None:
    from fh_compile import FlashHeadLMHead, restore_dense_head, swap_head

    if isinstance(view.get_output_embeddings(), FlashHeadLMHead):
        restore_dense_head(view)
    if head.startswith("fh-"):
        swap_head(view, assets, probes=cfg.probes, k=cfg.k,
                  kernel="reference" if head == "fh-reference" else "triton")


def group(model: torch.nn.Module, assets, heads: list[str], mode: str | None, B: int,
          cfg: TpotConfig, fuse: bool = False) -> list[Variant]:
    """Variants that share one decode step (one KV cache, one compiled body graph unless fused):
    the body alone and each head's step function (body graph + head graph), in order."""
    from fh_compile import compile_model
    from fh_compile.decode import head_path
    from fh_compile.sampling import SamplingConfig

    steps = cfg.new_tokens if mode else cfg.eager_tokens
    view = model_view(model)
    compile_model(view, None, k=cfg.k, mode=mode, flashhead=False, max_batch_size=B, fuse=fuse,
                  max_cache_len=cfg.prompt_len + 1 + cfg.warmup + steps + 8)
    dec = view.fh_compiled
    dev = dec.step.device
    tok = torch.randint(0, min(1000, model.config.vocab_size), (B,), device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = []
    for head in heads:
        if head == "body":
            body = dec.body_fn()
            fn = lambda: body(tok)  # noqa: E731
        else:
            install(view, assets, head, cfg)
            step_fn = dec.step_fn(SamplingConfig(), (), 0)
            fn = lambda f=step_fn: f(tok, done)  # noqa: E731

        def call(fn: Callable[[], object] = fn) -> None:
            torch.compiler.cudagraph_mark_step_begin()
            fn()

        with torch.no_grad():
            prefill(dec.step, B, cfg)
            t0 = time.perf_counter()
            call()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            for _ in range(cfg.warmup):
                call()
        path = "none" if head == "body" else head_path(view.get_output_embeddings(), B)
        name = f"{head}-fused" if fuse else head
        out.append(Variant(name, mode, B, dec.step, call, path, round(first, 2), fuse))
    return out


def prefill(step, B: int, cfg: TpotConfig) -> None:
    dev = step.device
    g = torch.Generator(device=dev).manual_seed(B)
    hi = min(1000, step.model.config.vocab_size)
    step.prefill_hidden(torch.randint(0, hi, (B, cfg.prompt_len), device=dev, generator=g))


@torch.no_grad()
def time_round(v: Variant, steps: int, cfg: TpotConfig) -> None:
    """Refill the cache with the prompt, then time `steps` calls with CUDA events."""
    prefill(v.step, v.B, cfg)
    for _ in range(2):
        v.call()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        v.call()
        events[i + 1].record()
    torch.cuda.synchronize()
    v.ms += [a.elapsed_time(b) for a, b in zip(events, events[1:])]


def row_of(v: Variant, model: torch.nn.Module, assets, cfg: TpotConfig) -> dict:
    med = statistics.median(v.ms)
    return dict(exec="compiled" if v.mode else "eager", mode=v.mode, head=v.head, B=v.B,
                fused=v.fused,
                path=v.path, tpot_ms=med, tpot_ms_mean=statistics.fmean(v.ms), steps=len(v.ms),
                first_call_s=v.first_call_s, tok_per_s=v.B * 1e3 / med,
                bytes=step_bytes(model, v.step, assets, v.head, v.B, cfg.probes),
                raw_ms=[round(x, 4) for x in v.ms])


def step_bytes(model: torch.nn.Module, step, assets, head: str, B: int, probes: int) -> int:
    """Byte floor of one step: body weights, the K/V read, and the head's weight reads (the
    FlashHead bound counts B * probes distinct clusters, the no-sharing worst case)."""
    body = sum(p.numel() * p.element_size() for n, p in model.base_model.named_parameters()
               if "embed_tokens" not in n) + B * model.config.hidden_size * 2
    kv = sum(int(layer.keys.numel() + layer.values.numel()) for layer in step.cache.layers)
    kv_bytes = kv * step.cache.layers[0].keys.element_size()  # upper bound: all L slots
    V, D = model.config.vocab_size, model.config.hidden_size
    if head == "body":
        return body + kv_bytes
    if head == "dense":
        return body + kv_bytes + V * D * 2
    K, C = assets.num_clusters, assets.cluster_size
    return body + kv_bytes + (K + min(K, B * probes) * C) * D * 2


def run(cfg: TpotConfig) -> tuple[dict, list[dict]]:
    import transformers
    import triton

    from fh_compile.compile import cached_assets

    t_start = time.perf_counter()
    if cfg.model:
        from fh_compile.loading import load_model
        model = load_model(cfg.model)[0].cuda().eval()
        name = cfg.model
    else:
        model, name = r1_distill_qwen_1p5b(), "random DeepSeek-R1-Distill-Qwen-1.5B architecture"
    assets = None
    if any(h.startswith("fh-") for h in cfg.heads):
        t0 = time.perf_counter()
        assets, folder, built = cached_assets(
            model.get_output_embeddings().weight, 16,
            build_kwargs=dict(coarse_iters=cfg.build_iters, fine_iters=cfg.build_iters))
        print(f"assets {'built' if built else 'loaded'} in {time.perf_counter() - t0:.1f} s "
              f"({folder})", flush=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, transformers=transformers.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), model=name,
                dtype=str(next(model.parameters()).dtype), config={
                    k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()})
    print(f"{meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}, transformers "
          f"{meta['transformers']}; {name}", flush=True)
    from torch._dynamo.utils import counters

    counters.clear()
    rows: list[dict] = []
    heads = [h for h in HEADS if h in cfg.heads]
    for B in cfg.batches:                                   # eager: cheap, one round each
        for v in group(model, assets, heads, None, B, cfg):
            time_round(v, cfg.eager_tokens, cfg)
            rows.append(row_of(v, model, assets, cfg))
            print(f"   eager {v.head:<12} B={B:<3} {rows[-1]['tpot_ms']:8.3f} ms/token", flush=True)
    # Compiled: per B one body graph (autotuned once) and a small graph per head; then the
    # single-graph (fused) FlashHead step at the first B as a check of the split's cost.
    ready: list[Variant] = []
    plan = [(tuple(heads), B, False) for B in cfg.batches]
    if cfg.fused_check and "fh-triton" in heads:
        plan.append((("fh-triton",), cfg.batches[0], True))
    for hs, B, fuse in plan:
        spent = time.perf_counter() - t_start
        if spent > cfg.budget_s:
            print(f"skip compiled {hs} B={B}: {spent:.0f} s spent (--budget-s)", flush=True)
            rows += [dict(exec="compiled", mode=cfg.mode, head=h, B=B, fused=fuse, skipped=True)
                     for h in hs]
            continue
        for v in group(model, assets, list(hs), cfg.mode, B, cfg, fuse=fuse):
            ready.append(v)
            print(f"compiled {v.head:<12} B={B:<3} {'fused ' if fuse else ''}first call "
                  f"{v.first_call_s:.1f} s", flush=True)
    for _ in range(cfg.rounds):                             # interleaved: drift hits all alike
        for v in ready:
            time_round(v, cfg.new_tokens, cfg)
    rows += [row_of(v, model, assets, cfg) for v in ready]
    meta["graph_breaks"] = sum(counters["graph_break"].values())
    meta["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    meta["run_s"] = round(time.perf_counter() - t_start, 1)
    return meta, rows


def print_table(rows: list[dict]) -> None:
    done = {(r["exec"], r["head"], r["B"]): r for r in rows
            if not r.get("skipped") and not r.get("fused")}
    head = (f"{'exec':<9}{'head':<13}{'B':>4} {'path':<10}{'ms/token':>9} {'tok/s':>8} "
            f"{'GB/s':>7} {'x eager':>8} {'/ body':>7} {'first s':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if r.get("skipped"):
            print(f"{r['exec']:<9}{r['head']:<13}{r['B']:>4} skipped (budget)")
            continue
        eager = done.get(("eager", r["head"].removesuffix("-fused"), r["B"]))
        body = done.get((r["exec"], "body", r["B"]))
        x_eager = f"{eager['tpot_ms'] / r['tpot_ms']:.2f}" if eager and r["exec"] != "eager" else "-"
        x_body = f"{r['tpot_ms'] / body['tpot_ms']:.3f}" if body else "-"
        print(f"{r['exec']:<9}{r['head']:<13}{r['B']:>4} {r['path']:<10}{r['tpot_ms']:>9.3f} "
              f"{r['tok_per_s']:>8.0f} {r['bytes'] / r['tpot_ms'] / 1e6:>7.0f} {x_eager:>8} "
              f"{x_body:>7} {r['first_call_s']:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tpot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder / hub id / .gguf (default: random 1.5B Qwen2)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32,
                   help="timed steps per compiled variant and round (3 rounds)")
    p.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    p.add_argument("--probes", type=int, default=256)
    p.add_argument("--mode", default=None,
                   help="torch.compile mode (default max-autotune; reduce-overhead with --quick)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="start no compiled variant after this many seconds (the run ends ~1 "
                        "compile later)")
    p.add_argument("--out", type=Path, default=Path("results/tpot.json"))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: first --batch only, 32-token prompt, 16 tokens, no "
                        "fh-reference or fused row, mode reduce-overhead (CUDA graphs, no "
                        "autotuning)")
    a = p.parse_args(argv)
    if cuda_missing("benchmarks.tpot", "time per output token is measured with CUDA events "
                    "and CUDA graphs"):
        return 2
    cfg = TpotConfig(model=a.model, batches=tuple(a.batch), prompt_len=a.prompt_len,
                     new_tokens=a.new_tokens, heads=tuple(a.heads), probes=a.probes,
                     mode=a.mode or "max-autotune", budget_s=a.budget_s, out=a.out)
    if a.quick:
        cfg = TpotConfig(model=a.model, batches=(a.batch[0],), prompt_len=min(a.prompt_len, 32),
                         new_tokens=16, rounds=1, warmup=2, eager_tokens=4, probes=a.probes,
                         fused_check=False,
                         heads=tuple(h for h in a.heads if h != "fh-reference"),
                         mode=a.mode or "reduce-overhead",
                         budget_s=a.budget_s, out=a.out)
    meta, rows = run(cfg)
    meta["command"] = " ".join(["python -m benchmarks.tpot",
                                *(argv if argv is not None else sys.argv[1:])])
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {cfg.out}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
