"""ONNX models (torch.onnx dynamo exporter) of the FlashHead head alone and of the decode step,
run in onnxruntime and compared with PyTorch.

FlashHead becomes standard ONNX ops through export.onnx_decomp (MatMul, TopK, Gather, ...), so any
ONNX runtime runs it.  Models are exported in fp32 from a CPU copy of the model: onnxruntime's CPU
provider has no bf16 arithmetic.  The decode model is functional (ONNX has no mutable inputs):
inputs input_ids [B, 1] and the state tensors, outputs ids, logits and `new_<name>` for each state
tensor, which the caller feeds back on the next call.  An empty state (zeros) starts a sequence;
feeding the prompt one token at a time fills the cache.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from export.manifest import Artifact, TensorInfo, Verification
from export.modules import DecodeFunctional, HeadTopK, new_state, state_names
from export.onnx_decomp import translation_table
from export.programs import Prompt, check_one_flashhead_node
from fh_compile.decode import DecodeStep

# fp32 tolerances of onnxruntime against PyTorch on the same fp32 weights: |got - ref| <= ATOL +
# RTOL * |ref|.  The head is one dot product per candidate; the whole model adds every layer's
# differently ordered reductions.
HEAD_TOL = (1e-4, 1e-4)
MODEL_TOL = (2e-3, 1e-3)


def providers(device: str) -> list[str]:
    """CUDA provider first when onnxruntime-gpu is installed and the export targets CUDA."""
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _to_onnx(program: torch.export.ExportedProgram, path: Path, inputs: list[str],
             outputs: list[str]) -> Path:
    onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=inputs,
                                     output_names=outputs,
                                     custom_translation_table=translation_table(), verbose=False)
    onnx_program.save(str(path))  # weights go to external data above 2 GB
    return path


def _session(path: Path, device: str):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=providers(device))


def _close(got: np.ndarray, ref: np.ndarray, tol: tuple[float, float]) -> float:
    """Largest |got - ref| - rtol * |ref| (<= atol means within tolerance), -inf entries equal."""
    atol, rtol = tol
    both_inf = np.isneginf(got) & np.isneginf(ref)
    with np.errstate(invalid="ignore"):  # -inf - -inf
        err = np.where(both_inf, 0.0, np.abs(got - ref) - rtol * np.abs(ref))
    return float(np.nan_to_num(err, nan=np.inf).max(initial=0.0)) if err.size else 0.0


def ids_agree(ref_ids: np.ndarray, ref_logits: np.ndarray, got_ids: np.ndarray,
              atol: float) -> bool:
    """Ids equal, except where two reference logits are within `atol` (a near tie that fp32
    rounding may order either way): such positions may hold each other's ids."""
    for r_ids, r_log, g_ids in zip(ref_ids, ref_logits, got_ids):
        for j in np.nonzero(r_ids != g_ids)[0]:
            near = np.abs(r_log - r_log[j]) <= atol
            if g_ids[j] not in set(r_ids[near].tolist()):
                return False
    return True


def export_head(head: torch.nn.Module, k: int, hidden: list[torch.Tensor], path: Path,
                device: str, verify: bool, softcap: float | None = None) -> Artifact:
    """The head alone: h [N, D] fp32 -> ids [N, k] int64, logits [N, k] fp32.  `hidden` are fp32
    CPU hidden states [N, D]: the first is the export example, all are compared."""
    t0 = time.perf_counter()
    module = HeadTopK(head, k, softcap).eval()
    with torch.no_grad():
        program = torch.export.export(module, (hidden[0],), strict=False)
    nodes = check_one_flashhead_node(program, "head")
    _to_onnx(program, path, ["h"], ["ids", "logits"])
    seconds = round(time.perf_counter() - t0, 2)
    N = hidden[0].shape[0]
    result = Verification("skipped", "--no-verify")
    if verify:
        sess, worst, agree = _session(path, device), 0.0, True
        for h in hidden:
            with torch.no_grad():
                ref_ids, ref_logits = (t.numpy() for t in module(h))
            got_ids, got_logits = sess.run(["ids", "logits"], {"h": h.numpy()})
            worst = max(worst, _close(got_logits, ref_logits, HEAD_TOL))
            agree &= ids_agree(ref_ids, ref_logits, got_ids, HEAD_TOL[0])
        ok = agree and worst <= HEAD_TOL[0]
        result = Verification(
            "passed" if ok else "failed",
            f"onnxruntime ({sess.get_providers()[0]}) vs PyTorch on {len(hidden)} batches of "
            f"model hidden states: ids {'equal' if agree else 'DIFFER'}, logits "
            f"{'within' if worst <= HEAD_TOL[0] else 'OUTSIDE'} atol={HEAD_TOL[0]} + "
            f"rtol={HEAD_TOL[1]}", {"max_excess_error": worst, "tolerance": list(HEAD_TOL)})
    D = hidden[0].shape[1]
    return Artifact("head.onnx", "onnx", path.name, [TensorInfo("h", [N, D], "float32")],
                    [TensorInfo("ids", [N, k], "int64"), TensorInfo("logits", [N, k], "float32")],
                    result, seconds, nodes, "cpu", ["fp32; FlashHead as standard ONNX ops"])


