"""`python -m export.run` on a tiny random Qwen2 (in-process main()): torch.export programs saved,
reloaded and compared with the eager model; one FlashHead node per graph; ONNX head and decode
step in onnxruntime against PyTorch; the manifest; an existing --out refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import custom_ops  # noqa: F401  registers the op before torch.export.load
from export.manifest import load_manifest
from export.modules import new_state
from export.programs import (Prompt, custom_op_counts, eager_tokens, flashhead_node_count,
                             greedy_tokens)
from export.run import main
from tests.export.export_fixtures import BATCH, K, MAX_SEQ_LEN, PROBES, tiny_step

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path, Path, int]:
    folder, assets = tiny_checkpoint
    out = tmp_path_factory.mktemp("export") / "out"
    rc = main(["--model", str(folder), "--out", str(out), "--assets", str(assets),
               "--probes", str(PROBES), "--k", str(K), "--batch", str(BATCH),
               "--max-seq-len", str(MAX_SEQ_LEN), "--onnx"])
    return folder, assets, out, rc


def test_run_writes_verified_artifacts(exported):
    _, assets, out, rc = exported
    assert rc == 0
    manifest = load_manifest(out)
    assert manifest["verified"] is True
    names = {a["name"]: a for a in manifest["artifacts"]}
    assert set(names) == {"prefill", "decode", "head.onnx", "decode.onnx"}
    for a in names.values():
        assert (out / a["path"]).is_file()
        assert a["verification"]["status"] == "passed", a["verification"]["detail"]
        assert a["flashhead_nodes"] == 1
    assert manifest["assets"]["fingerprint"] == json.loads(
        (assets / "flashhead.json").read_text())["fingerprint"]
    assert {"torch", "transformers", "onnx", "onnxruntime", "onnxscript"} <= set(
        manifest["versions"])
    prefill = {i["name"]: i for i in names["prefill"]["inputs"]}
    assert prefill["input_ids"]["shape"] == [BATCH, "T"]
    assert manifest["settings"]["probes"] == PROBES and manifest["settings"]["k"] == K


def test_saved_programs_hold_one_flashhead_node(exported):
    out = exported[2]
    for name in ("prefill", "decode"):
        program = torch.export.load(out / f"{name}.pt2")
        assert flashhead_node_count(program) == 1
        counts = custom_op_counts(program)
        assert counts.pop("flashhead::topk") == 1
        if name == "decode":   # the fast forward: one node per custom op call, 2 layers
            assert counts == {"flashhead::rms_norm_linear_ws": 4,
                              "flashhead::rope_decode_attention": 2,
                              "flashhead::act_linear_ws": 4}
        else:                  # prefill runs the fast forward's plain-PyTorch path
            assert counts == {}


def test_programs_and_onnx_models_carry_the_always_ids(exported):
    """The tiny model's eos id (config.eos_token_id = V - 1) is scored at every step: each
    program's FlashHead node takes the head's always ids and rows, the ONNX models hold the rows."""
    from onnx import load, numpy_helper

    folder, assets, out, _ = exported
    head = tiny_step(folder, assets).head
    assert head.always_ids == (head.out_features - 1,)
    for name in ("prefill", "decode"):
        program = torch.export.load(out / f"{name}.pt2")
        node = next(n for n in program.graph.nodes if n.target is torch.ops.flashhead.topk.default)
        buffers = program.graph_signature.inputs_to_buffers
        held = [program.state_dict[buffers[arg.name]] for arg in node.args[9:11]]
        assert torch.equal(held[0], head.fh_always_ids) and torch.equal(held[1], head.fh_always_rows)
    for name in ("head.onnx", "decode.onnx"):
        rows = [numpy_helper.to_array(t) for t in load(out / name).graph.initializer
                if t.name.endswith("fh_always_rows")]
        assert len(rows) == 1 and rows[0].tolist() == head.fh_always_rows.tolist()


@pytest.mark.parametrize("length", [1, 5, MAX_SEQ_LEN - 7])
def test_loaded_programs_reproduce_eager_tokens(exported, length):
    folder, assets, out, _ = exported
    step = tiny_step(folder, assets)
    prompt = Prompt.make(BATCH, length, step.model.config.vocab_size, "cpu", seed=length)
    steps = min(6, MAX_SEQ_LEN - length - 1)
    prefill = torch.export.load(out / "prefill.pt2").module()
    decode = torch.export.load(out / "decode.pt2").module()
    got = greedy_tokens(prefill, decode, new_state(step), prompt, steps)
    assert torch.equal(got, eager_tokens(step, prompt, steps))


def test_onnx_head_and_decode_agree_with_pytorch(exported):
    folder, assets, out, _ = exported
    step = tiny_step(folder, assets)
    # The head alone, on hidden states of a fresh prompt.
    h = step.prefill_hidden(Prompt.make(BATCH, 6, step.model.config.vocab_size, "cpu", seed=7).input_ids)
    sess = ort.InferenceSession(str(out / "head.onnx"), providers=["CPUExecutionProvider"])
    ids, logits = sess.run(["ids", "logits"], {"h": h.numpy()})
    ref = step.head.topk(h, K)
    np.testing.assert_array_equal(ids, ref.ids.numpy())
    np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=1e-4, atol=1e-4)
    # The decode step, from an empty state, token by token.
    sess = ort.InferenceSession(str(out / "decode.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()][1:]
    # the ONNX step runs plain PyTorch ops: the Triton kernels' counters are no part of its state
    state = {n: t.numpy() for n, t in new_state(step).items() if n != "counters"}
    assert set(names) == set(state)
    step.reset()
    token = torch.tensor([[3], [4]])
    for _ in range(10):
        with torch.no_grad():
            ref = step(token)
        out_ids, out_logits, *new = sess.run(None, {"input_ids": token.numpy(), **state})
        state = dict(zip(names, new))
        np.testing.assert_array_equal(out_ids, ref.ids.numpy())
        np.testing.assert_allclose(out_logits, ref.logits.numpy(), rtol=1e-3, atol=2e-3)
        token = ref.ids[:, :1]


def test_existing_out_is_refused(exported, capsys):
    folder, assets, out, _ = exported
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc = main(["--model", str(folder), "--out", str(out), "--assets", str(assets)])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
