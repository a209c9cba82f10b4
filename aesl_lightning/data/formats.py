"""Reading datasets in TRL's formats and normalising them into `SFTExample` / `PromptExample`.

Sources: a local `.jsonl`, `.json` (a JSON array of objects) or `.parquet` file, the word `"synthetic"`
(the built-in arithmetic task, `synthetic.py`), or anything else as a Hugging Face dataset name given to
`datasets.load_dataset` (`"name"` or `"name:config"`, e.g. `"openai/gsm8k:main"`).

Recognised records:

- SFT, standard prompt-completion:       `{"prompt": str, "completion": str}`
- SFT, conversational prompt-completion: `{"prompt": [messages], "completion": [one assistant message]}`
- SFT, conversational language modelling: `{"messages": [messages]}`: the last message must come from the
  assistant and is the completion; everything before it is the prompt.
- RL / evaluation: `{"prompt" | "problem" | "question": str or [messages], "answer": str | int | float}`.
  A GSM8K answer `"... #### 1,234"` becomes `"1234"`, and the text before `####` is kept as `solution`.

Every other column is kept in `extra` (TRL hands such columns to reward functions as keyword arguments).
Every problem raises `DataFormatError` naming where (`data.jsonl:7` for line 7 of a JSONL file,
`data.json[3]` for the record at index 3 of a JSON array, Parquet file or Hugging Face split), the field,
what was expected and what was found.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aesl_lightning.scoring.answers import GOLD_CHARS, gold_reason
from aesl_lightning.data.jsonl import RECORD_CHARS_ENV, capped_lines, invalid_utf8_line, max_record_chars, strict_json
from aesl_lightning.data.synthetic import ArithmeticConfig, disjoint_splits

Messages = list[dict[str, str]]

LOCAL_FORMATS = (".jsonl", ".json", ".parquet")
PROMPT_KEYS = ("prompt", "problem", "question")
SYNTHETIC = "synthetic"


class DataFormatError(ValueError):
    """A dataset record or file that does not match the expected format; the message says where and why."""


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: the model is trained on `completion` given `prompt`.

    `prompt` is plain text (wrapped as a user message when the tokenizer has a chat template) or a list
    of chat messages `{"role", "content"}`; `completion` is the assistant's reply text. `source` says where
    the record came from (`data.jsonl:7`); `answer` is the ground truth when the record has one (used to
    score greedy generations on validation prompts); `extra` holds the record's other columns.
    """

    prompt: str | Messages
    completion: str
    source: str
    answer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptExample:
    """One RL / evaluation example: a prompt to generate from and the answer that a verifier checks.

    `extra` holds the record's other columns, plus `solution` for GSM8K-style answers.
    """

    prompt: str | Messages
    answer: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Reading records


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _invalid_utf8(path: Path) -> DataFormatError:
    where = invalid_utf8_line(path)
    at = f":{where[0]}: byte {where[1]} of the file" if where else ""
    return DataFormatError(f"{path}{at}: not valid UTF-8; save the file as UTF-8")


def _too_deep(where: str) -> DataFormatError:
    return DataFormatError(f"{where}: JSON nested too deeply to read (thousands of brackets); expected a flat record")


def _too_long(where: str, limit: int) -> DataFormatError:
    return DataFormatError(
        f"{where}: record longer than {limit:,} characters, refused before tokenising; set the environment variable "
        f"{RECORD_CHARS_ENV} to a larger number of characters to read it"
    )


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    records = []
    limit = max_record_chars()
    lines = capped_lines(path, limit)
    while True:
        try:
            number, line = next(lines, (0, ""))
        except UnicodeDecodeError:
            raise _invalid_utf8(path) from None
        if not number:
            return records
        where = f"{path}:{number}"
        if line is None:
            raise _too_long(where, limit)
        if not line.strip():
            continue  # blank lines (often a trailing one) carry no record
        try:
            record = strict_json(line)  # one line, so the error's column is on this line
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{where}: invalid JSON: {error.msg} at column {error.colno}; expected one JSON object per line") from None
        except RecursionError:
            raise _too_deep(where) from None
        except ValueError as error:  # StrictJSONError, or an integer with more digits than Python converts
            raise DataFormatError(f"{where}: refused JSON: {error}") from None
        if not isinstance(record, dict):
            raise DataFormatError(f"{where}: expected a JSON object per line, found {_describe(record)}")
        records.append((where, record))


