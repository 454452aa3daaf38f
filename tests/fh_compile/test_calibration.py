"""Calibration text and hidden states (tiny random model): sampled conversations, the standard
library's docstrings, hidden states equal to the LM head's input, save/load."""

import pytest
import torch

import tiny_models
from fh_compile import calibration as cal
from fh_compile.loading import lm_head_of


@pytest.fixture(scope="module")
def tiny():
    return tiny_models.tiny_model(tied=False).eval(), tiny_models.tiny_tokenizer()


def test_user_prefix_is_the_template_up_to_the_content(tiny):
    _, tok = tiny
    assert tok.decode(cal.user_prefix(tok)) == "<|im_start|>user\n"


def test_self_chat_chat_and_plain(tiny):
    model, tok = tiny
    stop = cal.stop_ids(model, tok)
    assert stop == [tok.convert_tokens_to_ids("<|im_end|>")]
    chats = cal.self_chat(model, tok, cal.SelfChatConfig(conversations=5, batch=3, user_tokens=6,
                                                         answer_tokens=8), stop)
    assert len(chats) == 5 and all(set(c) == {"user", "assistant"} and c["user"] for c in chats)
    plain = cal.self_chat(model, tok, cal.SelfChatConfig(conversations=2, batch=2, user_tokens=3,
                                                         answer_tokens=3, prompt_format="plain"), stop)
    assert len(plain) == 2 and all(set(c) == {"text"} for c in plain)
    with pytest.raises(ValueError, match="prompt_format"):
        cal.SelfChatConfig(prompt_format="raw")


def test_stdlib_docs():
    docs = cal.stdlib_docs(min_chars=300, seed=1)
    assert len(docs) > 300 and docs == cal.stdlib_docs(min_chars=300, seed=1)
    assert all(len(d["assistant"]) >= 300 for d in docs)
    names = {d["user"].split("(")[0] for d in docs}
    assert "json" in names and any(n.startswith("json.") for n in names)
    assert not any(n.split(".")[0] in cal._SKIP_MODULES for n in names)


def test_hidden_states_are_the_lm_head_input(tiny):
    model, tok = tiny
    texts = [{"user": "os.path.join(a, *p)", "assistant": "Join two or more pathname components."},
             {"user": "json.dumps(obj)", "assistant": "Serialize obj to a JSON formatted str."}]
    h, used = cal.hidden_states(model, tok, texts)
    ids = [cal.text_ids(tok, t) for t in texts]
    skip = next(j for j in range(len(ids[0])) if ids[0][j] != ids[1][j])   # shared prefix
    assert used == 2 and h.shape[0] == sum(len(i) - skip for i in ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[1]])).logits[0]
    n1 = len(ids[1]) - skip
    with torch.no_grad():
        torch.testing.assert_close(lm_head_of(model)(h[-n1:]), logits[skip - 1:-1])
    cut, used = cal.hidden_states(model, tok, texts, max_positions=5)
    assert cut.shape[0] == 5 and used == 1
    plain, _ = cal.hidden_states(model, tok, texts, prompt_format="plain")
    assert plain.shape[0] < h.shape[0]                                  # no template tokens


def test_save_and_load(tmp_path):
    h = torch.randn(7, 4, dtype=torch.bfloat16)
    cal.save(tmp_path / "c", [{"text": "a"}], h, {"source": "test"})
    got, meta = cal.load_hidden(tmp_path / "c")
    assert torch.equal(got, h) and meta == {"source": "test"}
    assert (tmp_path / "c" / cal.TEXT_FILE).read_text() == '{"text": "a"}\n'
    with pytest.raises(FileNotFoundError, match="python -m fh_compile.calibration"):
        cal.load_hidden(tmp_path / "missing")
