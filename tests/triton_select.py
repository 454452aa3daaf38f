"""Shared checks of the Triton cluster selection (GPU and interpreter tests).

Import only after TRITON_INTERPRET is settled (this imports custom_ops.flashhead_triton).
"""

from __future__ import annotations

import torch
import triton

from custom_ops import flashhead_triton
from triton_poison import poisoned_empty

SELECTS = ("single", "multi")


def stable_rows(h, centroids, probes, noise=None, tol=1e-4) -> torch.Tensor:
    """Rows whose P-th and (P+1)-th centroid scores (fp64, from the given h and centroids)
    differ by more than tol; elsewhere rounding may legitimately pick another cluster set than
    the reference."""
    s = h.double() @ centroids.double().t()
    if noise is not None:
        s = s + noise.double()
    if probes == s.shape[1]:
        return torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    top = s.topk(probes + 1, dim=1).values
    return (top[:, -2] - top[:, -1]) > tol


def draw_h(centroids, B, probes, noise=None, dtype=torch.float32, tol=1e-4) -> torch.Tensor:
    """h [B, D] (dtype, on centroids' device) with at least one row whose cluster selection is
    clear (about 1 draw in 300 of a single row has its P-th and (P+1)-th centroid scores within
    rounding, which made single-row tests flaky)."""
    for _ in range(20):
        h = torch.randn(B, centroids.shape[1], device=centroids.device).to(dtype)
        if bool(stable_rows(h, centroids.to(dtype), probes, noise, tol).any()):
            return h
    raise AssertionError("20 draws without a clear cluster selection")


def selection_scores(B: int, K: int, device: str = "cpu") -> torch.Tensor:
    """s [B, K] fp32: row 0 distinct, the other rows heavy ties (few values, so the P-th largest
    has many equals on both sides of the cut-off), -0.0 among +0.0, infinities, huge values."""
    s = torch.randint(-3, 4, (B, K)).float()
    s[0] = torch.randn(K)
    if B > 1:
        s[1, ::7] = -0.0
    if B > 2:
        s[2, :3] = torch.tensor([float("inf"), float("-inf"), -1e30])[:K]
    if B > 3:
        s[3] = 1.5                                       # every score ties
    return s.to(device)


def first_digit_histogram(s: torch.Tensor) -> torch.Tensor:
    """ws [B, 3, 2048] int32 as `_centroid_scores_kernel` leaves it (HIST=True) plus the zeroed
    counters: digit 1 = top 11 bits of the order key of each score (-0.0 counted as +0.0)."""
    B, K = s.shape
    bits = torch.where(s == 0, torch.zeros_like(s), s).view(torch.int32)
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long() + 2**31
    ws = torch.zeros(B * 3 * 2048 + B + 1, dtype=torch.int32, device=s.device)
    hist = ws[:B * 3 * 2048].view(B, 3, 2048)
    for b in range(B):
        hist[b, 0] = torch.bincount(key[b] >> 21, minlength=2048).int()
    return ws


def run_select(select: str, s: torch.Tensor, P: int) -> dict[str, torch.Tensor]:
    """Launch one selection on scores s [B, K]; its outputs (on the CPU) by name."""
    B, K = s.shape
    dev = s.device
    sel = poisoned_empty((B, P), torch.int64, dev)
    pos = poisoned_empty((B, K), torch.int32, dev)
    flag = torch.zeros(K, dtype=torch.int32, device=dev)
    out = {"sel": sel, "pos": pos, "flag": flag}
    if select == "single":
        flashhead_triton._launch(flashhead_triton._select_top_kernel, (B,))(
            s, sel, pos, flag, K, P, BLOCK_K=triton.next_power_of_2(K))
    else:
        ws = first_digit_histogram(s)
        union = poisoned_empty((min(B * P, K),), torch.int32, dev)
        chunk = flashhead_triton._SELECT_CHUNK
        grid = (triton.cdiv(K, chunk), B)
        for digit in (2, 3):
            flashhead_triton._launch(flashhead_triton._select_refine_kernel, grid)(
                s, ws, K, P, DIGIT=digit, CHUNK=chunk, PDL=False)
        flashhead_triton._launch(flashhead_triton._select_take_kernel, grid)(
            s, ws, flag, union, sel, pos, B, K, P, ONE_ROW=B == 1, CHUNK=chunk,
            PDL=False)
        out.update(union=union, n_union=ws[-1:])
    return {name: t.cpu() for name, t in out.items()}


def check_selection(select: str, s: torch.Tensor, P: int, out: dict[str, torch.Tensor]) -> None:
    """The P largest scores of every row, ties at the cut-off to the smallest cluster ids; pos
    the inverse of sel; flag (and for "multi" the union list) = the clusters any row picked
    ("multi" at B == 1 builds the union from row 0's picks and leaves flag zero).
    "single" lists sel in increasing cluster order, "multi" in any order."""
    s = s.cpu()
    B, K = s.shape
    sel, pos, flag = out["sel"], out["pos"], out["flag"]
    expect_pos = torch.full((B, K), -1, dtype=torch.int32)
    for b in range(B):
        chosen = sel[b]
        assert bool(((chosen >= 0) & (chosen < K)).all()) and chosen.unique().numel() == P
        if select == "single":
            assert bool((chosen[1:] > chosen[:-1]).all()), "increasing cluster order"
        t = s[b].topk(P).values[-1]
        rest = torch.ones(K, dtype=torch.bool)
        rest[chosen] = False
        assert bool((s[b, chosen] >= t).all()) and bool((s[b, rest] <= t).all())
        ties = (s[b] == t).nonzero().flatten()
        taken = chosen[s[b, chosen] == t].sort().values
        assert torch.equal(taken, ties[:taken.numel()]), "ties go to the smallest cluster ids"
        expect_pos[b, chosen] = torch.arange(P, dtype=torch.int32)
    assert torch.equal(pos, expect_pos)
    picked = (expect_pos >= 0).any(0)
    one_row = select == "multi" and B == 1
    assert torch.equal(flag, torch.zeros_like(flag) if one_row else picked.to(torch.int32))
    if "union" in out:
        n = int(out["n_union"][0])
        assert n == int(picked.sum())
        assert torch.equal(out["union"][:n].long().sort().values, picked.nonzero().flatten())
