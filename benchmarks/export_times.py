"""What exporting costs and what the AOTInductor package gives: export time, AOTI compile time,
and the package's time per output token beside torch.compile's, on one GPU.

    python -m benchmarks.export_times [--batch 1] [--max-seq-len 512] [--steps 64]
                                      [--mode reduce-overhead] [--out results/export_times.json]

Model: the DeepSeek-R1-Distill-Qwen-1.5B architecture (Qwen2, D=1536, 28 layers, 12/2 heads,
intermediate 8960, V=151936, untied head) with random bf16 weights (speed does not depend on the
values), FlashHead assets built on the GPU with few k-means iterations.  Every row times the SAME
decode step (DecodeStep.forward: body + FlashHead top-k, k candidates) after a prefill:
  eager          the step in eager PyTorch (the baseline of every ratio);
  torch.compile  torch.compile(step.forward, mode, fullgraph=True);
  aoti           the decode.aoti.pt2 package (C++ wrapper, one call per token);
  aoti+graph     the same package captured once in a CUDA graph and replayed.
Per-token times: CUDA-event medians over --steps timed steps after warm-up.  Fits in about
4 minutes on an H100 (most of it Inductor and the C++ compiler).
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks import cuda_missing


@dataclass(frozen=True)
class ExportTimesConfig:
    batch: int = 1
    max_seq_len: int = 512
    prompt_len: int = 64
    steps: int = 64               # timed decode steps per row
    warmup: int = 8
    probes: int = 256
    k: int = 64
    mode: str = "reduce-overhead"  # torch.compile mode of the baseline (CUDA graphs, no autotune)
    build_iters: int = 2
    layers: int = 28              # < 28: the architecture cut short (diagnostics: package size)
    verify_steps: int = 32        # greedy tokens of the package compared with the eager step
    eager_numerics: bool = True   # the CLI's default: bf16 rounded as in eager (export.aoti)
    out: Path = field(default_factory=lambda: Path("results/export_times.json"))

    def __post_init__(self) -> None:
        if self.batch < 1 or self.steps < 1 or self.prompt_len < 1:
            raise ValueError("batch, steps and prompt_len must be >= 1")
        # every row prefills afresh
        need = self.prompt_len + max(self.warmup + self.steps, self.verify_steps) + 4
        if self.max_seq_len < need:
            raise ValueError(f"max_seq_len must be >= {need} (prompt + warm-up + timed steps)")


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def time_steps(fn: Callable[[], object], warmup: int, steps: int) -> tuple[list[float], float]:
    """(per-step ms from CUDA events, seconds of the first call, which compiles or captures)."""
    _, first_s = _timed(fn)
    for _ in range(warmup):
        fn()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        fn()
        events[i + 1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(events, events[1:])], first_s


def tpot(prefill: Callable[[], object], one: Callable[[], object],
         cfg: ExportTimesConfig) -> tuple[float, list[float], float]:
    """(median ms per step, raw ms, seconds of the first call) after a fresh prefill."""
    with torch.no_grad():
        prefill()
        ms, first_s = time_steps(one, cfg.warmup, cfg.steps)
    return statistics.median(ms), ms, first_s


def run(cfg: ExportTimesConfig, on_row: Callable[[dict, list[dict]], None] | None = None
        ) -> tuple[dict, list[dict]]:
    """(metadata, one row per executor); on_row(meta, rows) after every row (partial results
    survive a crash of a later row)."""
    import transformers
    import triton

    from benchmarks.random_models import r1_distill_qwen_1p5b
    from benchmarks.step_cost import step_bytes
    from export.aoti import load, package
    from export.modules import Prefill, new_state
    from export.programs import (Prompt, check_one_flashhead_node, compare_tokens, eager_tokens,
                                 export_decode, export_prefill, greedy_tokens)
    from fh_compile import build_assets, swap_head
    from fh_compile.decode import DecodeStep

    model = r1_distill_qwen_1p5b(layers=cfg.layers)
    assets, build_s = _timed(lambda: build_assets(
        model.get_output_embeddings().weight, cluster_size=16, coarse_iters=cfg.build_iters,
        fine_iters=cfg.build_iters))
    swap_head(model, assets, probes=cfg.probes, k=cfg.k)
    step = DecodeStep(model, max_batch_size=cfg.batch, max_cache_len=cfg.max_seq_len, k=cfg.k)
    assert step.path == "flashhead", step.path
    prompt = Prompt.make(cfg.batch, cfg.prompt_len, model.config.vocab_size, "cuda")
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, transformers=transformers.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                model=f"random DeepSeek-R1-Distill-Qwen-1.5B architecture, bf16, {cfg.layers} "
                      f"of 28 layers",
                assets_build_s=round(build_s, 2), config={
                    k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()})
    print(f"{meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}, transformers "
          f"{meta['transformers']}; assets built in {build_s:.1f} s", flush=True)

    prefill_ep, export_prefill_s = _timed(lambda: export_prefill(step, prompt))
    decode_ep, export_decode_s = _timed(lambda: export_decode(step))
    for name, ep in (("prefill", prefill_ep), ("decode", decode_ep)):
        check_one_flashhead_node(ep, name)
    tmp = tempfile.TemporaryDirectory(prefix="export_times_")  # the package holds 3.5 GB
    pkg_path, aoti_s = _timed(lambda: package(decode_ep, Path(tmp.name) / "decode.aoti.pt2",
                                              cfg.eager_numerics))
    pkg_gb = pkg_path.stat().st_size / 1e9
    print(f"torch.export: prefill {export_prefill_s:.1f} s, decode {export_decode_s:.1f} s; "
          f"AOTI decode compile {aoti_s:.1f} s, package {pkg_gb:.2f} GB", flush=True)
    meta.update(export_prefill_s=round(export_prefill_s, 2),
                export_decode_s=round(export_decode_s, 2), aoti_compile_decode_s=round(aoti_s, 2),
                aoti_package_gb=round(pkg_gb, 3))

    tok = torch.zeros(cfg.batch, 1, dtype=torch.int64, device="cuda")
    rows = []

    def add(name: str, prefill: Callable[[], object], one: Callable[[], object]) -> None:
        med, ms, first_s = tpot(prefill, one, cfg)
        rows.append(dict(row=name, B=cfg.batch, tpot_ms=med, tpot_ms_mean=statistics.fmean(ms),
                         first_call_s=round(first_s, 2), steps=cfg.steps,
                         bytes=step_bytes(model, step, assets, "fh-triton", cfg.batch, cfg.probes),
                         raw_ms=[round(x, 4) for x in ms]))
        print(f"{name:<14} {med:8.3f} ms/token (first call {first_s:.1f} s)", flush=True)
        if on_row is not None:
            on_row(meta, rows)

    eager_prefill = lambda: step.prefill(prompt.input_ids, prompt.attention_mask)  # noqa: E731
    add("eager", eager_prefill, lambda: step(tok))
    # The packages run before torch.compile, so compiled CUDA-graph trees cannot interfere with
    # them.  export.aoti.load imports onnxruntime first (see import_onnxruntime_first: without it
    # the load segfaulted on the H200 with torch 2.11).
    state = new_state(step)
    state_prefill = lambda: Prefill(step)(prompt.input_ids, prompt.attention_mask, state)  # noqa: E731
    runner = load(pkg_path)
    # Same greedy tokens as the eager step?  (torch.export prefill fills the state, the
    # package decodes; prefill of the step's own cache for the eager side.)
    check = compare_tokens(
        eager_tokens(step, prompt, cfg.verify_steps),
        greedy_tokens(Prefill(step), runner, new_state(step), prompt, cfg.verify_steps),
        "decode.aoti.pt2")
    meta.update(aoti_tokens=check.status, aoti_tokens_detail=check.detail)
    print(f"tokens: {check.detail}", flush=True)
    add("aoti", state_prefill, lambda: runner(tok, state))

    graph_runner = load(pkg_path, run_single_threaded=True)
    graph = torch.cuda.CUDAGraph()

    def capture() -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):       # warm up off the capture stream, then capture
            for _ in range(2):
                graph_runner(tok, state)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            graph_runner(tok, state)
        state_prefill()                     # the captures above appended slots: start again
    add("aoti+graph", lambda: (state_prefill(), capture()), graph.replay)
    compiled = torch.compile(step.forward, mode=cfg.mode, fullgraph=True)

    def compiled_one() -> None:
        torch.compiler.cudagraph_mark_step_begin()
        compiled(tok)
    add("torch.compile", eager_prefill, compiled_one)
    tmp.cleanup()
    return meta, rows


def print_table(meta: dict, rows: list[dict]) -> None:
    base = {r["row"]: r for r in rows}
    print(f"\nexport: prefill {meta['export_prefill_s']:.1f} s, decode {meta['export_decode_s']:.1f}"
          f" s; AOTI compile (decode) {meta['aoti_compile_decode_s']:.1f} s; {meta['gpu']}")
    head = f"{'row':<15}{'B':>3} {'ms/token':>9} {'GB/s':>7} {'x eager':>8} {'x compile':>10} {'first s':>8}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        x_eager = base["eager"]["tpot_ms"] / r["tpot_ms"]
        x_comp = base["torch.compile"]["tpot_ms"] / r["tpot_ms"]
        print(f"{r['row']:<15}{r['B']:>3} {r['tpot_ms']:>9.3f} {r['bytes'] / r['tpot_ms'] / 1e6:>7.0f}"
              f" {x_eager:>8.2f} {x_comp:>10.2f} {r['first_call_s']:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.export_times", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per row")
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode of the baseline")
    p.add_argument("--aoti-fused-precision", action="store_true",
                   help="package without emulate_precision_casts (as export.run's flag)")
    p.add_argument("--layers", type=int, default=28,
                   help="decoder layers (default 28, the real depth; fewer only to diagnose)")
    p.add_argument("--out", type=Path, default=Path("results/export_times.json"))
    a = p.parse_args(argv)
    if cuda_missing("benchmarks.export_times", "AOTInductor CUDA packages and CUDA-event timing"):
        return 2
    cfg = ExportTimesConfig(batch=a.batch, max_seq_len=a.max_seq_len, steps=a.steps,
                            mode=a.mode, eager_numerics=not a.aoti_fused_precision,
                            layers=a.layers, out=a.out)
    faulthandler.enable()                   # a crash in a package prints the Python stack
    cfg.out.parent.mkdir(parents=True, exist_ok=True)

    command = " ".join(["python -m benchmarks.export_times",
                        *(argv if argv is not None else sys.argv[1:])])

    def save(meta: dict, rows: list[dict]) -> None:
        meta["command"] = command
        cfg.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    meta, rows = run(cfg, save)
    save(meta, rows)
    print(f"\nwrote {cfg.out}")
    print_table(meta, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
