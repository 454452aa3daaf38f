"""The fused-linear Triton kernel under the Triton interpreter (CPU), against the PyTorch reference:
every tile kind, split-K (even and ragged chunks, an empty split, the counters' reset).

Run in its own process:
    TRITON_INTERPRET=1 pytest -m interpret tests/custom_ops/test_fused_linear_triton_interpret.py
fp32 only: the interpreter gets bf16 x bf16 tl.dot wrong (triton 3.9); the 16-bit paths are
checked on the GPU (tests/custom_ops/test_fused_linear_cuda.py).  Outputs are poisoned (NaN).
"""

import os

if os.environ.get("TRITON_INTERPRET") != "1":
    import pytest

    pytest.skip("Triton interpreter tests: run with TRITON_INTERPRET=1 in their own process",
                allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # (set by the runner already) before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from custom_ops import counters  # noqa: E402
from custom_ops import fused_linear_triton as flt  # noqa: E402
from custom_ops.fused_linear import act_linear_reference, rms_norm_linear_reference  # noqa: E402
from custom_ops.fused_linear_triton import GemvConfig  # noqa: E402
from triton_poison import poisoned_empty  # noqa: E402

pytestmark = pytest.mark.interpret
N, K = 40, 96           # N not a multiple of any block_n used; K not a power of two
# One K step and several (EVEN_K and masked K tails); FMA rows (block_b 1: num_stages 2 requests
# the next weight tile ahead, 1 does not; one_pass: the RMSNorm in the same pass as the product)
# and tl.dot tiles.
CONFIGS = {
    "fma_k32": GemvConfig(1, 16, 32),
    "fma_k32_no_prefetch": GemvConfig(1, 16, 32, 4, 1),
    "fma_k64_tail": GemvConfig(1, 8, 64),
    "fma_k32_one_pass": GemvConfig(1, 16, 32, 4, 2, one_pass=True),
    "fma_k64_tail_one_pass_no_prefetch": GemvConfig(1, 8, 64, 4, 1, one_pass=True),
    "dot16_k32": GemvConfig(16, 16, 32),
    "dot32_k64_tail": GemvConfig(32, 32, 64),
    "dot16_n8_k64_tail": GemvConfig(16, 8, 64),
}
# (B, config): every config at B = 3 and 17, the FMA ones and one tl.dot tile at B = 1.
CASES = [(B, c) for B in (1, 3, 17) for c in (None, *CONFIGS)
         if B > 1 or c is None or c.startswith(("fma", "dot16_k32"))]
TOL = dict(rtol=1e-5, atol=1e-4)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(flt, "_empty", poisoned_empty)


def test_kernel_is_interpreted() -> None:
    assert not isinstance(flt._fused_gemv_kernel, JITFunction), (
        "triton was imported before TRITON_INTERPRET=1: run this file in its own process")


def rms_inputs(B: int, res: bool, bn: bool, bias: bool):
    x = torch.randn(B, K)
    return (x, torch.randn(B, K) if res else None, torch.randn(K) if bn else None,
            torch.randn(K), torch.randn(N, K) / K ** 0.5, torch.randn(N) if bias else None)


@pytest.mark.parametrize("B,config", CASES)
def test_rms_norm_linear_matches_reference(fresh_seed, B, config) -> None:
    cfg = CONFIGS.get(config)
    for res in (False, True):
        for bn in (False, True):
            bias = res != bn
            offset = 1.0 if bn else 0.0
            args = (*rms_inputs(B, res, bn, bias), 1e-6, offset)
            out, rout = flt.rms_norm_linear_triton(*args, config=cfg)
            ref_out, ref_rout = rms_norm_linear_reference(*args)
            assert out.shape == (B, N) and rout.shape == (B, K)
            torch.testing.assert_close(out, ref_out, **TOL)
            torch.testing.assert_close(rout, ref_rout, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act", ["none", "silu_mul", "gelu_tanh_mul"])
@pytest.mark.parametrize("B,config", CASES)
def test_act_linear_matches_reference(fresh_seed, B, config, act) -> None:
    cfg = CONFIGS.get(config)
    x = 2 * torch.randn(B, K if act == "none" else 2 * K)
    w = torch.randn(N, K) / K ** 0.5
    out = flt.act_linear_triton(x, w, act, config=cfg)
    assert out.shape == (B, N)
    torch.testing.assert_close(out, act_linear_reference(x, w, act), **TOL)


def test_more_rows_than_one_tile(fresh_seed) -> None:
    # B = 70 > 64: the program loops over 64-row blocks (and 5 blocks of 16).
    args = (*rms_inputs(70, True, True, True), 1e-5, 1.0)
    ref_out, ref_rout = rms_norm_linear_reference(*args)
    for cfg in (None, GemvConfig(16, 16, 64)):
        out, rout = flt.rms_norm_linear_triton(*args, config=cfg)
        torch.testing.assert_close(out, ref_out, **TOL)
        torch.testing.assert_close(rout, ref_rout, rtol=1e-6, atol=1e-6)


def test_large_activations_do_not_overflow(fresh_seed) -> None:
    # exp(-g) overflows to inf for g < -88: silu and gelu must still give -0, not NaN.
    x = torch.randn(3, 2 * K) * 100
    w = torch.randn(N, K) / K ** 0.5
    for act in ("silu_mul", "gelu_tanh_mul"):
        out = flt.act_linear_triton(x, w, act)
        assert not bool(out.isnan().any())
        torch.testing.assert_close(out, act_linear_reference(x, w, act), rtol=1e-5, atol=1e-2)


def test_empty_batch() -> None:
    out, rout = flt.rms_norm_linear_triton(torch.empty(0, K), None, None, torch.ones(K),
                                           torch.randn(N, K), None, 1e-6, 0.0)
    assert out.shape == (0, N) and rout.shape == (0, K)


# Split-K: even chunks (K = 96 = 3 x 32), a chunk that K does not fill (64 + 32, a masked tail),
# an empty split (4 splits of 32 for 3 steps), FMA rows and tl.dot tiles.
SPLITS = {
    "fma_s3": GemvConfig(1, 16, 32, splits=3),
    "fma_s2_tail": GemvConfig(1, 8, 64, splits=2),
    "fma_s2_tail_no_prefetch": GemvConfig(1, 8, 64, 4, 1, splits=2),
    "dot16_s4_empty": GemvConfig(16, 16, 32, splits=4),
    "dot32_s2_tail": GemvConfig(32, 8, 64, splits=2),
}
ACTS = ("silu_mul", "gelu_tanh_mul", "none")


def counters_clean() -> bool:
    """The persistent counters of eager split-K calls are all back to zero."""
    buf = counters.POOL.get(torch.device("cpu"))
    return buf is not None and not bool(buf.any())


@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("name", list(SPLITS))
def test_split_k_matches_reference(fresh_seed, B, name) -> None:
    cfg = SPLITS[name]
    i = list(SPLITS).index(name) + B
    res, bn = i % 2 == 0, i % 3 != 0                 # every prologue variant across the cases
    args = (*rms_inputs(B, res, bn, res != bn), 1e-6, 1.0 if bn else 0.0)
    out, rout = flt.rms_norm_linear_triton(*args, config=cfg)
    ref_out, ref_rout = rms_norm_linear_reference(*args)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(rout, ref_rout, rtol=1e-6, atol=1e-6)
    assert counters_clean()
    act = ACTS[i % 3]
    x = 2 * torch.randn(B, K if act == "none" else 2 * K)
    w = torch.randn(N, K) / K ** 0.5
    out = flt.act_linear_triton(x, w, act, config=cfg)
    assert out.shape == (B, N)
    torch.testing.assert_close(out, act_linear_reference(x, w, act), **TOL)
    assert counters_clean()


def test_split_k_two_calls_in_a_row(fresh_seed) -> None:
    # The last program of each block resets its counter, so the next call (a CUDA-graph replay
    # on the GPU) counts from zero again; the partials are summed in split order, so the same
    # inputs give the same bits.
    cfg = GemvConfig(16, 8, 32, splits=3)
    w = torch.randn(N, K) / K ** 0.5
    first = None
    for _ in range(2):
        x = 2 * torch.randn(5, 2 * K)
        out = flt.act_linear_triton(x, w, "silu_mul", config=cfg)
        torch.testing.assert_close(out, act_linear_reference(x, w, "silu_mul"), **TOL)
        assert counters_clean()
        first = first if first is not None else (x, out)
    again = flt.act_linear_triton(first[0], w, "silu_mul", config=cfg)
    assert torch.equal(again, first[1])


def test_pdl_launch_needs_a_hopper_gpu() -> None:
    x, weight = torch.randn(2, K), torch.randn(N, K)
    with pytest.raises(ValueError, match="compute capability 9.0"):
        flt.fused_gemv(x, weight, flt.NONE, config=GemvConfig(1, 4, 32), pdl=True)
