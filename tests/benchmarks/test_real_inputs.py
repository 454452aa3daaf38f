"""benchmarks.real_inputs: centroids + hidden states collected into one file, batches drawn from
distinct prompts; head_latency refuses a missing file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import real_inputs
from benchmarks.head_latency import HeadLatencyConfig
from fh_compile.build_assets import build_assets

D = 24


def hidden_set(path, n_items, per_item, dim=D):
    h = torch.randn(n_items * per_item, dim).to(torch.bfloat16)         # h: [N, D] bf16
    item = torch.arange(n_items).repeat_interleave(per_item)             # item: [N] int64
    save_file({"h": h, "item": item, "next_ids": torch.zeros_like(item),
               "is_answer": torch.zeros_like(item, dtype=torch.bool)}, str(path),
              metadata={"fidelity": '{"dataset": "toy", "model": "m"}'})
    return h


def test_write_load_and_draw(tmp_path, fresh_seed):
    assets = build_assets(torch.randn(103, D), cluster_size=8, coarse_iters=2, fine_iters=2)
    assets.save(tmp_path / "assets")
    h1 = hidden_set(tmp_path / "a.safetensors", 3, 5)
    h2 = hidden_set(tmp_path / "b.safetensors", 4, 2)
    out = tmp_path / "real.safetensors"
    assert real_inputs.main(["--assets", str(tmp_path / "assets"), "--hidden",
                             str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                             "--out", str(out)]) == 0
    got = real_inputs.load(out)
    assert torch.equal(got.centroids, assets.centroids.to(torch.bfloat16))
    assert torch.equal(got.h, torch.cat([h1, h2]))
    assert got.num_items == 7                        # prompt ids kept apart across the sets
    assert got.meta["assets_fingerprint"] == assets.fingerprint
    assert [s["dataset"] for s in got.meta["sources"]] == ["toy", "toy"]
    gen = torch.Generator().manual_seed(0)
    batch = got.draw_batch(7, gen)                   # one row from each of the 7 prompts
    rows = [int(torch.nonzero((got.h == r).all(1)).flatten()[0]) for r in batch]
    assert sorted(int(got.item[i]) for i in rows) == sorted(got.item.unique().tolist())
    with pytest.raises(ValueError, match="needs hidden states from 8 prompts"):
        got.draw_batch(8, gen)
    small = real_inputs.write(tmp_path / "assets", [tmp_path / "a.safetensors"],
                              tmp_path / "small.safetensors", rows_per_prompt=2)
    assert small.h.shape[0] == 6 and small.num_items == 3          # 2 of each prompt's 5
    assert all(bool((h1 == r).all(1).any()) for r in small.h)


def test_bad_inputs(tmp_path, fresh_seed):
    assets = build_assets(torch.randn(40, D), cluster_size=8, coarse_iters=2, fine_iters=2)
    assets.save(tmp_path / "assets")
    hidden_set(tmp_path / "wide.safetensors", 2, 2, dim=D + 1)
    with pytest.raises(ValueError, match="do not fit assets of hidden size 24"):
        real_inputs.write(tmp_path / "assets", [tmp_path / "wide.safetensors"],
                          tmp_path / "out.safetensors")
    assert real_inputs.main(["--assets", str(tmp_path / "nope"), "--hidden",
                             str(tmp_path / "wide.safetensors"), "--out",
                             str(tmp_path / "o.safetensors")]) == 2
    with pytest.raises(ValueError, match="was not written by benchmarks.real_inputs"):
        real_inputs.load(tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="no such file"):
        HeadLatencyConfig(real_inputs=tmp_path / "missing.safetensors")
