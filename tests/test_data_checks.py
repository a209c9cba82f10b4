"""Input the data check refuses with file:line before any model is built (issue 26 items 6-8, issue 23 item 7):
non-finite numbers, duplicate keys, over-long records, invalid UTF-8, deep nesting, unusable ground truths, and
a validation split larger than the data."""

from __future__ import annotations

import json
import math
import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aesl_lightning.data.datamodule import PromptDataModule, SFTDataModule
from aesl_lightning.data.formats import DataFormatError, load_prompt_examples, load_sft_examples

GOOD = '{"question": "What is 2 + 2?", "answer": "4"}'


def _jsonl(path, *lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_answers_are_refused_with_file_and_line(tmp_path, number):
    path = _jsonl(tmp_path / "rl.jsonl", GOOD, '{"question": "q", "answer": %s}' % number)
    with pytest.raises(DataFormatError, match=r"rl\.jsonl:2: refused JSON: .*(not a JSON number|overflows)"):
        load_prompt_examples(path)
    array = tmp_path / "rl.json"
    array.write_text("[%s,\n %s]" % (GOOD, '{"question": "q", "answer": %s}' % number))
    with pytest.raises(DataFormatError, match=r"rl\.json: refused JSON"):
        load_prompt_examples(str(array))


def test_non_finite_numbers_from_parquet_are_refused_by_field(tmp_path):
    path = tmp_path / "rl.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": 4.0}, {"question": "q", "answer": math.nan}]), path)
    with pytest.raises(DataFormatError, match=r"rl\.parquet\[1\]: field 'answer': expected a finite number"):
        load_prompt_examples(str(path))


def test_a_key_given_twice_is_refused_not_silently_overwritten(tmp_path):
    path = _jsonl(tmp_path / "sft.jsonl", '{"prompt": "p", "completion": "c"}',
                  '{"prompt": "2 + 2?", "completion": "RIGHT", "completion": "WRONG", "answer": 4}')
    with pytest.raises(DataFormatError, match=r"sft\.jsonl:2: refused JSON: key 'completion' appears twice"):
        load_sft_examples(path)


def test_an_over_long_record_is_refused_fast_before_tokenising(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        f.write('{"prompt": "p", "completion": "c"}\n{"prompt": "p", "completion": "' + "x" * 50_000_000 + '"}\n')
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(DataFormatError) as error:
            load_sft_examples(str(path))
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(error.value)
    assert f"{path}:2: record longer than 1,000,000 characters" in message and "AESL_MAX_RECORD_CHARS" in message
    assert peak < 20_000_000 and elapsed < 5.0, (peak, elapsed)  # read up to the cap, never the 50 MB line


def test_the_record_limit_is_raised_by_the_environment_and_bounds_every_format(tmp_path, monkeypatch):
    monkeypatch.setenv("AESL_MAX_RECORD_CHARS", "1000")
    line = json.dumps({"prompt": "p", "completion": "y" * 2000})
    with pytest.raises(DataFormatError, match=r"a\.jsonl:1: record longer than 1,000 characters"):
        load_sft_examples(_jsonl(tmp_path / "a.jsonl", line))
    array = tmp_path / "a.json"
    array.write_text("[" + line + "]")
    with pytest.raises(DataFormatError, match=r"a\.json\[0\]: record longer than 1,000 characters"):
        load_sft_examples(str(array))
    monkeypatch.setenv("AESL_MAX_RECORD_CHARS", "5000")
    assert len(load_sft_examples(str(array))[0].completion) == 2000


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    from aesl_lightning.data.jsonl import invalid_utf8_line

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xc3\xa9", "completion": "b"}\n'
                     b'{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl:3: byte 89 of the file: not valid UTF-8"):
        load_sft_examples(str(path))
    array = tmp_path / "latin1.json"
    array.write_bytes(b'[\n{"prompt": "caf\xe9", "completion": "b"}]')
    with pytest.raises(DataFormatError, match=r"latin1\.json:2: byte 17 of the file: not valid UTF-8"):
        load_sft_examples(str(array))
    # a character split between two chunks is valid; the line count carries across chunks
    assert invalid_utf8_line(path, chunk_bytes=3) == (3, 89)
    valid = tmp_path / "ok.jsonl"
    valid.write_bytes("é\nüé€\n".encode() * 5)
    assert invalid_utf8_line(valid, chunk_bytes=3) is None


def test_deeply_nested_json_is_a_clear_error_not_a_recursion_traceback(tmp_path):
    deep = '{"prompt": "p", "completion": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(DataFormatError, match=r"deep\.jsonl:2: JSON nested too deeply"):
        load_sft_examples(_jsonl(tmp_path / "deep.jsonl", '{"prompt": "p", "completion": "c"}', deep))
    array = tmp_path / "deep.json"
    array.write_text("[" + deep + "]")
    with pytest.raises(DataFormatError, match=r"deep\.json: JSON nested too deeply"):
        load_sft_examples(str(array))


@pytest.mark.parametrize("answer, shown", [("1" * 10_000, "1111"), ("4\x07", "\\x07"), ("4\r2", "\\r")],
                         ids=["10000-characters", "bell", "carriage-return"])
def test_ground_truths_the_reward_cannot_use_are_refused_when_the_data_loads(tmp_path, answer, shown):
    path = _jsonl(tmp_path / "rl.jsonl", GOOD, json.dumps({"question": "q", "answer": answer}))
    with pytest.raises(DataFormatError) as error:
        PromptDataModule(train=path, val_size=0)  # the constructor checks, before any model or tokenizer
    message = str(error.value)
    assert f"{path}:2: field 'answer': expected an answer the math reward can check" in message and shown in message
    sft = _jsonl(tmp_path / "sft.jsonl", json.dumps({"prompt": "q", "completion": "c", "answer": answer}))
    with pytest.raises(DataFormatError, match=r"sft\.jsonl:1: field 'answer'"):
        SFTDataModule(train=sft, val_size=0)


def test_too_few_examples_for_the_held_out_split_is_an_error_naming_the_option(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}", "completion": "c"}) for i in range(8)]
    path = _jsonl(tmp_path / "small.jsonl", *lines)
    with pytest.raises(DataFormatError) as error:
        SFTDataModule.validate_sources(train=path, val=None, val_size=32)  # what the CLI calls before the model
    message = str(error.value)
    assert "data.val_size=32" in message and f"data.train ({path}) has 8 examples" in message
    with pytest.raises(DataFormatError, match=r"data\.val_size=32"):
        SFTDataModule(train=path)  # the default val_size, refused in the constructor
    SFTDataModule.validate_sources(train=path, val=path, val_size=32)  # a validation file of its own: nothing held out
    prompts = _jsonl(tmp_path / "p.jsonl", *[GOOD] * 5)
    with pytest.raises(DataFormatError, match=r"data\.val_size=3, data\.test_size=2: .* has 5 examples"):
        PromptDataModule.validate_sources(train=prompts, val_size=3, test_size=2)
    PromptDataModule.validate_sources(train=prompts, val_size=3, test_size=1)


def test_the_cli_reports_a_too_small_training_file_before_building_the_model(tmp_path, capsys, monkeypatch):
    from aesl_lightning.cli import main

    monkeypatch.delenv("AESL_DEBUG", raising=False)
    lines = [json.dumps({"prompt": f"q{i}", "completion": "c"}) for i in range(8)]
    path = _jsonl(tmp_path / "small.jsonl", *lines)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data.train", path, "--model.name_or_path", str(tmp_path / "no-such-model"),
              "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: data.val_size=32: data.train ({path}) has 8 examples"), err  # before the model path
