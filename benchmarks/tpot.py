"""Time per output token: eager vs compiled decode, dense head vs FlashHead, and the body alone.

    python -m benchmarks.tpot [--model PATH] [--batch 1 16] [--prompt-len 128] [--new-tokens 64]
                              [--out results/tpot.json] [--quick]

Default model: the DeepSeek-R1-Distill-Qwen-1.5B architecture (Qwen2, D=1536, 28 layers, 12/2
heads, V=151936, untied head) with random bf16 weights (speed does not depend on the values);
FlashHead assets are built on the GPU with few k-means iterations and cached on disk.  Every
variant runs the product's decode step (fh_compile.compile_model + its fused greedy step) over a
static cache after a `--prompt-len` prompt; "body" runs the same step without any head (the
ceiling for a head).  Per-token times are CUDA-event medians over the timed steps.  Compiled
variants (mode max-autotune: Inductor autotuning + CUDA graphs) dominate the run time through
compilation; they run in order of importance and are skipped once `--budget-s` is spent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

HEADS = ("body", "dense", "fh-triton", "fh-reference")


@dataclass(frozen=True)
class TpotConfig:
    model: str | None = None
    batches: tuple[int, ...] = (1, 16)
    prompt_len: int = 128
    new_tokens: int = 64          # timed decode steps per variant
    warmup: int = 6               # untimed steps after the first (compiling) call
    eager_tokens: int = 16        # timed steps for eager variants (slow, and stable)
    probes: int = 256
    k: int = 64
    mode: str = "max-autotune"
    heads: tuple[str, ...] = HEADS
    budget_s: float = 420.0       # compiled variants start only while the run is under this
    build_iters: int = 2
    out: Path = field(default_factory=lambda: Path("results/tpot.json"))

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batches}")
        if self.prompt_len < 1 or self.new_tokens < 1 or self.eager_tokens < 1:
            raise ValueError("prompt_len, new_tokens and eager_tokens must be >= 1")
        if unknown := set(self.heads) - set(HEADS):
            raise ValueError(f"unknown heads {sorted(unknown)}; choose from {HEADS}")


def r1_distill_qwen_1p5b(dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """DeepSeek-R1-Distill-Qwen-1.5B's architecture with seeded random weights, on the GPU."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                      num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                      max_position_embeddings=131072, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      rms_norm_eps=1e-6, use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def time_steps(fn: Callable[[], object], first: bool, warmup: int, steps: int
               ) -> tuple[list[float], float]:
    """(per-step ms from CUDA events, seconds of the first call when `first`, else 0)."""
    compile_s = 0.0
    if first:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        fn()
        events[i + 1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(events, events[1:])], compile_s


