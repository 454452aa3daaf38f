"""The fused rope + KV-write + decode-attention Triton kernel under the Triton interpreter (CPU),
fp32, against the unfused pair of Triton kernels (rope_kv_write, then decode_attention) with the
same launch settings and against the PyTorch references: several splits (the combine, the cache
writer a middle split), two head tiles, empty rows, out-of-range slots, norms, windows,
soft-capping, the counters left at zero.

Run in its own process (see tests/custom_ops/test_flashhead_triton_interpret.py for why):
    TRITON_INTERPRET=1 pytest -m interpret tests/custom_ops/test_rope_attention_triton_interpret.py
fp32 only: the interpreter gets bf16 x bf16 tl.dot wrong; 16-bit inputs are checked on the GPU.
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
from custom_ops import rope_attention_triton as rat  # noqa: E402
from custom_ops import rope_cache_triton  # noqa: E402
from custom_ops.rope_attention import rope_decode_attention_reference  # noqa: E402

pytestmark = pytest.mark.interpret
TOL = 1e-5


def poisoned_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Outputs and partials start as NaN: an element left unwritten, or a partial of a split
    that did not run read by the combine, fails the comparison."""
    for module in (dat, rat, rope_cache_triton):
        monkeypatch.setattr(module, "_empty", poisoned_empty)


def blocks(splits: int, Dh: int) -> dat.DecodeBlocks:
    """16-slot blocks and chunks, so a 60-slot cache spans several blocks and splits; the
    two-level merge in groups of 2 splits (the flat merge has its own test)."""
    return dat.DecodeBlocks(splits, 16, max(16, triton.next_power_of_2(Dh)), 16, 4, 2,
                            combine_upto=0, tree_group=2)


def draw(B, Hq, Hkv, L, Dh, norm):
    qkv = torch.randn(B, (Hq + 2 * Hkv) * Dh)
    k, v = torch.randn(B, Hkv, L, Dh), torch.randn(B, Hkv, L, Dh)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, Dh, 2).float() / Dh))
    w = (torch.randn(Dh) * 0.3, torch.randn(Dh) * 0.3) if norm else (None, None)
    return qkv, k, v, inv_freq, w


def check(qkv, k, v, starts, fill, inv_freq, Hq, w, blk, window=0, softcap=0.0, ws=None):
    """Fused vs unfused Triton kernels vs the references; returns the fused output."""
    starts, fill = torch.as_tensor(starts, dtype=torch.int64), torch.tensor([fill])
    rope = (inv_freq, 0.9, Hq, *w, 1e-6, 1.0)
    k1, v1, k2, v2, k3, v3 = k.clone(), v.clone(), k.clone(), v.clone(), k.clone(), v.clone()
    got = rat.triton_rope_decode_attention(qkv, k1, v1, starts, fill, *rope, 0.3, window,
                                           softcap, ws, blocks=blk)
    q = rope_cache_triton.triton_rope_kv_write(qkv, k2, v2, starts, fill, *rope)
    pair = dat.triton_decode_attention(q, k2, v2, starts, fill, 0.3, window, softcap, blocks=blk)
    want = rope_decode_attention_reference(qkv, k3, v3, starts, fill, *rope, 0.3, window,
                                           softcap)
    torch.testing.assert_close(got, pair, rtol=TOL, atol=TOL)
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    torch.testing.assert_close(k1, k2, rtol=TOL, atol=TOL)
    assert torch.equal(v1, v2) and torch.equal(v1, v3)
    # Only slot fill - 1 may change.
    other = torch.ones(k.shape[2], dtype=torch.bool)
    if 1 <= int(fill) <= k.shape[2]:
        other[int(fill) - 1] = False
    assert torch.equal(k1[:, :, other], k[:, :, other])
    return got


def test_kernels_are_interpreted() -> None:
    assert not isinstance(rat._rope_attention_kernel, JITFunction), (
        "triton was imported before TRITON_INTERPRET=1: run this file in its own process")


