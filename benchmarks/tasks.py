"""Task quality with the dense head vs FlashHead: GSM8K (8-shot CoT), IFEval, MMLU-Pro (5-shot CoT).

  python -m benchmarks.tasks --model PATH [--assets DIR] [--probes 256] [--tasks gsm8k ifeval
      mmlu_pro] [--limit N] [--batch-size 16] [--max-new-tokens N] [--device cuda]
      [--out results/tasks.json]
  python -m benchmarks.tasks --score-only results/generations/gsm8k.jsonl [...]   (CPU re-score)

The model is loaded once; each task is generated greedily with the dense head, then with FlashHead
(same prompts, same batches), written to <generations>/<task>.jsonl as it goes (--resume picks up
an interrupted run), scored, and merged into --out (rows of other tasks/models are kept).
FlashHead runs at every decode step whatever the batch size (dense_above_rows is disabled):
otherwise a batch above V / (probes * C) rows would silently use the dense head.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.eval import TASKS, make_task
from benchmarks.eval.generate import generate
from benchmarks.eval.report import merge_results, read_generations, score_rows, table

NEVER_DENSE = 1 << 62   # dense_above_rows: FlashHead at every step
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
RESUME_KEYS = ("model", "task", "subset", "n_items", "max_new_tokens", "dtype", "flashhead_config")


def command_line(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "benchmarks.tasks", *argv])


@dataclass
class TasksConfig:
    model: str
    tasks: tuple[str, ...] = ("gsm8k", "ifeval", "mmlu_pro")
    heads: tuple[str, ...] = ("dense", "flashhead")
    assets: str | None = None
    probes: int = 256
    k: int = 64
    kernel: str = "triton"
    cluster_size: int = 16
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "auto"
    out: Path = Path("results/tasks.json")
    generations: Path | None = None
    data_dir: str | None = None
    mmlu_per_category: int | None = 50
    seed: int = 0
    resume: bool = False
    command: str = field(default_factory=lambda: command_line(sys.argv[1:]))

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; choose from {sorted(TASKS)}")
        bad = [h for h in self.heads if h not in ("dense", "flashhead")]
        if bad or not self.heads:
            raise ValueError(f"heads must be a non-empty subset of dense, flashhead; got {self.heads}")
        for name in ("probes", "k", "cluster_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.kernel not in ("triton", "reference"):
            raise ValueError(f"--kernel must be triton or reference, got {self.kernel!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        self.out = Path(self.out)
        self.generations = Path(self.generations or self.out.parent / "generations")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class FlashHeadSetup:
    assets: Any
    probes: int
    k: int
    kernel: str

    def describe(self) -> dict[str, Any]:
        a = self.assets
        return {"probes": self.probes, "k": self.k, "kernel": self.kernel,
                "cluster_size": a.cluster_size,
                "clusters": a.num_clusters, "fingerprint": a.fingerprint,
                "dense_above_rows": "never", **{f"asset_{k}": v for k, v in a.params.items()
                                               if k in ("centroid_mode", "seed", "algorithm")}}


def prepare_flashhead(model: Any, cfg: TasksConfig) -> FlashHeadSetup:
    """Load assets from --assets if it holds them (checked against this head), else build them from
    the model's head in its run dtype (and save them to --assets when given)."""
    from fh_compile.assets import HEADER_FILE, AssetError, FlashHeadAssets
    from fh_compile.build_assets import build_assets

    weight = model.get_output_embeddings().weight.detach()                    # [V, D]
    if cfg.assets and (Path(cfg.assets) / HEADER_FILE).is_file():
        assets = FlashHeadAssets.load(cfg.assets)
        try:
            assets.check_matches(weight)
        except AssetError as e:
            raise AssetError(f"{e}\n(the fingerprint covers the dtype: this run uses "
                             f"{weight.dtype}; pass an empty --assets folder to build matching "
                             f"assets)") from e
    else:
        print(f"building FlashHead assets (cluster size {cfg.cluster_size}) for "
              f"{tuple(weight.shape)} {weight.dtype} on {weight.device} ...", flush=True)
        assets = build_assets(weight, cluster_size=cfg.cluster_size)
        if cfg.assets:
            assets.to("cpu").save(cfg.assets)
    if cfg.probes > assets.num_clusters:
        raise ValueError(f"--probes {cfg.probes} exceeds the {assets.num_clusters} clusters")
    k = min(cfg.k, cfg.probes * assets.min_cluster_size)
    return FlashHeadSetup(assets=assets, probes=cfg.probes, k=k, kernel=cfg.kernel)