def export_decode(step: DecodeStep, path: Path, prompt: Prompt, steps: int, device: str,
                  verify: bool) -> Artifact:
    """The functional decode step of an fp32 CPU DecodeStep; verified token by token (teacher
    forced: the prompt, then the eager model's greedy tokens) against that step."""
    t0 = time.perf_counter()
    names = state_names(step)
    module = DecodeFunctional(step).eval()
    ids = torch.zeros(step.max_batch_size, 1, dtype=torch.int64)
    with torch.no_grad():
        program = torch.export.export(module, (ids, new_state(step)), strict=False)
    nodes = check_one_flashhead_node(program, "ONNX decode")
    _to_onnx(program, path, ["input_ids", *names], ["ids", "logits", *(f"new_{n}" for n in names)])
    seconds = round(time.perf_counter() - t0, 2)
    result = Verification("skipped", "--no-verify")
    if verify:
        result = _verify_decode(step, _session(path, device), names, prompt, steps)
    B, k = step.max_batch_size, step.k
    state = new_state(step, "meta")
    inputs = [TensorInfo.of("input_ids", ids)] + [TensorInfo.of(n, t) for n, t in state.items()]
    outputs = [TensorInfo("ids", [B, k], "int64"), TensorInfo("logits", [B, k], "float32")]
    outputs += [TensorInfo.of(f"new_{n}", t) for n, t in state.items()]
    return Artifact("decode.onnx", "onnx", path.name, inputs, outputs, result, seconds, nodes,
                    "cpu", ["fp32; functional: feed new_<state> back as <state>",
                            "start from zeros; feed the prompt one token per call"])


@torch.no_grad()
def _verify_decode(step: DecodeStep, sess, names: list[str], prompt: Prompt,
                   steps: int) -> Verification:
    step.reset()
    feed_state = {n: t.numpy() for n, t in new_state(step).items()}
    token = prompt.input_ids[:, :1].cpu()
    worst, agree, calls = 0.0, True, prompt.input_ids.shape[1] + steps
    for t in range(calls):
        ref = step(token)
        out = sess.run(None, {"input_ids": token.numpy(), **feed_state})
        feed_state = dict(zip(names, out[2:]))
        ref_ids, ref_logits = ref.ids.numpy(), ref.logits.numpy()
        worst = max(worst, _close(out[1], ref_logits, MODEL_TOL))
        agree &= ids_agree(ref_ids, ref_logits, out[0], MODEL_TOL[0])
        nxt = t + 1
        token = (prompt.input_ids[:, nxt:nxt + 1].cpu() if nxt < prompt.input_ids.shape[1]
                 else ref.ids[:, :1])
    ok = agree and worst <= MODEL_TOL[0]
    return Verification(
        "passed" if ok else "failed",
        f"onnxruntime ({sess.get_providers()[0]}) vs PyTorch fp32, {calls} decode calls (prompt "
        f"fed token by token, then greedy, teacher forced): ids {'equal' if agree else 'DIFFER'}, "
        f"logits {'within' if worst <= MODEL_TOL[0] else 'OUTSIDE'} atol={MODEL_TOL[0]} + "
        f"rtol={MODEL_TOL[1]}", {"max_excess_error": worst, "tolerance": list(MODEL_TOL)})
