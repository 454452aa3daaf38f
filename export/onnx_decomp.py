"""FlashHead in standard ONNX ops: the translation of `torch.ops.flashhead.topk` for torch.onnx.

`flashhead_topk_onnx` is a trace-only onnxscript function (plain Python that emits ONNX ops; the
ints `probes`, `cluster_size`, `k` are attributes fixed at export time).  It follows
custom_ops/reference.py step by step, so onnxruntime and PyTorch agree on ids exactly (where no
two candidate logits tie to the last fp32 bit) and on logits to fp32 rounding:

    scores  = h @ centroids^T (+ noise)                      MatMul, Add          [B, K]
    sel     = top-P clusters                                 TopK                 [B, P]
    rows    = offsets[sel] + slot, slot < cluster length     Gather, Range, Less, Where
    (+ always rows: appended, once each)                     Equal, ReduceSum, Concat [B, N]
    logits  = rows of weight . h, -inf on padding slots      Gather, MatMul, Where  [B, N]
    ids     = token_ids[rows]                                Gather               [B, N]
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
                        cluster_size: int, k: int, centroid_noise=None, always_ids=None,
                        always_rows=None):
    """h [B, D]; centroids [K, D]; weight [V, D] (reordered); offsets [K + 1] int64; token_ids
    [V] int64; centroid_noise [B, K] or None; always_ids [A] int64 or None and always_rows [A]
    int64 or None (see `_with_always_rows`) -> (ids [B, k] int64, logits [B, k] fp32)."""
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
    if always_ids is not None:
        rows, valid = _with_always_rows(rows, valid, token_ids, always_ids, always_rows)

    cand = op.Cast(op.Gather(weight, rows, axis=0), to=FLOAT)           # [B, N, D]
    logits = op.Squeeze(op.MatMul(cand, op.Unsqueeze(hf, _ints(-1))), _ints(-1))  # [B, N]
    logits = op.Where(valid, logits, op.Constant(value_float=float("-inf")))
    ids = op.Gather(token_ids, rows, axis=0)                            # [B, N] int64

    n = op.Shape(ids, start=1, end=2)                                   # [1]: N
    _, by_id = op.TopK(op.Cast(ids, to=FLOAT), n, axis=1, largest=0, sorted=1)  # ascending ids
    logits = op.GatherElements(logits, by_id, axis=1)
    ids = op.GatherElements(ids, by_id, axis=1)
    top_logits, best = op.TopK(logits, _ints(k), axis=1, largest=1, sorted=1)  # [B, k]
    return op.GatherElements(ids, best, axis=1), top_logits


def _with_always_rows(rows, valid, token_ids, always_ids, always_rows):
    """The candidates with the always-scored rows appended, as custom_ops/reference.py does:
    rows, valid [B, N] -> [B, N + A], an always row inside a probed cluster (or listed twice)
    scored once; rows of invalid slots 0.  always_rows None: looked up through the inverse
    permutation (ScatterElements over token_ids, O(V) per call)."""
    INT64, BOOL = 7, 9  # onnx.TensorProto.INT64 / BOOL
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    if always_rows is None:
        V = op.Squeeze(op.Shape(token_ids), _ints(0))
        inverse = op.ScatterElements(op.Mul(token_ids, zero), token_ids, op.Range(zero, V, one),
                                     axis=0)                            # [V] vocab id -> row
        always_rows = op.Gather(inverse, always_ids, axis=0)            # [A]
    # ReduceSum (an empty list sums to 0, where ReduceMax would give the type's minimum).
    hit = op.ReduceSum(op.Cast(op.Equal(op.Unsqueeze(rows, _ints(-1)), always_rows), to=INT64),
                       _ints(-1), keepdims=0)                           # [B, N]
    valid = op.And(valid, op.Not(op.Cast(hit, to=BOOL)))
    slot = op.Range(zero, op.Squeeze(op.Shape(always_rows), _ints(0)), one)          # [A]
    earlier = op.And(op.Equal(op.Unsqueeze(always_rows, _ints(1)), always_rows),
                     op.Less(slot, op.Unsqueeze(slot, _ints(1))))       # [A, A]: j < i, same
    first = op.Not(op.Cast(op.ReduceSum(op.Cast(earlier, to=INT64), _ints(-1), keepdims=0),
                           to=BOOL))                                    # [A]
    shape = op.Concat(op.Shape(rows, start=0, end=1), op.Shape(always_rows), axis=0)  # [B, A]
    rows = op.Concat(rows, op.Expand(op.Unsqueeze(always_rows, _ints(0)), shape), axis=1)
    valid = op.Concat(valid, op.Expand(op.Unsqueeze(first, _ints(0)), shape), axis=1)
    return op.Where(valid, rows, zero), valid


def translation_table() -> dict:
    """The `custom_translation_table` argument of torch.onnx.export for models with FlashHead."""
    return {FLASHHEAD_OP: flashhead_topk_onnx, RMS_NORM_LINEAR_OP: rms_norm_linear_onnx,
            ACT_LINEAR_OP: act_linear_onnx, DECODE_ATTENTION_OP: decode_attention_onnx}


# -- The fused decode linears (custom_ops/fused_linear.py) in standard ONNX ops ------------------
# Same steps as custom_ops.fused_linear's references: fp32 math (Cast), rounding to the input
# dtype where they round (CastLike x, then back to fp32), MatMul against the transposed weight.
RMS_NORM_LINEAR_OP = torch.ops.flashhead.rms_norm_linear.default
ACT_LINEAR_OP = torch.ops.flashhead.act_linear.default


def _round_like(v, like):
    """fp32 v rounded to `like`'s dtype and back to fp32 (the references' rounding steps)."""
    return op.Cast(op.CastLike(v, like), to=1)


def _rms_scale(v, w, eps: float, offset: float):
    """fp32 v [B, K] * 1 / sqrt(mean(v^2) + eps) * (offset + w [K])."""
    ms = op.ReduceMean(op.Mul(v, v), _ints(-1), keepdims=1)                    # [B, 1]
    inv = op.Reciprocal(op.Sqrt(op.Add(ms, op.Constant(value_float=eps))))
    scale = op.Add(op.Cast(w, to=1), op.Constant(value_float=offset))           # [K]
    return op.Mul(op.Mul(v, inv), scale)


def _linear(h, weight):
    """fp32 h [B, K] @ weight [N, K]^T -> [B, N] fp32."""
    return op.MatMul(h, op.Transpose(op.Cast(weight, to=1), perm=[1, 0]))


def rms_norm_linear_onnx(x, residual, branch_norm, norm, weight, bias, eps: float,
                         norm_offset: float):
    """x [B, K]; residual [B, K] or None; branch_norm [K] or None; norm [K]; weight [N, K]; bias
    [N] or None -> (out [B, N], residual_out [B, K]) in x's dtype."""
    r = op.Cast(x, to=1)
    if branch_norm is not None:
        r = _round_like(_rms_scale(r, branch_norm, eps, norm_offset), x)
    if residual is not None:
        r = _round_like(op.Add(r, op.Cast(residual, to=1)), x)
    y = _round_like(_rms_scale(r, norm, eps, norm_offset), x)
    out = _linear(y, weight)
    if bias is not None:
        out = op.Add(out, op.Cast(bias, to=1))
    return op.CastLike(out, x), op.CastLike(r, x)


