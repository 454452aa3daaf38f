"""benchmarks.tasks end to end on a tiny random Qwen2 and tiny hand-written data (CPU, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import tasks as tasks_cli
from benchmarks.eval.report import read_generations

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tiny_model_folder(folder: Path) -> Path:
    """Byte-level BPE without merges (any text encodes), V = 259, two layers, random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = CHAT_TEMPLATE
    V = len(symbols) + len(SPECIALS)
    config = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         eos_token_id=V - 1, bos_token_id=None, pad_token_id=V - 3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # spread the logits so greedy decoding is not all ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tiny_data(root: Path) -> Path:
    """Three items per task in the real files' formats (hand-written, short prompts)."""
    _write_jsonl(root / "gsm8k" / "test.jsonl", [
        {"question": f"Tom has {n} apples and buys 2 more. How many apples does he have?",
         "answer": f"{n} + 2 = {n + 2}\n#### {n + 2}"} for n in (3, 5, 7)])
    _write_jsonl(root / "gsm8k" / "cot_fewshot.jsonl", [
        {"question": "Ann has 1 pen and gets 1 more. How many pens?",
         "target": "1 + 1 = 2. The answer is 2."}])
    _write_jsonl(root / "ifeval" / "input_data.jsonl", [
        {"key": 1, "prompt": "Say hi without commas.", "instruction_id_list":
            ["punctuation:no_comma"], "kwargs": [{}]},
        {"key": 2, "prompt": "Answer in lowercase only.", "instruction_id_list":
            ["change_case:english_lowercase", "punctuation:no_comma"], "kwargs": [{}, {}]},
        {"key": 3, "prompt": "Use two bullets.", "instruction_id_list":
            ["detectable_format:number_bullet_lists"], "kwargs": [{"num_bullets": 2}]}])
    mmlu = [{"question_id": i, "question": f"Pick option {i}?", "options": ["x", "y", "z", "N/A"],
             "answer": "B", "answer_index": 1, "category": cat, "src": "hand",
             "cot_content": "A: Let's think step by step. It is y. The answer is (B)."}
            for i, cat in enumerate(["math", "law", "math", "law"])]
    _write_jsonl(root / "mmlu_pro" / "test.jsonl", [{**r, "cot_content": ""} for r in mmlu])
    _write_jsonl(root / "mmlu_pro" / "validation.jsonl",
                 [{**r, "question_id": 100 + r["question_id"]} for r in mmlu])
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tasks")
    return _tiny_model_folder(root / "model"), _tiny_data(root / "data")


def _heads() -> list[str]:
    try:
        import fh_compile.build_assets  # noqa: F401
        import fh_compile.head  # noqa: F401
    except ImportError:  # FlashHead pieces not there yet: run the dense head only
        return ["dense"]
    return ["dense", "flashhead"]


def test_tasks_end_to_end(setup: tuple[Path, Path], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lm_eval", reason="IFEval scoring needs the eval extra (lm-eval)")
    model, data = setup
    out = tmp_path / "tasks.json"
    heads = _heads()
    argv = ["--model", str(model), "--data-dir", str(data), "--limit", "2", "--batch-size", "2",
            "--max-new-tokens", "6", "--device", "cpu", "--probes", "4", "--out", str(out),
            "--heads", *heads, "--assets", str(tmp_path / "assets")]
    assert tasks_cli.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["task"], r["metric"]) for r in rows} == {
        ("gsm8k", "exact_match"), ("gsm8k", "strict_match"), ("mmlu_pro", "accuracy"),
        *(("ifeval", m) for m in ("prompt_level_strict", "inst_level_strict",
                                   "prompt_level_loose", "inst_level_loose"))}
    for r in rows:
        assert r["model"] == str(model) and r["date"] and "benchmarks.tasks" in r["command"]
        assert r["n_items"] == 2 and r["subset"] and r["device"].startswith("cpu")
        for h in heads:
            assert 0.0 <= r[h]["acc"] <= 1.0 and r[h]["ci95"][0] <= r[h]["acc"] <= r[h]["ci95"][1]
        assert (r["paired"] is not None) == (len(heads) == 2)
    inst = next(r for r in rows if r["metric"] == "inst_level_strict")
    assert inst["dense"]["n"] == 3 and inst["unit"] == "instructions"   # 1 + 2 instructions
    mmlu = next(r for r in rows if r["task"] == "mmlu_pro")
    assert "2 per category" not in mmlu["subset"] and "seed 0" in mmlu["subset"]
    header, gens = read_generations(tmp_path / "generations" / "mmlu_pro.jsonl")
    assert header["n_items"] == 2 and len(gens) == 2 * len(heads)
    assert {g["item"]["category"] for g in gens} == {"law", "math"}   # round-robin subset
    assert all(g["n_new_tokens"] <= 6 for g in gens)
    if len(heads) == 2:
        assert header["flashhead_config"]["probes"] == 4
        assert (tmp_path / "assets" / "flashhead.json").is_file()
    assert "McNemar" in capsys.readouterr().out

    # Re-scoring the saved generations on CPU gives the same rows.
    before = {(r["task"], r["metric"]): r["dense"] for r in rows}
    out2 = tmp_path / "rescored.json"
    files = [str(tmp_path / "generations" / f"{t}.jsonl") for t in ("gsm8k", "ifeval", "mmlu_pro")]
    assert tasks_cli.main(["--score-only", *files, "--out", str(out2),
                           "--data-dir", str(data)]) == 0
    after = {(r["task"], r["metric"]): r["dense"] for r in json.loads(out2.read_text())["rows"]}
    assert after == before

    # --resume with the same settings generates nothing new and keeps the rows.
    assert tasks_cli.main([*argv, "--resume", "--tasks", "gsm8k"]) == 0
    _, gens = read_generations(tmp_path / "generations" / "gsm8k.jsonl")
    assert len(gens) == 2 * len(heads)
