"""FlashHead in standard ONNX ops: the translation of `torch.ops.flashhead.topk` for torch.onnx.

`flashhead_topk_onnx` is a trace-only onnxscript function (plain Python that emits ONNX ops; the
ints `probes`, `cluster_size`, `k` are attributes fixed at export time).  It follows
custom_ops/reference.py step by step, so onnxruntime and PyTorch agree on ids exactly (where no
two candidate logits tie to the last fp32 bit) and on logits to fp32 rounding:

    scores  = h @ centroids^T (+ noise)                      MatMul, Add          [B, K]
    sel     = top-P clusters                                 TopK                 [B, P]
    rows    = offsets[sel] + slot, slot < cluster length     Gather, Range, Less, Where
    logits  = rows of weight . h, -inf on padding slots      Gather, MatMul, Where  [B, P*C]
    ids     = token_ids[rows]                                Gather               [B, P*C]
    top-k by logit, equal logits by smallest id              TopK, GatherElements [B, k]

Ties: ONNX TopK puts the lower index first among equal values (spec, opset >= 11, and
onnxruntime's kernels).  Candidates are first put in ascending-id order, so the final TopK over
logits orders equal logits by smallest vocabulary id, as the reference does.  Vocabulary ids are
sorted as fp32, exact for V < 2**24.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

FLASHHEAD_OP = torch.ops.flashhead.topk.default
ONNX_OPSET = 18


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def flashhead_topk_onnx(h, centroids, weight, offsets, token_ids, probes: int,
                        cluster_size: int, k: int, centroid_noise=None):
    """h [B, D]; centroids [K, D]; weight [V, D] (reordered); offsets [K + 1] int64; token_ids
    [V] int64; centroid_noise [B, K] or None -> (ids [B, k] int64, logits [B, k] fp32)."""
    FLOAT = 1  # onnx.TensorProto.FLOAT
    hf = op.Cast(h, to=FLOAT)                                           # [B, D] fp32
    scores = op.MatMul(hf, op.Transpose(op.Cast(centroids, to=FLOAT), perm=[1, 0]))  # [B, K]
    if centroid_noise is not None:
        scores = op.Add(scores, op.Cast(centroid_noise, to=FLOAT))
    _, sel = op.TopK(scores, _ints(probes), axis=1, largest=1, sorted=1)  # [B, P] int64

    start = op.Gather(offsets, sel, axis=0)                             # [B, P]
    length = op.Sub(op.Gather(offsets, op.Add(sel, op.Constant(value_int=1)), axis=0), start)
    slot = op.Range(op.Constant(value_int=0), op.Constant(value_int=cluster_size),
                    op.Constant(value_int=1))                           # [C]
    valid = op.Less(slot, op.Unsqueeze(length, _ints(-1)))              # [B, P, C]
    rows = op.Where(valid, op.Add(op.Unsqueeze(start, _ints(-1)), slot),
                    op.Constant(value_int=0))                           # [B, P, C]
    flat = _ints(0, -1)  # keep B, merge P and C
    rows = op.Reshape(rows, flat)                                       # [B, N] N = P * C
    valid = op.Reshape(valid, flat)

    cand = op.Cast(op.Gather(weight, rows, axis=0), to=FLOAT)           # [B, N, D]
    logits = op.Squeeze(op.MatMul(cand, op.Unsqueeze(hf, _ints(-1))), _ints(-1))  # [B, N]
    logits = op.Where(valid, logits, op.Constant(value_float=float("-inf")))
    ids = op.Gather(token_ids, rows, axis=0)                            # [B, N] int64

    n = _ints(probes * cluster_size)
    _, by_id = op.TopK(op.Cast(ids, to=FLOAT), n, axis=1, largest=0, sorted=1)  # ascending ids
    logits = op.GatherElements(logits, by_id, axis=1)
    ids = op.GatherElements(ids, by_id, axis=1)
    top_logits, best = op.TopK(logits, _ints(k), axis=1, largest=1, sorted=1)  # [B, k]
    return op.GatherElements(ids, best, axis=1), top_logits


def translation_table() -> dict:
    """The `custom_translation_table` argument of torch.onnx.export for models with FlashHead."""
    return {FLASHHEAD_OP: flashhead_topk_onnx}
