import shutil

import pytest
import torch

import tiny_models
from fh_compile.loading import (ModelLoadError, load_lm_head_weight, load_model, lm_head_of,
                                resolve_spec)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_folder_loads_and_head_matches(tmp_path, tied):
    folder = tiny_models.save_hf_folder(tmp_path / "m", tied=tied)
    model, tok = load_model(folder, dtype=torch.float32)
    head = lm_head_of(model)
    assert head.weight.shape == (len(tiny_models.vocab_tokens()), tiny_models.HIDDEN)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    w = load_lm_head_weight(folder)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, head.weight.detach(), rtol=0, atol=0)
    if tied:
        torch.testing.assert_close(w, model.get_input_embeddings().weight.detach(), rtol=0, atol=0)
    else:
        assert not torch.equal(w, model.get_input_embeddings().weight.detach())


def test_hf_folder_dtype(tiny_hf_untied):
    model, _ = load_model(tiny_hf_untied, dtype=torch.bfloat16)
    assert lm_head_of(model).weight.dtype == torch.bfloat16
    assert load_lm_head_weight(tiny_hf_untied, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_hf_folder_without_safetensors_falls_back_to_model(tiny_hf_untied, tmp_path):
    folder = tmp_path / "bin"
    shutil.copytree(tiny_hf_untied, folder)
    model, _ = load_model(folder, dtype=torch.float32)
    (folder / "model.safetensors").rename(folder / "other.bin.ignored")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    w = load_lm_head_weight(folder)
    torch.testing.assert_close(w, lm_head_of(model).weight.detach(), rtol=0, atol=0)


def test_gguf_head_row_order_matches_transformers(tiny_gguf, tmp_path):
    path, head = tiny_gguf
    w = load_lm_head_weight(path)
    torch.testing.assert_close(w, head, rtol=0, atol=0)
    model, tok = load_model(path, dtype=torch.float32, cache=False)
    torch.testing.assert_close(lm_head_of(model).weight.detach(), w, rtol=0, atol=0)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    # A folder holding exactly one .gguf resolves to it.
    assert resolve_spec(path.parent).gguf_file == path.name


def test_gguf_cache_roundtrip(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    cache = tmp_path / "cache"
    m1, t1 = load_model(path, dtype=torch.float32, cache_dir=cache)
    folders = list(cache.glob("tiny-qwen2-*/float32"))
    assert len(folders) == 1 and (folders[0] / "fh_cache.json").is_file()
    m2, t2 = load_model(path, dtype=torch.float32, cache_dir=cache)
    ids = torch.tensor([t1("the cat is in there").input_ids])
    assert ids.tolist() == [t2("the cat is in there").input_ids]
    with torch.no_grad():
        torch.testing.assert_close(m1(ids).logits, m2(ids).logits, rtol=0, atol=0)


def test_missing_path_raises(tmp_path):
    for spec in [tmp_path / "nope", "./nope-model", "/does/not/exist.gguf", "nope.gguf"]:
        with pytest.raises(ModelLoadError, match="does not exist"):
            load_model(spec)
        with pytest.raises(ModelLoadError, match="does not exist"):
            load_lm_head_weight(spec)


def test_folder_without_model_raises(tmp_path):
    with pytest.raises(ModelLoadError, match="neither config.json"):
        load_model(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="2 .gguf files"):
        load_model(tmp_path)


def test_unreachable_hub_id_raises(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="pass a local Hugging Face model folder or a .gguf"):
        load_model("fh-test-org/definitely-not-cached-model")
    with pytest.raises(ModelLoadError, match="pass a local"):
        load_lm_head_weight("fh-test-org/definitely-not-cached-model")


def test_lm_head_of_without_head():
    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ModelLoadError, match="no output embedding"):
        lm_head_of(NoHead())