def measure(model: torch.nn.Module, assets, head: str, mode: str | None, B: int,
            cfg: TpotConfig) -> dict:
    """One variant: install the head, build the decode step, prefill, time the steps."""
    from fh_compile import compile_model
    from fh_compile.compile import compile_step
    from fh_compile.sampling import SamplingConfig

    steps = cfg.new_tokens if mode else cfg.eager_tokens
    length = cfg.prompt_len + 1 + cfg.warmup + steps + 8
    flash = head.startswith("fh-")
    compile_model(model, assets if flash else None, probes=cfg.probes, k=cfg.k, mode=mode,
                  flashhead=flash, kernel="reference" if head == "fh-reference" else "triton",
                  max_batch_size=B, max_cache_len=length)
    dec = model.fh_compiled
    step = dec.step
    tok = torch.randint(0, 1000, (B,), device="cuda")
    done = torch.zeros(B, dtype=torch.bool, device="cuda")
    if head == "body":
        def body(t: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
            return step.hidden(t.unsqueeze(1))
        fused = compile_step(body, mode)
    else:
        fused = dec.step_fn(SamplingConfig(), (), 0)

    def one() -> None:
        torch.compiler.cudagraph_mark_step_begin()
        fused(tok, done)

    with torch.no_grad():
        step.prefill_hidden(torch.randint(0, 1000, (B, cfg.prompt_len), device="cuda"))
        ms, compile_s = time_steps(one, first=True, warmup=cfg.warmup, steps=steps)
    med = statistics.median(ms)
    return dict(exec="compiled" if mode else "eager", mode=mode, head=head, B=B,
                path=dec.info.path if head != "body" else "none", tpot_ms=med,
                tpot_ms_mean=statistics.fmean(ms), steps=steps,
                first_call_s=round(compile_s, 2), tok_per_s=B * 1e3 / med,
                bytes=step_bytes(model, step, assets, head, B), raw_ms=[round(x, 4) for x in ms])


def step_bytes(model: torch.nn.Module, step, assets, head: str, B: int) -> int:
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
    return body + kv_bytes + (K + min(K, B * step.head.config.probes) * C) * D * 2


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
    plan = [(h, None, B) for B in cfg.batches for h in cfg.heads]            # eager: cheap
    order = [h for h in ("body", "dense", "fh-triton") if h in cfg.heads]
    plan += [(h, cfg.mode, B) for B in cfg.batches for h in order]
    if "fh-reference" in cfg.heads:
        plan += [("fh-reference", cfg.mode, B) for B in cfg.batches]
    rows = []
    for head, mode, B in plan:
        spent = time.perf_counter() - t_start
        if mode and spent > cfg.budget_s:
            print(f"skip {head} compiled B={B}: {spent:.0f} s spent (--budget-s)", flush=True)
            rows.append(dict(exec="compiled", mode=mode, head=head, B=B, skipped=True))
            continue
        row = measure(model, assets, head, mode, B, cfg)
        rows.append(row)
        print(f"{row['exec']:>8} {head:<12} B={B:<3} {row['tpot_ms']:8.3f} ms/token "
              f"(first call {row['first_call_s']:.1f} s)", flush=True)
        torch.cuda.empty_cache()
    return meta, rows


def print_table(rows: list[dict]) -> None:
    done = {(r["exec"], r["head"], r["B"]): r for r in rows if not r.get("skipped")}
    head = (f"{'exec':<9}{'head':<13}{'B':>4} {'path':<10}{'ms/token':>9} {'tok/s':>8} "
            f"{'GB/s':>7} {'x eager':>8} {'/ body':>7} {'first s':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if r.get("skipped"):
            print(f"{r['exec']:<9}{r['head']:<13}{r['B']:>4} skipped (budget)")
            continue
        eager = done.get(("eager", r["head"], r["B"]))
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
    p.add_argument("--new-tokens", type=int, default=64, help="timed steps per compiled variant")
    p.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    p.add_argument("--probes", type=int, default=256)
    p.add_argument("--mode", default=None,
                   help="torch.compile mode (default max-autotune; reduce-overhead with --quick)")
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--out", type=Path, default=Path("results/tpot.json"))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: first --batch only, 32-token prompt, 16 tokens, no "
                        "fh-reference, mode reduce-overhead (CUDA graphs, no autotuning)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.tpot needs a CUDA GPU (time per output token is measured with CUDA "
              "events and CUDA graphs); run it on the GPU machine", file=sys.stderr)
        return 2
    cfg = TpotConfig(model=a.model, batches=tuple(a.batch), prompt_len=a.prompt_len,
                     new_tokens=a.new_tokens, heads=tuple(a.heads), probes=a.probes,
                     mode=a.mode or "max-autotune", budget_s=a.budget_s, out=a.out)
    if a.quick:
        cfg = TpotConfig(model=a.model, batches=(a.batch[0],), prompt_len=min(a.prompt_len, 32),
                         new_tokens=16, warmup=2, eager_tokens=4, probes=a.probes,
                         heads=tuple(h for h in a.heads if h != "fh-reference"),
                         mode=a.mode or "reduce-overhead",
                         budget_s=a.budget_s, out=a.out)
    meta, rows = run(cfg)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {cfg.out}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