@pytest.mark.parametrize("Hq,Hkv,Dh", [(12, 2, 64), (4, 4, 32), (4, 1, 80), (40, 2, 16)])
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_unfused_pair(fresh_seed, Hq, Hkv, Dh, splits) -> None:
    L = 60
    qkv, k, v, inv_freq, w = draw(3, Hq, Hkv, L, Dh, norm=Dh != 32)
    for fill in (0, 1, 2, 37, L - 1, L, L + 1):
        out = check(qkv, k, v, [0, 9, 37], fill, inv_freq, Hq, w, blocks(splits, Dh))
        if fill <= 37:
            assert not out[2].any(), "row 2 starts at or after the fill: exactly 0"


def test_writer_is_a_middle_split_and_counters_stay_zero(fresh_seed) -> None:
    qkv, k, v, inv_freq, w = draw(2, 12, 2, 60, 32, norm=True)
    blk, fill = blocks(4, 32), 37
    # Row 0: 37 valid slots in 16-slot chunks -> 3 active splits of 4; slot 36 is split 2's.
    assert (fill - 1) // 16 == 2 and triton.cdiv(fill, 16) == 3
    ws = counters.new_workspace("cpu", 64)
    first = check(qkv, k, v, [0, 5], fill, inv_freq, 12, w, blk, ws=ws)
    assert not ws.any(), "the combining programs reset the caller's counters"
    counters.POOL.clear()
    again = check(qkv, k, v, [0, 5], fill, inv_freq, 12, w, blk)        # the pool this time
    assert torch.equal(first, again)
    assert not counters.POOL[qkv.device].any()


@pytest.mark.parametrize("splits", [1, 4])
def test_windows_and_softcap(fresh_seed, splits) -> None:
    qkv, k, v, inv_freq, w = draw(3, 12, 2, 60, 32, norm=True)
    for fill, window, softcap in ((55, 1, 0.0), (55, 7, 0.0), (50, 45, 0.0), (55, 0, 1.5),
                                  (60, 20, 3.0)):
        check(qkv, k, v, [0, 11, 50], fill, inv_freq, 12, w, blocks(splits, 32), window,
              softcap)


def test_fill_grows_under_one_launch_configuration(fresh_seed) -> None:
    """What CUDA-graph replays see: one grid, the fill growing, each call writing its slot."""
    Hq, Hkv, L, Dh = 4, 2, 48, 16
    _, k, v, inv_freq, w = draw(2, Hq, Hkv, L, Dh, norm=False)
    k_ref, v_ref = k.clone(), v.clone()
    starts, blk = torch.tensor([0, 6]), blocks(3, Dh)
    for fill in range(1, L + 1, 3):
        qkv = torch.randn(2, (Hq + 2 * Hkv) * Dh)
        fill_t = torch.tensor([fill])
        got = rat.triton_rope_decode_attention(qkv, k, v, starts, fill_t, inv_freq, 1.0, Hq,
                                               *w, 1e-6, 0.0, 0.25, blocks=blk)
        want = rope_decode_attention_reference(qkv, k_ref, v_ref, starts, fill_t, inv_freq, 1.0,
                                               Hq, *w, 1e-6, 0.0, 0.25)
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    torch.testing.assert_close(k, k_ref, rtol=TOL, atol=TOL)
    assert torch.equal(v, v_ref)


@pytest.mark.parametrize("splits", [2, 4])
def test_split_wise_combine(fresh_seed, splits) -> None:
    """DecodeBlocks.combine_upto in the fused kernel: same as the unfused pair and the
    references (the writer of the new slot is a middle split at fill 40 with 4 splits)."""
    qkv, k, v, inv_freq, w = draw(3, 12, 2, 60, 32, norm=True)
    blk = blocks(splits, 32)._replace(combine_upto=64)
    for fill in (2, 40, 60):
        check(qkv, k, v, [0, 5, 30], fill, inv_freq, 12, w, blk)


def test_pdl_launch_needs_a_hopper_gpu() -> None:
    qkv, k, v, inv_freq, w = draw(1, 4, 2, 20, 16, norm=False)
    with pytest.raises(ValueError, match="compute capability 9.0"):
        rat.triton_rope_decode_attention(qkv, k, v, torch.zeros(1, dtype=torch.int64),
                                         torch.tensor([5]), inv_freq, 1.0, 4, *w, 1e-6, 0.0,
                                         0.25, pdl=True)