def use_head(model: Any, head: str, fh: FlashHeadSetup | None) -> None:
    """Install `head` ("dense" or "flashhead") on this model instance."""
    from fh_compile.head import FlashHeadLMHead, restore_dense_head, swap_head

    if isinstance(model.get_output_embeddings(), FlashHeadLMHead):
        restore_dense_head(model)
    if head == "flashhead":
        assert fh is not None
        swap_head(model, fh.assets, probes=fh.probes, k=fh.k, dense_above_rows=NEVER_DENSE,
                  kernel=fh.kernel, check_fingerprint=False)  # checked in prepare_flashhead


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_meta(cfg: TasksConfig, fh: FlashHeadSetup | None) -> dict[str, Any]:
    import transformers

    return {"model": cfg.model, "model_name": Path(cfg.model).name, "device": device_name(cfg.device),
            "dtype": str(cfg.torch_dtype).removeprefix("torch."), "decoding": "greedy",
            "batch_size": cfg.batch_size, "flashhead_config": fh.describe() if fh else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": cfg.command, "torch": torch.__version__,
            "transformers": transformers.__version__}


def _done_rows(path: Path, header: dict[str, Any]) -> set[tuple[str, str]]:
    """(head, id) pairs already in a generations file made with the same settings."""
    if not path.is_file():
        return set()
    try:
        old, gens = read_generations(path)
    except (ValueError, OSError):
        return set()
    if any(old.get(k) != header.get(k) for k in RESUME_KEYS):
        print(f"{path}: settings differ from this run; starting it again", flush=True)
        return set()
    return {(g["head"], g["id"]) for g in gens}