def act_linear_onnx(x, weight, act: str):
    """x [B, K] ("none") or [B, 2K] = [gate | up]; weight [N, K] -> out [B, N] in x's dtype."""
    h = op.Cast(x, to=1)
    if act != "none":
        gate, up = op.Split(h, axis=-1, num_outputs=2)
        if act == "silu_mul":
            a = op.Mul(gate, op.Sigmoid(gate))
        else:       # gelu, tanh approximation: 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))
            cube = op.Mul(op.Mul(gate, gate), gate)
            z = op.Mul(op.Constant(value_float=0.7978845608028654),
                       op.Add(gate, op.Mul(op.Constant(value_float=0.044715), cube)))
            a = op.Mul(op.Mul(op.Constant(value_float=0.5), gate),
                       op.Add(op.Constant(value_float=1.0), op.Tanh(z)))
        h = _round_like(op.Mul(a, up), x)
    return op.CastLike(_linear(h, weight), x)


# -- flashhead::decode_attention -----------------------------------------------------------------
DECODE_ATTENTION_OP = torch.ops.flashhead.decode_attention.default


def decode_attention_onnx(q, k_cache, v_cache, starts, fill, scale: float, window: int = 0,
                          softcap: float = 0.0):
    """flashhead::decode_attention (custom_ops/decode_attention.py) in standard ONNX ops, fp32:
    q [B, Hq, 1, Dh] viewed as [B, Hkv, G, Dh] (GQA without copying K/V), scores against every
    slot, mask lo_b <= j < fill, a softmax that leaves rows with no valid slot at exactly 0.
    Reads the whole cache, like the PyTorch reference.  -> [B, Hq, 1, Dh] in q's dtype."""
    FLOAT = 1  # onnx.TensorProto.FLOAT
    shape_k = op.Shape(k_cache)                                         # [B, Hkv, L, Dh]
    groups = op.Concat(_ints(0), op.Slice(shape_k, _ints(1), _ints(2)), _ints(-1, 0), axis=0)
    qg = op.Reshape(op.Cast(q, to=FLOAT), groups)                       # [B, Hkv, G, Dh]
    kt = op.Transpose(op.Cast(k_cache, to=FLOAT), perm=[0, 1, 3, 2])    # [B, Hkv, Dh, L]
    scores = op.Mul(op.MatMul(qg, kt), op.Constant(value_float=float(scale)))  # [B, Hkv, G, L]
    if softcap > 0:
        cap = op.Constant(value_float=float(softcap))
        scores = op.Mul(cap, op.Tanh(op.Div(scores, cap)))
    fill1 = op.Reshape(fill, _ints(-1))                                 # [1]
    lo = op.Max(starts, op.Constant(value_int=0))                       # [B]
    if window > 0:
        lo = op.Max(lo, op.Sub(fill1, op.Constant(value_int=window)))
    j = op.Range(op.Constant(value_int=0), op.Squeeze(op.Slice(shape_k, _ints(2), _ints(3))),
                 op.Constant(value_int=1))                              # [L]
    valid = op.And(op.GreaterOrEqual(j, op.Unsqueeze(lo, _ints(1))), op.Less(j, fill1))  # [B, L]
    valid = op.Unsqueeze(valid, _ints(1, 2))                            # [B, 1, 1, L]
    scores = op.Where(valid, scores, op.Constant(value_float=float("-inf")))
    top = op.ReduceMax(scores, _ints(-1), keepdims=1)                   # [B, Hkv, G, 1]
    top = op.Where(op.IsInf(top), op.Constant(value_float=0.0), top)    # empty rows: -inf
    e = op.Exp(op.Sub(scores, top))                                     # 0 at masked slots
    total = op.ReduceSum(e, _ints(-1), keepdims=1)
    p = op.Div(e, op.Where(op.Greater(total, op.Constant(value_float=0.0)), total,
                           op.Constant(value_float=1.0)))
    out = op.MatMul(p, op.Cast(v_cache, to=FLOAT))                      # [B, Hkv, G, Dh]
    return op.CastLike(op.Reshape(out, op.Shape(q)), q)