def _read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _invalid_utf8(path) from None
    try:
        data = strict_json(text)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}:{error.lineno}: invalid JSON: {error.msg} at column {error.colno}") from None
    except RecursionError:
        raise _too_deep(str(path)) from None
    except ValueError as error:
        raise DataFormatError(f"{path}: refused JSON: {error}") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON array of objects (for one object per line use .jsonl), found {type(data).__name__}")
    records = []
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}[{index}]: expected a JSON object, found {_describe(record)}")
        records.append((f"{path}[{index}]", record))
    return records


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [(f"{path}[{index}]", row) for index, row in enumerate(rows)]


def _read_hub(name: str, split: str) -> list[tuple[str, dict]]:
    import datasets

    repo, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(repo, config or None, split=split)
    except Exception as error:  # noqa: BLE001 - any failure means the same thing to the user: this name is not loadable
        raise DataFormatError(
            f"{name}: not a local {'/'.join(LOCAL_FORMATS)} file, not 'synthetic', and not loadable as a Hugging Face dataset "
            f"(split={split!r}): {type(error).__name__}: {error}"
        ) from error
    return [(f"{name}[{split}][{index}]", dict(row)) for index, row in enumerate(dataset)]


def load_records(source: str, split: str = "train", synthetic: ArithmeticConfig | None = None) -> list[tuple[str, dict]]:
    """The raw records of `source` as `(where, record)` pairs, `where` naming the file and line or index.

    `split` selects the split of a Hugging Face dataset; `synthetic` configures the `"synthetic"` source
    (default `ArithmeticConfig()`), whose records are `generate_arithmetic(synthetic)`.
    """
    if source == SYNTHETIC:
        config = synthetic or ArithmeticConfig()
        return synthetic_records(config, {"train": config.num_examples})["train"]
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise DataFormatError(f"{source}: file not found")
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}[suffix]
        return reader(path)
    if path.is_file():
        raise DataFormatError(f"{source}: unknown file extension {path.suffix!r}; expected one of {', '.join(LOCAL_FORMATS)}")
    return _read_hub(source, split)


def synthetic_records(config: ArithmeticConfig, sizes: Mapping[str, int]) -> dict[str, list[tuple[str, dict]]]:
    """Disjoint synthetic splits (see `synthetic.disjoint_splits`) as `(where, record)` pairs."""
    return {
        name: [(f"synthetic[{name}][{index}]", record) for index, record in enumerate(records)]
        for name, records in disjoint_splits(config, sizes).items()
    }


# ----------------------------------------------------------------------------------------------------
# Normalising records


def _field_error(where: str, name: str, expected: str, found: Any) -> DataFormatError:
    return DataFormatError(f"{where}: field {name!r}: expected {expected}, found {_describe(found)}")