def run_task(name: str, model: Any, tokenizer: Any, cfg: TasksConfig,
             fh: FlashHeadSetup | None, meta: dict[str, Any]) -> list[dict[str, Any]]:
    task = make_task(name, cfg.data_dir, **({"per_category": cfg.mmlu_per_category,
                                              "seed": cfg.seed} if name == "mmlu_pro" else {}))
    items = task.items(cfg.limit)
    max_new = cfg.max_new_tokens or task.max_new_tokens
    prompts = [task.prompt(it, tokenizer, max_new) for it in items]
    header = {**meta, "task": name, "subset": task.subset(len(items)), "n_items": len(items),
              "max_new_tokens": max_new, "stop": list(task.stop),
              "prompt_format": task.prompt_format,
              "n_shots": sorted({p.n_shots for p in prompts}), "heads": list(cfg.heads)}
    path = cfg.generations / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _done_rows(path, header) if cfg.resume else set()
    with path.open("a" if done else "w", encoding="utf-8") as f:
        if not done:
            f.write(json.dumps({"header": header}) + "\n")
        for head in cfg.heads:
            todo = [i for i, it in enumerate(items) if (head, it["id"]) not in done]
            if not todo:
                continue
            use_head(model, head, fh)

            def save(batch: list[int], gens: list[Any], head: str = head,
                     todo: list[int] = todo) -> None:
                for b, g in zip(batch, gens):
                    i = todo[b]
                    f.write(json.dumps({"head": head, "id": items[i]["id"], "item": items[i],
                                        "generation": g.text, "n_prompt_tokens": g.n_prompt_tokens,
                                        "n_new_tokens": g.n_new_tokens, "hit_max": g.hit_max,
                                        "n_shots": prompts[i].n_shots}) + "\n")
                f.flush()

            generate(model, tokenizer, [prompts[i] for i in todo], max_new_tokens=max_new,
                     stop=task.stop, batch_size=cfg.batch_size, desc=f"{name} {head}",
                     on_batch=save)
    use_head(model, "dense", fh)
    hdr, gens = read_generations(path)
    try:
        return score_rows(hdr, gens, cfg.data_dir)
    except ImportError as e:  # e.g. a GPU image without lm-eval: score the file elsewhere
        print(f"{name}: not scored here ({e}); its generations are in {path}: run "
              f"python -m benchmarks.tasks --score-only {path} --out {cfg.out}", flush=True)
        return []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face folder or .gguf file (fh_compile.loading)")
    p.add_argument("--assets", help="FlashHead assets folder: loaded if it holds assets, else built "
                   "from the model's head and saved there (default: built, not saved)")
    p.add_argument("--probes", type=int, default=256)
    p.add_argument("--k", type=int, default=64, help="FlashHead candidates per row")
    p.add_argument("--kernel", default="triton", choices=["triton", "reference"],
                   help="FlashHead implementation (reference: pure PyTorch, same math)")
    p.add_argument("--cluster-size", type=int, default=16, help="when building assets")
    p.add_argument("--tasks", nargs="+", default=["gsm8k", "ifeval", "mmlu_pro"], choices=TASKS)
    p.add_argument("--heads", nargs="+", default=["dense", "flashhead"],
                   choices=["dense", "flashhead"])
    p.add_argument("--limit", type=int, help="first N items of each task (after MMLU-Pro's subset)")
    p.add_argument("--mmlu-per-category", type=int, default=50,
                   help="MMLU-Pro items per category (stratified, seeded); 0 = all 12,032")
    p.add_argument("--seed", type=int, default=0, help="MMLU-Pro subset seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int,
                   help="override the per-task default (gsm8k 256, ifeval 1280, mmlu_pro 2048)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu) or a dtype")
    p.add_argument("--data-dir", help="evaluation data (default: $FH_EVAL_DATA, shared/data, "
                   "/work/shared/data)")
    p.add_argument("--out", default="results/tasks.json")
    p.add_argument("--generations", help="folder for <task>.jsonl (default: <out dir>/generations)")
    p.add_argument("--resume", action="store_true", help="keep finished items of an earlier run")
    p.add_argument("--score-only", nargs="+", metavar="FILE",
                   help="re-score saved generations files (no model needed) into --out")
    args = p.parse_args(argv)
    if not args.score_only and not args.model:
        p.error("--model is required (unless --score-only)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.score_only:
        rows = [r for f in args.score_only
                for r in score_rows(*read_generations(f), data_dir=args.data_dir)]
        merge_results(args.out, rows)
        print(table(rows))
        return 0
    cfg = TasksConfig(model=args.model, tasks=tuple(args.tasks), heads=tuple(args.heads),
                      assets=args.assets, probes=args.probes, k=args.k, kernel=args.kernel,
                      cluster_size=args.cluster_size, limit=args.limit,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      device=args.device, dtype=args.dtype, out=Path(args.out),
                      generations=args.generations, data_dir=args.data_dir,
                      mmlu_per_category=args.mmlu_per_category or None, seed=args.seed,
                      resume=args.resume, command=command_line(argv))
    from fh_compile.loading import load_model

    model, tokenizer = load_model(cfg.model, dtype=cfg.torch_dtype, device=cfg.device)
    fh = prepare_flashhead(model, cfg) if "flashhead" in cfg.heads else None
    meta = run_meta(cfg, fh)
    rows = []
    for name in cfg.tasks:
        rows += run_task(name, model, tokenizer, cfg, fh, meta)
        merge_results(cfg.out, [r for r in rows if r["task"] == name])
    print(table(rows))
    print(f"wrote {cfg.out} and {cfg.generations}/<task>.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
