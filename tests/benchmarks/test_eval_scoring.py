"""Answer extraction and scoring: GSM8K numbers, MMLU-Pro letters, IFEval's official checkers."""

from __future__ import annotations

import pytest

from benchmarks.eval import make_task
from benchmarks.eval.gsm8k import extract_answer, gold_answer, normalize_number, strict_answer
from benchmarks.eval.mmlu_pro import extract_letter, format_question, stratified_subset


@pytest.mark.parametrize("text, expected", [
    ("She makes 9 * 2 = 18 dollars. The answer is 18.", "18"),
    ("The answer is $1,234.", "1234"),
    ("Total is 5 + 7 = 12. The answer is -3.", "-3"),               # "The answer is" wins
    ("He loses money. The answer is $-40.", "-40"),
    ("the answer is: 2.50", "2.5"),
    ("The answer is 18.00 dollars", "18"),
    ("It costs 3.75 per cup, so 4 cups cost 15.0", "15"),            # last number, .0 dropped
    ("They were 1,000 then 2,500,000 in 2021", "2021"),
    ("The temperature fell to -7 degrees.", "-7"),
    ("I do not know.", None),
    ("", None),
])
def test_gsm8k_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_gsm8k_strict_and_gold() -> None:
    assert strict_answer("so 18 in all") is None
    assert strict_answer("The answer is 7.") == "7"
    assert gold_answer("16 - 3 - 4 = 9\n9 * 2 = 18\n#### 18") == "18"
    assert gold_answer("...\n#### 1,250") == "1250"
    assert normalize_number("$0.50") == "0.5" and normalize_number("-") is None
    task = make_task("gsm8k")
    item = {"answer": "x\n#### 18"}
    assert task.score(item, " 9 * 2 = 18. The answer is 18.\n") == {"exact_match": True,
                                                                   "strict_match": True}
    assert task.score(item, " 9 * 2 = 18") == {"exact_match": True, "strict_match": False}
    assert task.score(item, " The answer is 17. Then 18") == {"exact_match": False,
                                                               "strict_match": False}


@pytest.mark.parametrize("text, expected", [
    ("... so the answer is (C).", "C"),
    ("The answer is D", "D"),
    ("answer is (J) and not (A)", "J"),                              # first match of stage 1
    ("Final Answer: B\nanswer: C", "B"),                             # stage 2
    ("I think it must be option E overall", "E"),                    # last standalone letter
    ("Both (A) and (B) seem off; (H) fits.", "H"),
    ("Definitely Incorrect", None),                                  # capitals inside words only
    ("", None),
    ("the answer is (K)", None),                                     # K is not an option letter
])
def test_mmlu_pro_extract_letter(text: str, expected: str | None) -> None:
    assert extract_letter(text) == expected


def test_mmlu_pro_prompt_pieces_and_subset() -> None:
    ex = {"question": "Q?", "options": ["x", "y", "N/A"],
          "cot_content": "A: Let's think step by step. Because. The answer is (B)."}
    assert format_question(ex, with_answer=True) == (
        "Question:\nQ?\nOptions:\nA. x\nB. y\nAnswer: Let's think step by step. Because. "
        "The answer is (B).\n\n")
    assert format_question(ex, with_answer=False).endswith("B. y\nAnswer: Let's think step by step.")
    rows = [{"question_id": i, "category": c} for i, c in enumerate("aaaaabbbc")]
    sub = stratified_subset(rows, per_category=2, seed=3)
    assert [r["category"] for r in sub] == ["a", "b", "c", "a", "b"]
    assert sub == stratified_subset(rows, per_category=2, seed=3)      # seeded
    assert len(stratified_subset(rows, per_category=None, seed=0)) == 9
    assert make_task("mmlu_pro").score({"answer": "C"}, "the answer is (C)") == {"accuracy": True}
    assert make_task("mmlu_pro").score({"answer": "C"}, "no idea") == {"accuracy": False}


IFEVAL_ITEM = {"key": 7, "prompt": "Write two sentences about cats, all in lowercase, no commas.",
               "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"],
               "kwargs": [{}, {}]}


def test_ifeval_official_checkers_strict_and_loose() -> None:
    pytest.importorskip("lm_eval", reason="the IFEval checkers come from lm-eval (eval extra)")
    from benchmarks.eval.ifeval import follows

    assert follows(IFEVAL_ITEM, "cats purr. they nap all day.", loose=False) == [True, True]
    assert follows(IFEVAL_ITEM, "Cats purr, and nap.", loose=False) == [False, False]
    # Loose drops the first line (a typical "Sure, here it is:" preamble) before checking.
    reply = "Sure, Here you go:\ncats purr. they nap all day."
    assert follows(IFEVAL_ITEM, reply, loose=False) == [False, False]
    assert follows(IFEVAL_ITEM, reply, loose=True) == [True, True]
    # An empty response follows nothing.
    assert follows(IFEVAL_ITEM, "   ", loose=True) == [False, False]
    scores = make_task("ifeval").score(IFEVAL_ITEM, reply)
    assert scores == {"prompt_level_strict": False, "inst_level_strict": [False, False],
                      "prompt_level_loose": True, "inst_level_loose": [True, True]}


def test_ifeval_checker_with_kwargs() -> None:
    pytest.importorskip("lm_eval", reason="the IFEval checkers come from lm-eval (eval extra)")
    from benchmarks.eval.ifeval import follows

    item = {"key": 8, "prompt": "List things.", "instruction_id_list":
            ["detectable_format:number_bullet_lists", "startend:end_checker"],
            "kwargs": [{"num_bullets": 2}, {"end_phrase": "Is there anything else?"}]}
    good = "* one\n* two\nIs there anything else?"
    assert follows(item, good, loose=False) == [True, True]
    assert follows(item, "* one\nIs there anything else?", loose=False) == [False, True]


def test_ifeval_sentence_checker_uses_punkt() -> None:
    """length_constraints:number_sentences needs NLTK's punkt_tab (the shared nltk_data)."""
    pytest.importorskip("lm_eval", reason="the IFEval checkers come from lm-eval (eval extra)")
    import nltk

    from benchmarks.eval.ifeval import checkers

    checkers()
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        pytest.skip("NLTK punkt_tab not found (set NLTK_DATA or FH_EVAL_DATA)")
    from benchmarks.eval.ifeval import follows

    item = {"key": 9, "prompt": "Two sentences at most.", "instruction_id_list":
            ["length_constraints:number_sentences"],
            "kwargs": [{"relation": "less than", "num_sentences": 3}]}
    assert follows(item, "Dr. Smith went home. He slept at 3 p.m. today.", loose=False) == [True]
    assert follows(item, "One. Two. Three. Four.", loose=False) == [False]
