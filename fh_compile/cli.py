"""Command lines: `python -m fh_compile build-assets ...` (console script `fh-build-assets`), and
what every CLI of this repository shares: -q / -v and the log format, and one rule for output
folders (an existing non-empty --out is refused unless --overwrite).

    python -m fh_compile build-assets --model PATH --out DIR [--overwrite] [-q | -v]
                                      [--always-id ID_OR_TOKEN ...]

Library code only logs (a logger per module); a CLI's main() calls configure_logging once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Loggers of this repository's packages; the CLIs set their level (other libraries stay at the
# root logger's level, WARNING).
PACKAGES = ("fh_compile", "export", "custom_ops", "benchmarks")
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


class OutputDirError(ValueError):
    """The output folder exists, is not empty, and --overwrite was not given (or is a file)."""


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder without overwrite; call it before any slow work."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} exists and is not a folder; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputDirError(f"--out {out} exists and is not empty; pass --overwrite to write over "
                             f"its files, or choose a new folder")


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """-q/--quiet (warnings and errors only, no progress bars) and -v/--verbose (debug)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true",
                       help="only warnings and errors: no progress messages or bars")
    group.add_argument("-v", "--verbose", action="store_true", help="debug messages too")


def configure_logging(quiet: bool = False, verbose: bool = False) -> int:
    """Log this repository's messages to stderr as `HH:MM:SS logger: message`; returns the level.

    INFO by default (stages, elapsed seconds, where files go, progress bars), WARNING with quiet
    (bars off, transformers' and huggingface_hub's bars too), DEBUG with verbose.
    """
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(format=LOG_FORMAT, datefmt="%H:%M:%S")
    for name in PACKAGES:
        logging.getLogger(name).setLevel(level)
    if quiet:
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    return level


def _build_assets_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from fh_compile.build_assets import CENTROID_MODES

    p.add_argument("--model", required=True,
                   help="Hugging Face folder, hub id, or .gguf file whose LM head to cluster")
    p.add_argument("--out", required=True, type=Path, help="folder to write the assets to")
    p.add_argument("--overwrite", action="store_true",
                   help="write over the files of an existing non-empty --out")
    p.add_argument("--cluster-size", type=int, default=16)
    p.add_argument("--centroid-mode", choices=CENTROID_MODES, default="mean")
    p.add_argument("--iters", type=int, default=12, help="k-means iterations per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (where clustering runs)")
    p.add_argument("--always-id", action="append", default=[], metavar="ID_OR_TOKEN",
                   help="a token FlashHead scores at every step, besides the model's eos and "
                        "end-of-turn tokens: a vocabulary id or a token string (repeatable)")
    p.add_argument("--fit-hidden", type=Path, metavar="DIR",
                   help="fit the centroids to these calibration hidden states of the model "
                        "(from python -m fh_compile.calibration; fh_compile.centroid_fit)")
    add_verbosity_flags(p)
    return p


def run_build_assets(args: argparse.Namespace) -> int:
    """Cluster the LM head of args.model and save the assets to args.out; the exit status."""
    import torch

    from fh_compile.always import always_report
    from fh_compile.build_assets import build_assets
    from fh_compile.loading import ModelLoadError, load_lm_head_weight

    configure_logging(args.quiet, args.verbose)
    try:
        check_out_dir(args.out, args.overwrite)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}, but CUDA is not available here; use "
                             f"--device cpu")
        t0 = time.perf_counter()
        log.info("reading the LM head of %s", args.model)
        weight = load_lm_head_weight(args.model)
    except (OutputDirError, ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    V, D = weight.shape
    try:
        always, tokenizer = _always_ids(args.model, V, args.always_id)
    except (TypeError, ValueError) as e:
        print(f"error: --always-id: {e}", file=sys.stderr)
        return 2
    fit: dict[str, Any] = {}
    if args.fit_hidden is not None:
        from fh_compile.calibration import load_hidden

        try:
            h, meta = load_hidden(args.fit_hidden)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: --fit-hidden: {e}", file=sys.stderr)
            return 2
        fit = dict(fit_hidden=h.to(args.device), fit_source=meta.get("source"))
    log.info("read the [%d, %d] head in %.1f s; clustering it into clusters of %d rows on %s",
             V, D, time.perf_counter() - t0, args.cluster_size, args.device)
    t0 = time.perf_counter()
    try:
        assets = build_assets(weight.to(args.device), cluster_size=args.cluster_size,
                              centroid_mode=args.centroid_mode, coarse_iters=args.iters,
                              fine_iters=args.iters, seed=args.seed, always_ids=always, **fit)
    except (TypeError, ValueError) as e:  # settings that do not fit this head
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    out = assets.to("cpu").save(args.out)
    print(f"built {assets.num_clusters} clusters of <= {assets.cluster_size} rows for V="
          f"{assets.vocab_size}, D={assets.hidden_size} in {seconds:.1f} s on {args.device}; "
          f"fingerprint {assets.fingerprint}; wrote {out}")
    report = always_report(assets, weight, tokenizer)
    for r in report:
        print(r.describe())
    return 0 if all(r.retrievable for r in report) else 1


def _always_ids(model: str, vocab_size: int, named: list[str]) -> tuple[list[int] | None, Any]:
    """(always-scored ids, tokenizer) from the model's configs and tokenizer plus the named
    --always-id values; (None, None) with a warning when the configs cannot be read."""
    from fh_compile.always import always_ids_for_model_files

    extra = [int(x) if x.lstrip("-").isdigit() else x for x in named]
    try:
        return always_ids_for_model_files(model, vocab_size, extra)
    except OSError as e:
        log.warning("could not read the configs / tokenizer of %s (%s): no always-scored ids "
                    "recorded; the head takes the model's eos ids when it is installed", model, e)
        return None, None


def build_assets_main(argv: list[str] | None = None, prog: str = "fh-build-assets") -> int:
    """The build-assets command alone (console script `fh-build-assets`)."""
    p = argparse.ArgumentParser(prog=prog, description="Build FlashHead assets (cluster a "
                                "model's LM head) and save them to a folder.")
    return run_build_assets(_build_assets_args(p).parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """`python -m fh_compile COMMAND ...`."""
    p = argparse.ArgumentParser(prog="python -m fh_compile",
                                description="FlashHead-compile command line.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = sub.add_parser("build-assets", help="cluster a model's LM head and save the assets",
                           description="Build FlashHead assets and save them to a folder.")
    _build_assets_args(build).set_defaults(run=run_build_assets)
    args = p.parse_args(argv)
    return args.run(args)
