"""The decode-attention and rope/KV-write Triton kernels under the Triton interpreter (CPU), fp32,
against the PyTorch references: empty rows, windows, soft-capping, several splits (the
last-program combine), the counters left at zero for the next call, out-of-range slots.

Run in its own process (see tests/custom_ops/test_flashhead_triton_interpret.py for why):
    TRITON_INTERPRET=1 pytest -m interpret \
        tests/custom_ops/test_decode_attention_triton_interpret.py
fp32 only: the interpreter gets bf16 x bf16 tl.dot wrong, so 16-bit inputs are checked on the
GPU.
"""

import os

if os.environ.get("TRITON_INTERPRET") != "1":
    import pytest

    pytest.skip("Triton interpreter tests: run with TRITON_INTERPRET=1 in their own process",
                allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # (set by the runner already) before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from custom_ops import counters  # noqa: E402
from custom_ops import decode_attention_triton as dat  # noqa: E402
from custom_ops import rope_cache_triton  # noqa: E402
from custom_ops.decode_attention import decode_attention_reference  # noqa: E402
from custom_ops.rope_cache import rope_kv_write_reference  # noqa: E402

pytestmark = pytest.mark.interpret


def poisoned_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Outputs and partials start as NaN: an element left unwritten, or a partial of a split
    that did not run read by the combine, fails the comparison."""
    monkeypatch.setattr(dat, "_empty", poisoned_empty)
    monkeypatch.setattr(rope_cache_triton, "_empty", poisoned_empty)


def blocks(splits: int, Dh: int, min_chunk: int = 16) -> dat.DecodeBlocks:
    """Small blocks so a 60-slot cache spans several blocks and splits; the two-level merge
    in groups of 2 splits, so most calls have several groups and a ragged last one (the flat
    merge has its own test)."""
    return dat.DecodeBlocks(splits, 16, max(16, triton.next_power_of_2(Dh)), min_chunk, 4, 2,
                            combine_upto=0, tree_group=2)


def draw(B, Hq, Hkv, L, Dh):
    return (torch.randn(B, Hq, 1, Dh), torch.randn(B, Hkv, L, Dh), torch.randn(B, Hkv, L, Dh))


def check(q, k, v, starts, fill, blk, window=0, softcap=0.0, scale=0.3):
    starts = torch.as_tensor(starts, dtype=torch.int64)
    fill = torch.tensor(fill)
    got = dat.triton_decode_attention(q, k, v, starts, fill, scale, window, softcap, blocks=blk)
    want = decode_attention_reference(q, k, v, starts, fill, scale, window, softcap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return got


def test_kernels_are_interpreted() -> None:
    assert not isinstance(dat._decode_attention_kernel, JITFunction), (
        "triton was imported before TRITON_INTERPRET=1: run this file in its own process")


@pytest.mark.parametrize("Hq,Hkv,Dh", [(12, 2, 64), (4, 4, 32), (4, 1, 80), (40, 2, 16)])
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_matches_reference(fresh_seed, Hq, Hkv, Dh, splits) -> None:
    L = 60
    q, k, v = draw(3, Hq, Hkv, L, Dh)
    for fill in (0, 1, 37, L - 1, L):
        out = check(q, k, v, [0, 9, 37], fill, blocks(splits, Dh))
        if fill <= 37:
            assert not out[2].any(), "row 2 starts at or after the fill: exactly 0"


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_windows_and_softcap(fresh_seed, splits) -> None:
    q, k, v = draw(3, 12, 2, 60, 32)
    for window, softcap in ((1, 0.0), (7, 0.0), (45, 0.0), (0, 1.5), (20, 3.0)):
        check(q, k, v, [0, 11, 50], 55, blocks(splits, 32), window, softcap, scale=1.0)


def test_combine_with_many_splits_and_the_counters_reset(fresh_seed) -> None:
    q, k, v = draw(2, 8, 2, 200, 32)
    blk = blocks(13, 32)            # 13 splits of >= 16 slots: up to 13 partials combined
    counters.POOL.clear()
    first = check(q, k, v, [0, 3], 190, blk)
    pool = counters.POOL[q.device]
    assert pool.numel() >= 4 and not pool.any(), "the combining programs reset them"
    again = check(q, k, v, [0, 3], 190, blk)          # a second call (a graph replay) agrees
    assert torch.equal(first, again)
    pool[:4] = 5                                       # a stale counter breaks the combine:
    broken = dat.triton_decode_attention(q, k, v, torch.tensor([0, 3]), torch.tensor(190), 0.3,
                                         blocks=blk)   # (shows the test sees them)
    pool.zero_()
    assert not torch.equal(broken, first)


def test_fill_grows_under_one_launch_configuration(fresh_seed) -> None:
    q, k, v = draw(2, 4, 2, 48, 16)
    blk = blocks(3, 16)
    for fill in range(0, 49, 5):    # what CUDA-graph replays see: same grid, new fill
        check(q, k, v, [0, 6], fill, blk)


def test_default_blocks_are_valid_launch_settings() -> None:
    for Dh in (64, 80, 128, 256):
        blk = dat.decode_blocks(1, 1, 4, 32768, Dh, torch.bfloat16, torch.device("cpu"))
        assert 1 <= blk.splits <= dat.MAX_SPLITS
    with pytest.raises(ValueError, match="splits must be in"):
        dat.triton_decode_attention(*draw(1, 2, 1, 8, 16), torch.tensor([0]), torch.tensor(3),
                                    0.3, blocks=blocks(0, 16))


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("fill", [0, 1, 17, 40, 41])
def test_rope_kv_write_matches_reference(fresh_seed, norm, fill) -> None:
    B, Hq, Hkv, L, Dh = 3, 6, 2, 40, 24       # Dh / 2 = 12: a padded half
    qkv = torch.randn(B, (Hq + 2 * Hkv) * Dh)
    k, v = torch.randn(B, Hkv, L, Dh), torch.randn(B, Hkv, L, Dh)
    k2, v2 = k.clone(), v.clone()
    starts, fill_t = torch.tensor([0, 4, 30]), torch.tensor([fill])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, Dh, 2).float() / Dh))
    w = (torch.randn(Dh) * 0.3, torch.randn(Dh) * 0.3) if norm else (None, None)
    got = rope_cache_triton.triton_rope_kv_write(qkv, k, v, starts, fill_t, inv_freq, 0.8, Hq,
                                                 *w, 1e-6, 1.0)
    want = rope_kv_write_reference(qkv, k2, v2, starts, fill_t, inv_freq, 0.8, Hq, *w, 1e-6, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k2, rtol=1e-5, atol=1e-5)
    assert torch.equal(v, v2)


@pytest.mark.parametrize("Hq,Hkv,Dh,splits,upto,tree", [
    (12, 2, 64, 3, 64, 2), (40, 2, 16, 13, 64, 2), (4, 1, 80, 2, 64, 2), (12, 2, 64, 4, 2, 2),
    (12, 2, 64, 13, 0, 8), (12, 2, 64, 13, 0, 4)])
def test_split_wise_combine_matches_reference(fresh_seed, Hq, Hkv, Dh, splits, upto,
                                              tree) -> None:
    """DecodeBlocks.combine_upto: up to it, the last program folds the partials split after
    split for all heads of its tile (two tiles at 40 / 2), windows and soft-cap included; with
    combine_upto = 2 of 4 splits, the fills below switch between the flat merge and the tree at
    run time; 13 splits in tree groups of 8 (8 + 5) and 4 (4 + 4 + 4 + 1)."""
    blk = blocks(splits, Dh)._replace(combine_upto=upto, tree_group=tree)
    q, k, v = draw(3, Hq, Hkv, 200, Dh)
    for fill in (1, 37, 150, 200):
        check(q, k, v, [0, 9, 37], fill, blk)
    check(q, k, v, [0, 11, 50], 190, blk, window=45, softcap=2.0, scale=1.0)
