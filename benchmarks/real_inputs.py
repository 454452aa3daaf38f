"""A real model's centroids and hidden states, for `benchmarks.head_latency --real-inputs`.

Which clusters the rows of a batch select (and so how many weight rows FlashHead reads) depends
only on the centroids and the hidden states, not on the weight rows.  A file of both (about 45 MB
for the 1.5B head) therefore lets the GPU benchmark time a real model's cluster sharing with
random weight rows of the same shape, without carrying the 467 MB head to the GPU.

    python -m benchmarks.real_inputs --assets DIR --hidden FILE [FILE ...] --out FILE
                                     [--rows-per-prompt 16]

--assets: FlashHead assets of the real head (`fh_compile.build_assets`; benchmarks.fidelity keeps
them under results/fidelity_cache/assets-*); --hidden: hidden-state sets written by
benchmarks.fidelity (results/fidelity_cache/hidden-*.safetensors: h [N, D] and item [N], the
prompt each position comes from).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class RealInputs:
    centroids: torch.Tensor     # [K, D] bf16, the real head's cluster centroids
    h: torch.Tensor             # [N, D] bf16, final hidden states at decode positions
    item: torch.Tensor          # [N] int64, which prompt (sequence) each row comes from
    meta: dict

    @property
    def num_items(self) -> int:
        return int(self.item.unique().numel())

    def draw_batch(self, B: int, gen: torch.Generator) -> torch.Tensor:
        """h [B, D]: one position from each of B distinct prompts, as a batch of B sequences
        decoding side by side (rows of one prompt would share more clusters than a batch does)."""
        items = self.item.unique()
        if B > items.numel():
            raise ValueError(f"a batch of {B} needs hidden states from {B} prompts; the file has "
                             f"{items.numel()} (write it from more --hidden sets)")
        rows = []
        for i in items[torch.randperm(items.numel(), generator=gen)[:B]]:
            where = torch.nonzero(self.item == i).flatten()
            rows.append(where[torch.randint(where.numel(), (1,), generator=gen)])
        return self.h[torch.cat(rows)]


def write(assets_dir: Path, hidden: list[Path], out: Path, rows_per_prompt: int | None = None,
          seed: int = 0) -> RealInputs:
    """Collect the assets' centroids and the hidden-state sets into one safetensors file;
    rows_per_prompt: keep at most that many positions of each prompt (seeded draw), to keep the
    file small enough to carry."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fh_compile.assets import FlashHeadAssets

    assets = FlashHeadAssets.load(assets_dir)
    hs, items, sources = [], [], []
    for n, path in enumerate(hidden):
        with safe_open(str(path), "pt") as f:
            h, item = f.get_tensor("h"), f.get_tensor("item")
            source = json.loads((f.metadata() or {}).get("fidelity", "{}"))
        if h.ndim != 2 or h.shape[1] != assets.hidden_size or item.shape != h.shape[:1]:
            raise ValueError(f"{path}: h {tuple(h.shape)} and item {tuple(item.shape)} do not "
                             f"fit assets of hidden size {assets.hidden_size}")
        if rows_per_prompt is not None:
            gen = torch.Generator().manual_seed(seed + n)
            keep = torch.cat([w[torch.randperm(w.numel(), generator=gen)[:rows_per_prompt]]
                              for w in (torch.nonzero(item == i).flatten()
                                        for i in item.unique())]).sort().values
            h, item = h[keep], item[keep]
        hs.append(h.to(torch.bfloat16))
        items.append(item.long() + n * 10**9)           # prompt ids distinct across sets
        sources.append({"file": path.name, "rows": int(h.shape[0]),
                        **{k: source.get(k) for k in ("model", "dataset") if k in source}})
    meta = {"assets_fingerprint": assets.fingerprint, "assets_params": assets.params,
            "rows_per_prompt": rows_per_prompt, "sources": sources}
    inputs = RealInputs(assets.centroids.to(torch.bfloat16).contiguous(),
                        torch.cat(hs).contiguous(), torch.cat(items), meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"centroids": inputs.centroids, "h": inputs.h, "item": inputs.item}, str(out),
              metadata={"real_inputs": json.dumps(meta)})
    return inputs


def load(path: Path) -> RealInputs:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("real_inputs", "null"))
        if meta is None:
            raise ValueError(f"{path} was not written by benchmarks.real_inputs")
        return RealInputs(f.get_tensor("centroids"), f.get_tensor("h"), f.get_tensor("item"),
                          meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_inputs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", type=Path, required=True)
    p.add_argument("--hidden", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows-per-prompt", type=int, help="keep at most this many positions a prompt")
    a = p.parse_args(argv)
    if a.rows_per_prompt is not None and a.rows_per_prompt < 1:
        print("error: --rows-per-prompt must be >= 1", file=sys.stderr)
        return 2
    missing = [str(x) for x in (a.assets, *a.hidden) if not x.exists()]
    if missing:
        print(f"error: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    inputs = write(a.assets, a.hidden, a.out, a.rows_per_prompt)
    print(f"wrote {a.out}: centroids {tuple(inputs.centroids.shape)}, h {tuple(inputs.h.shape)} "
          f"from {inputs.num_items} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