def _text(record: Mapping, where: str, name: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise _field_error(where, name, "a string", value)
    if not value.strip():
        raise _field_error(where, name, "a non-empty string", value)
    return value


def _messages(value: Any, where: str, name: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise _field_error(where, name, "a non-empty list of messages {'role': str, 'content': str}", value)
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise _field_error(where, f"{name}[{i}]", "a message {'role': str, 'content': str}", message)
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _prompt(record: Mapping, where: str, name: str) -> str | Messages:
    return _messages(record[name], where, name) if isinstance(record[name], list) else _text(record, where, name)


def _assistant_text(message: Mapping, where: str, name: str) -> str:
    if message["role"] != "assistant":
        raise DataFormatError(f"{where}: field {name!r}: expected the last message to come from 'assistant', found role {message['role']!r}")
    if not message["content"].strip():
        raise _field_error(where, f"{name} (content)", "a non-empty assistant message", message["content"])
    return message["content"]


_NUMBER_WITH_COMMAS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def normalize_answer(value: Any, where: str, name: str = "answer") -> tuple[str, str | None]:
    """`(answer, solution)`: the final answer as a string and, for GSM8K style `"... #### 42"`, the text before `####`.

    Numbers become strings (`42.0` -> `"42"`); a thousands-separated number loses its commas (`"1,234"` -> `"1234"`).
    Refused (`DataFormatError` naming `where` and the field): NaN and infinite numbers, and an answer the math
    reward cannot check (`aesl_lightning.scoring.answers.gold_reason`: longer than `GOLD_CHARS`, control characters).
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _field_error(where, name, "a string or a number", value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _field_error(where, name, "a finite number or a string", value)
        return (str(int(value)) if value.is_integer() else repr(value)), None
    if isinstance(value, int):
        return str(value), None
    solution = None
    text = value
    if "####" in value:
        solution, _, text = value.rpartition("####")
        solution = solution.strip() or None
    text = text.strip()
    if _NUMBER_WITH_COMMAS.match(text):
        text = text.replace(",", "")
    if not text:
        raise _field_error(where, name, "a non-empty answer" + (" after '####'" if solution is not None else ""), value)
    if gold_reason(text) is not None:  # the math reward would raise on it in the middle of a run
        raise _field_error(where, name, f"an answer the math reward can check (at most {GOLD_CHARS} characters, no "
                           "control characters)", text)
    return text, solution


def _check_size(record: Mapping, where: str) -> None:
    """Refuse a record whose strings hold more than `max_record_chars()` characters, before it is tokenised."""
    limit, total, stack = max_record_chars(), 0, [record]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        if total > limit:
            raise _too_long(where, limit)


def to_sft_example(record: Mapping, where: str) -> SFTExample:
    """Normalise one SFT record (module docstring lists the formats); raises DataFormatError naming `where`."""
    _check_size(record, where)
    answer = normalize_answer(record["answer"], where)[0] if record.get("answer") is not None else None
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
        if len(messages) < 2:
            raise _field_error(where, "messages", "at least one prompt message before the assistant's reply", record["messages"])
        completion = _assistant_text(messages[-1], where, "messages")
        extra = {k: v for k, v in record.items() if k not in ("messages", "answer")}
        return SFTExample(prompt=messages[:-1], completion=completion, source=where, answer=answer, extra=extra)
    if "prompt" in record or "completion" in record:
        for name in ("prompt", "completion"):
            if name not in record:
                raise DataFormatError(f"{where}: missing field {name!r}; a prompt-completion record needs both 'prompt' and 'completion'")
        prompt = _prompt(record, where, "prompt")
        if isinstance(record["completion"], list):
            messages = _messages(record["completion"], where, "completion")
            if len(messages) != 1:
                raise _field_error(where, "completion", "exactly one assistant message", record["completion"])
            completion = _assistant_text(messages[0], where, "completion")
        else:
            completion = _text(record, where, "completion")
        extra = {k: v for k, v in record.items() if k not in ("prompt", "completion", "answer")}
        return SFTExample(prompt=prompt, completion=completion, source=where, answer=answer, extra=extra)
    raise DataFormatError(
        f"{where}: unknown SFT format: found fields {sorted(record)}; expected 'messages' (a conversation ending "
        "with the assistant) or 'prompt' and 'completion'"
    )


def to_prompt_example(record: Mapping, where: str) -> PromptExample:
    """Normalise one RL / evaluation record; raises DataFormatError naming `where`."""
    _check_size(record, where)
    key = next((k for k in PROMPT_KEYS if k in record), None)
    if key is None:
        raise DataFormatError(
            f"{where}: unknown prompt format: found fields {sorted(record)}; expected one of {list(PROMPT_KEYS)} and 'answer'"
        )
    if "answer" not in record:
        raise DataFormatError(f"{where}: missing field 'answer'; a prompt record needs {key!r} and 'answer' (the ground truth)")
    prompt = _prompt(record, where, key)
    answer, solution = normalize_answer(record["answer"], where)
    extra = {k: v for k, v in record.items() if k not in (key, "answer")}
    if solution is not None:
        extra.setdefault("solution", solution)
    return PromptExample(prompt=prompt, answer=answer, source=where, extra=extra)


def _nonempty(examples: list, source: str) -> list:
    if not examples:
        raise DataFormatError(f"{source}: no examples; expected at least one record")
    return examples


def sft_examples(records: list[tuple[str, dict]], source: str) -> list[SFTExample]:
    """Normalise `(where, record)` pairs from `source`; no records at all is an error naming `source`."""
    return _nonempty([to_sft_example(record, where) for where, record in records], source)


def prompt_examples(records: list[tuple[str, dict]], source: str) -> list[PromptExample]:
    """Normalise `(where, record)` pairs from `source`; no records at all is an error naming `source`."""
    return _nonempty([to_prompt_example(record, where) for where, record in records], source)


def load_sft_examples(source: str, split: str = "train", synthetic: ArithmeticConfig | None = None) -> list[SFTExample]:
    """All records of `source` (see `load_records`) as SFT examples."""
    return sft_examples(load_records(source, split, synthetic), source)


def load_prompt_examples(source: str, split: str = "train", synthetic: ArithmeticConfig | None = None) -> list[PromptExample]:
    """All records of `source` (see `load_records`) as prompt examples."""
    return prompt_examples(load_records(source, split, synthetic), source)
