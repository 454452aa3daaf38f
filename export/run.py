"""Export a model with a FlashHead head: torch.export programs, AOTInductor packages, ONNX.

    python -m export.run --model PATH --out DIR [--assets DIR] [--probes N] [--batch B]
        [--max-seq-len L] [--aoti] [--onnx] [--device cuda|cpu] [--no-verify] [--overwrite] [-q|-v]
    (console script: fh-export)

Writes DIR/prefill.pt2 and DIR/decode.pt2 (torch.export), DIR/{prefill,decode}.aoti.pt2 with
--aoti, DIR/head.onnx and DIR/decode.onnx with --onnx, and DIR/manifest.json.  Exit status: 0 when
every artifact was written and verified (or verification was skipped), 1 when a verification
failed, 2 for bad arguments, a model that cannot be loaded, or a graph that breaks a check.
Stages and their seconds are logged to stderr (-q: warnings only; -v: debug); the results table is
printed to stdout.  A failed run removes the --out folder if it created it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.pipeline import DEFAULT_MODEL, DTYPES, ExportConfig, run_export
from export.programs import ExportCheckError
from fh_compile.assets import AssetError
from fh_compile.cli import add_verbosity_flags, configure_logging
from fh_compile.loading import ModelLoadError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.run (or fh-export)",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hugging Face folder, .gguf file, or hub id (default {DEFAULT_MODEL}; "
                        f"offline, pass a local folder or .gguf file)")
    p.add_argument("--out", required=True, type=Path, help="folder for the artifacts")
    p.add_argument("--assets", type=Path, default=None,
                   help="FlashHead assets folder (default: build or reuse cached assets)")
    p.add_argument("--probes", type=int, default=None,
                   help="clusters probed per row (default: min(256, K), lowered so that --batch "
                        "rows take the FlashHead path)")
    p.add_argument("--k", type=int, default=None, help="candidates returned per row (default 64)")
    p.add_argument("--batch", type=int, default=1, help="rows per call (static)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="KV-cache length L (static)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU); ONNX is fp32")
    p.add_argument("--aoti", action="store_true", help="also write AOTInductor packages")
    p.add_argument("--aoti-programs", default="prefill,decode",
                   help="which programs --aoti packages (comma separated)")
    p.add_argument("--aoti-fused-precision", action="store_true",
                   help="let Inductor keep fused bf16/fp16 intermediates in fp32 (faster; the "
                        "package's tokens may then differ from eager at near ties)")
    p.add_argument("--onnx", action="store_true", help="also write head.onnx and decode.onnx")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reloading and comparing the artifacts with the eager model")
    p.add_argument("--overwrite", action="store_true",
                   help="write over the files of an existing non-empty --out")
    add_verbosity_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.quiet, args.verbose)
    try:
        cfg = ExportConfig(out=args.out, model=args.model, assets=args.assets, probes=args.probes,
                           k=args.k, batch=args.batch, max_seq_len=args.max_seq_len,
                           device=args.device, dtype=args.dtype, aoti=args.aoti,
                           aoti_programs=tuple(p for p in args.aoti_programs.split(",") if p),
                           aoti_eager_numerics=not args.aoti_fused_precision,
                           onnx=args.onnx, verify=args.verify, overwrite=args.overwrite)
        manifest = run_export(cfg)
    except (ModelLoadError, AssetError, ExportCheckError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for a in manifest.artifacts:
        print(f"{a.verification.status:>7}  {a.kind:<12} {a.path:<20} {a.seconds:7.1f} s  "
              f"{a.verification.detail}")
    print(f"manifest: {args.out / 'manifest.json'}")
    return 0 if manifest.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
