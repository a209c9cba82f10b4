"""Reading and normalising TRL-format records, and the errors that point at the bad line and field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aesl_lightning.data.formats import (
    DataFormatError,
    PromptExample,
    SFTExample,
    load_prompt_examples,
    load_records,
    load_sft_examples,
    normalize_answer,
)
from aesl_lightning.data.synthetic import ArithmeticConfig


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5"},
]


def test_jsonl_prompt_completion_and_messages(tmp_path):
    path = write_lines(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "What is 2 + 3?", "completion": "5", "answer": 5, "level": "easy"},
            "",  # blank lines are skipped but still counted for line numbers
            {"messages": CONVERSATION, "id": 7},
            {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]},
        ],
    )
    first, second, third = load_sft_examples(str(path))
    assert first == SFTExample(prompt="What is 2 + 3?", completion="5", source=f"{path}:1", answer="5", extra={"level": "easy"})
    assert second == SFTExample(prompt=CONVERSATION[:2], completion="2 + 3 = 5", source=f"{path}:3", extra={"id": 7})
    assert third == SFTExample(prompt=[{"role": "user", "content": "Hi"}], completion="Hello", source=f"{path}:4")


def test_json_array_and_parquet(tmp_path):
    rows = [{"prompt": "a?", "completion": "b"}, {"prompt": "c?", "completion": "d"}]
    json_path = tmp_path / "sft.json"
    json_path.write_text(json.dumps(rows))
    parquet_path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)
    for path in (json_path, parquet_path):
        examples = load_sft_examples(str(path))
        assert [(e.prompt, e.completion) for e in examples] == [("a?", "b"), ("c?", "d")]
        assert examples[1].source == f"{path}[1]"


def test_parquet_conversations(tmp_path):
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CONVERSATION}]), path)
    (example,) = load_sft_examples(str(path))
    assert example.prompt == CONVERSATION[:2] and example.completion == "2 + 3 = 5"


def test_prompt_records_accept_prompt_problem_question_and_keep_columns(tmp_path):
    path = write_lines(
        tmp_path / "rl.jsonl",
        [
            {"prompt": "p", "answer": "7", "difficulty": 2},
            {"problem": "q", "answer": 42},
            {"question": "Natalia sold clips...", "answer": "She sold 1,000 + 234 = 1,234 clips.\n#### 1,234"},
            {"prompt": [{"role": "user", "content": "r"}], "answer": 3.0},
        ],
    )
    a, b, c, d = load_prompt_examples(str(path))
    assert a == PromptExample(prompt="p", answer="7", source=f"{path}:1", extra={"difficulty": 2})
    assert (b.prompt, b.answer) == ("q", "42")
    assert c.answer == "1234" and c.extra["solution"] == "She sold 1,000 + 234 = 1,234 clips."
    assert d.prompt == [{"role": "user", "content": "r"}] and d.answer == "3"


@pytest.mark.parametrize(
    "value, expected",
    [("#### 1,234", "1234"), ("steps\n#### -5", "-5"), (" 12 ", "12"), (7, "7"), (2.5, "2.5"), ("1,5", "1,5"), ("x #### 3.5", "3.5")],
)
def test_normalize_answer(value, expected):
    assert normalize_answer(value, "here")[0] == expected


def test_synthetic_source_gives_records_with_answers():
    examples = load_sft_examples("synthetic", synthetic=ArithmeticConfig(num_examples=12, seed=4))
    assert len(examples) == 12
    assert all(e.completion.endswith(f"\\boxed{{{e.answer}}}") for e in examples)
    assert examples[0].source == "synthetic[train][0]"
    prompts = load_prompt_examples("synthetic", synthetic=ArithmeticConfig(num_examples=12, seed=4))
    assert [p.answer for p in prompts] == [e.answer for e in examples]
    assert "completion" in prompts[0].extra  # other columns travel along (reward kwargs)


GOOD = {"prompt": "What is 1 + 1?", "completion": "2"}
BAD_SFT_LINES = [
    # (bad line, fragments the message must contain besides file name and line number)
    ('{"prompt": "x", "completion": ', ["invalid JSON"]),
    ('["prompt", "completion"]', ["JSON object", "list"]),
    ({"prompt": "x"}, ["'completion'", "missing"]),
    ({"completion": "x"}, ["'prompt'", "missing"]),
    ({"prompt": "x", "completion": 5}, ["'completion'", "string", "int"]),
    ({"prompt": "x", "completion": "  "}, ["'completion'", "non-empty"]),
    ({"prompt": "", "completion": "y"}, ["'prompt'", "non-empty"]),
    ({"messages": CONVERSATION[:2]}, ["'messages'", "assistant", "'user'"]),
    ({"messages": [{"role": "user"}]}, ["'messages[0]'", "message"]),
    ({"messages": [{"role": "assistant", "content": "x"}]}, ["'messages'", "prompt message"]),
    ({"prompt": "x", "completion": [{"role": "user", "content": "y"}]}, ["'completion'", "assistant"]),
    ({"text": "free text"}, ["unknown", "'text'", "messages"]),
]


@pytest.mark.parametrize("bad, fragments", BAD_SFT_LINES, ids=[str(i) for i in range(len(BAD_SFT_LINES))])
def test_bad_sft_line_names_file_line_and_field(tmp_path, bad, fragments):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataFormatError) as error:
        load_sft_examples(str(path))
    message = str(error.value)
    assert "data.jsonl:3:" in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "bad, fragments",
    [
        ({"prompt": "x"}, ["'answer'", "missing"]),
        ({"question": "x", "answer": True}, ["'answer'", "bool"]),
        ({"question": "x", "answer": "steps ####"}, ["'answer'", "after '####'"]),
        ({"question": 3, "answer": "1"}, ["'question'", "int"]),
        ({"completion": "x", "answer": "1"}, ["unknown", "'problem'"]),
    ],
)
def test_bad_prompt_line_names_file_line_and_field(tmp_path, bad, fragments):
    path = write_lines(tmp_path / "rl.jsonl", [{"prompt": "p", "answer": "1"}, bad])
    with pytest.raises(DataFormatError) as error:
        load_prompt_examples(str(path))
    assert "rl.jsonl:2:" in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_json_and_parquet_errors_name_the_record_index(tmp_path):
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps([GOOD, {"prompt": "x", "completion": 7}]))
    with pytest.raises(DataFormatError, match=r"data\.json\[1\]: field 'completion': expected a string, found int 7"):
        load_sft_examples(str(json_path))
    parquet_path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "x", "completion": ""}]), parquet_path)
    with pytest.raises(DataFormatError, match=r"data\.parquet\[1\]: field 'completion'"):
        load_sft_examples(str(parquet_path))
    json_path.write_text(json.dumps({"data": [GOOD]}))
    with pytest.raises(DataFormatError, match=r"data\.json: expected a JSON array"):
        load_sft_examples(str(json_path))
    json_path.write_text('[{"prompt": "x",\n "completion": }]')
    with pytest.raises(DataFormatError, match=r"data\.json:2: invalid JSON"):
        load_sft_examples(str(json_path))


def test_empty_sources_unknown_extensions_and_missing_files(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: no examples"):
        load_sft_examples(str(empty))
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: no examples"):
        load_prompt_examples(str(empty))
    text = tmp_path / "data.txt"
    text.write_text("prompt,completion\n")
    with pytest.raises(DataFormatError, match=r"data\.txt: unknown file extension '\.txt'"):
        load_records(str(text))
    with pytest.raises(DataFormatError, match=r"missing\.jsonl: file not found"):
        load_records(str(tmp_path / "missing.jsonl"))
