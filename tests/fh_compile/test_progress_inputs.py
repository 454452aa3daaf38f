"""generate takes a tokenizer's BatchEncoding or a dict as well as tensors (clear TypeError for
anything else); compile_model logs building / reusing assets with their folder and the first
compile of the decode step."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from fh_compile import compile_model, generate
from fh_compile.compile import CompiledDecoder
from tests.fh_compile.lm_fixtures import prompts, tiny_lm


@pytest.fixture(scope="module")
def eager_model():
    return tiny_lm()  # no compile_model: generate runs its eager loop


def test_batch_encoding_and_dict_equal_tensors(eager_model):
    from transformers import BatchEncoding

    ids, mask = prompts()                                   # [2, T], left padded
    ref = generate(eager_model, ids, mask, max_new_tokens=6)
    for enc in (BatchEncoding({"input_ids": ids, "attention_mask": mask}),
                {"input_ids": ids, "attention_mask": mask}):
        got = generate(eager_model, enc, max_new_tokens=6)
        assert torch.equal(got.sequences, ref.sequences), type(enc).__name__
    only_ids = generate(eager_model, {"input_ids": ids[1:, 4:]}, max_new_tokens=6)
    assert torch.equal(only_ids.sequences, generate(eager_model, ids[1:, 4:],
                                                    max_new_tokens=6).sequences)
    # a mask given beside a mapping without one is used
    with_arg = generate(eager_model, {"input_ids": ids}, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(with_arg.sequences, ref.sequences)


@pytest.mark.parametrize("bad, match", [
    ([[1, 2, 3]], "return_dict=True"),
    ({"ids": torch.ones(1, 3, dtype=torch.int64)}, "without 'input_ids'"),
    ({"input_ids": [[1, 2]]}, "got list"),
])
def test_other_inputs_raise_type_error(eager_model, bad, match):
    with pytest.raises(TypeError, match=match):
        generate(eager_model, bad, max_new_tokens=2)


def test_mask_given_twice_raises(eager_model):
    ids, mask = prompts()
    with pytest.raises(TypeError, match="passed twice"):
        generate(eager_model, {"input_ids": ids, "attention_mask": mask}, attention_mask=mask)


def test_compile_model_logs_asset_build_then_reuse(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fh_compile")
    small = {"coarse_iters": 2, "fine_iters": 2, "refine_iters": 1}
    compile_model(tiny_lm(), probes=4, k=8, mode=None, cache_dir=tmp_path,
                  build_kwargs=small)
    said = " | ".join(r.getMessage() for r in caplog.records if r.name == "fh_compile.compile")
    assert "clustering the [275, 64] LM head" in said and str(tmp_path) in said, said
    assert "built in" in said and "saved to" in said, said
    assert "compiling the decode step" not in said                  # mode=None: nothing compiles
    caplog.clear()
    model = compile_model(tiny_lm(), probes=4, k=8, mode=None, cache_dir=tmp_path,
                          build_kwargs=small)
    said = " | ".join(r.getMessage() for r in caplog.records if r.name == "fh_compile.compile")
    assert "reusing" in said and model.fh_compiled.info.assets_dir in said, said


def test_first_call_of_a_compiled_step_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="fh_compile")
    # Only what _timed reads: the compile mode (no torch.compile runs here).
    dec = CompiledDecoder(step=None, info=types.SimpleNamespace(mode="max-autotune"))
    fn = dec._timed(lambda t, f: (t + 1, f), "step")
    tokens, finished = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.bool)
    fn(tokens, finished)
    fn(tokens, finished)
    said = [r.getMessage() for r in caplog.records if r.name == "fh_compile.compile"]
    assert len(said) == 2, said                                     # the first call only
    assert "compiling the decode step (torch.compile mode=max-autotune)" in said[0]
    assert said[1].startswith("compiled the decode step in")
    assert "step" in dec.compile_seconds
