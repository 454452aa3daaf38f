"""Launch settings of the decode-attention kernels (custom_ops/decode_attention_triton.py and
custom_ops/rope_attention_triton.py): splits, block sizes, the shortest chunk a split takes, and
the combine.  They depend on shapes only, so a compiled graph or a CUDA graph keeps one launch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

_HEADS = 16            # query heads per program: tl.dot's smallest M tile
# Most splits a launch may take (any head size: the merges fold one [16, block_d] tile at a
# time; with 8-split tree groups the final merge folds at most 16 group results).
MAX_SPLITS = 128
# decode_blocks' splits stop here: 128 at B = 1 awaits a GPU measurement.
_DEFAULT_MAX_SPLITS = 64


class DecodeBlocks(NamedTuple):
    """Launch settings of one call (`decode_blocks`)."""
    splits: int       # S: programs per (row, kv head, head tile)
    block_n: int      # slots per loop step
    block_d: int      # Dh padded to a power of two (>= 16)
    min_chunk: int    # fewest slots a split takes (so short ranges use few splits)
    num_warps: int
    num_stages: int
    # The merge of the splits' partials, chosen at run time by the active splits A: up to this
    # many, the last program folds all A, split after split (A dependent L2 reads); more, a
    # two-level tree of groups of tree_group splits (`_finish`).  0: always the tree.
    combine_upto: int = 16
    tree_group: int = 8


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132                                     # traced without a GPU, or the interpreter


def decode_blocks(B: int, Hkv: int, group: int, L: int, Dh: int, dtype: torch.dtype,
                  device: torch.device) -> DecodeBlocks:
    """Default launch settings; they depend on shapes only (a compiled graph specializes on B,
    Hkv, L, Dh).  Splits: about two programs per SM at full capacity (B * Hkv * NG * S ~ 2 *
    SMs), at most L / min_chunk and `_DEFAULT_MAX_SPLITS`.  min_chunk (4 blocks for fp32, 64
    slots for 16-bit caches): a short row is latency bound (a chain of memory round trips), so
    it is spread over splits of one or two blocks each and folded by the split-after-split
    combine.
    Blocks: 64 slots at Dh 128, 32 at other sizes, 16 for fp32 (IEEE fp32 dots); sm_90 builds
    of triton 3.9 at 4 warps: 168 registers at Dh 128 bf16, 197 at Dh 256, 96 at Dh 64 (64-slot
    blocks there: 255 and spills), no spills.
    Measured on an H200 (`benchmarks.attention_latency --sweep`, one layer, B in {1, 16},
    capacity 32,768, 2026-11-30):
    * fill 200: 64-slot chunks with the split-after-split combine 10.1 us at B = 1 (R1-1.5B)
      against 12.3 us for one 256-slot split and 19.3 us with the head-at-a-time combine;
      Gemma-3-270M 12.3 against 16.5 us;
    * fill 8,192: with 64 active splits (B = 1) folding them split after split took 33.4 us, one
      query head at a time 23.8 us, with 9 to 17 (B = 16) split after split was faster (52.5
      against 58.7 us; Gemma 59.1 against 65.4), hence `combine_upto` = 16.  Above it, the
      two-level merge (groups of `tree_group` = 8) replaced the head-at-a-time one: 19.5 us at
      B = 1 (Gemma 23.1 against 31.7; same sweep, late that night: 128 splits and groups of 4 or
      16 within 0.4 us of these defaults).
    Before that, in the compiled step (`benchmarks.tpot` profile, fill ~200): 128-slot chunks
    spent 19 us a layer at capacity 16,384 against 11 us at capacity 256 (the head-at-a-time
    combine over a SPLIT_PAD-wide tile).
    """
    block_d = max(16, triton.next_power_of_2(Dh))
    programs = B * Hkv * triton.cdiv(group, _HEADS)
    block_n = 16 if dtype == torch.float32 else 64 if block_d == 128 else 32
    min_chunk = 4 * block_n if dtype == torch.float32 else 64
    splits = max(1, min(triton.cdiv(2 * _num_sms(device), programs), triton.cdiv(L, min_chunk),
                        _DEFAULT_MAX_SPLITS))
    return DecodeBlocks(splits, block_n, block_d, min_chunk, 4, 2)


def _check_blocks(blk: DecodeBlocks, Dh: int) -> None:
    def pow2(x: int) -> bool:
        return x >= 16 and x & (x - 1) == 0

    if not (pow2(blk.block_n) and pow2(blk.block_d) and blk.block_d >= Dh):
        raise ValueError(f"block_n and block_d must be powers of two >= 16, block_d >= Dh={Dh}; "
                         f"got {blk}")
    if (not 1 <= blk.splits <= MAX_SPLITS or blk.min_chunk < 1
            or blk.combine_upto < 0 or blk.tree_group < 1):
        raise ValueError(f"splits must be in [1, {MAX_SPLITS}], min_chunk >= 1, "
                         f"combine_upto >= 0 and tree_group >= 1, got {blk}")
