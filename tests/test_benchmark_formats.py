"""Evaluation files in the shapes of MATH-500, AIME, AMC and GSM8K: read as prompts with answers, and
checked against typical correct / wrong completions with the same math checker the evaluation uses."""

import json

import pytest

from aesl_lightning.data import PromptDataModule
from aesl_lightning.scoring.rewards import math_accuracy
from aesl_lightning.infra.tiny import char_tokenizer

STYLES = {
    # MATH-500: problem / solution / LaTeX answer
    "math500.jsonl": (
        {"problem": "Compute 14/3 as a fraction.", "solution": "It is \\frac{14}{3}.", "answer": "\\frac{14}{3}",
         "subject": "Algebra", "level": 2, "unique_id": "test/algebra/1.json"},
        "So the result is \\boxed{\\dfrac{14}{3}}.", "\\boxed{4.5}",
    ),
    # AIME: integer answers stored as numbers
    "aime.jsonl": ({"id": 60, "problem": "Find the remainder ...", "answer": 204, "url": "x"}, "\\boxed{204}", "\\boxed{240}"),
    # AMC: float answers
    "amc.jsonl": ({"problem": "What is 3/4 of 36?", "answer": 27.0, "url": "x"}, "... \\boxed{27}", "\\boxed{26}"),
    # GSM8K: question, and the final answer after ####
    "gsm8k.jsonl": (
        {"question": "Tom has 1,200 apples and buys 34 more. How many?", "answer": "1200 + 34 = 1234\n#### 1,234"},
        "1200 + 34 = 1234, so \\boxed{1,234}", "\\boxed{1243}",
    ),
}


@pytest.mark.parametrize("name", list(STYLES))
def test_benchmark_style_files_load_and_score(tmp_path, name):
    record, right, wrong = STYLES[name]
    path = tmp_path / name
    path.write_text(json.dumps(record) + "\n")
    data = PromptDataModule(train=None, test=str(path), batch_size=1, max_prompt_length=400)
    data.attach_tokenizer(char_tokenizer())
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    question = record.get("problem") or record.get("question")
    assert batch["prompt"] == [question]
    assert batch["input_ids"].shape[0] == 1
    answer = batch["answer"][0]
    scores = math_accuracy(batch["prompt"] * 2, [right, wrong], answer=[answer, answer])
    assert scores == [1.0, 0.0], (answer, scores)
