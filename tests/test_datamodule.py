"""Encoding (label masking, chat-template prefix, over-long policy), collation and the two DataModules."""

from __future__ import annotations

import json
import logging
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from aesl_lightning.data.datamodule import PromptDataModule, SFTDataModule
from aesl_lightning.data.encode import (
    IGNORE_INDEX,
    EncodedPrompt,
    EncodedSFT,
    collate_prompts,
    collate_sft,
    encode_prompt,
    encode_prompt_examples,
    encode_sft,
    encode_sft_examples,
)
from aesl_lightning.data.formats import DataFormatError, PromptExample, SFTExample
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.infra.tiny import IM_END, char_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture()
def plain_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = None
    return tok


def unmasked(encoded: EncodedSFT) -> list[int]:
    return [label for label in encoded.labels if label != IGNORE_INDEX]


EXAMPLE = SFTExample(prompt="What is 2 + 3?", completion="2 + 3 = 5\n\\boxed{5}", source="data.jsonl:4")


# ----------------------------------------------------------------------------------------------------
# Encoding


def test_chat_template_labels_mask_exactly_the_prompt(tokenizer):
    encoded = encode_sft(tokenizer, EXAMPLE)
    prompt_ids = encode_prompt(tokenizer, EXAMPLE.prompt)
    n = len(prompt_ids)
    assert encoded.prompt_length == n
    assert encoded.input_ids[:n] == prompt_ids  # the generation prompt is a prefix of the full conversation
    assert encoded.labels[:n] == [IGNORE_INDEX] * n
    assert encoded.labels[n:] == encoded.input_ids[n:]  # no masking inside the completion
    assert tokenizer.decode(unmasked(encoded)) == EXAMPLE.completion + IM_END
    assert encoded.input_ids[-1] == tokenizer.eos_token_id  # the template's trailing "\n" is dropped
    assert tokenizer.decode(prompt_ids) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_and_conversational_prompt(tokenizer):
    with_system = encode_sft(tokenizer, EXAMPLE, system_prompt="Be brief.")
    assert tokenizer.decode(with_system.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    conversation = SFTExample(
        prompt=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}],
        completion="W",
        source="c:1",
    )
    encoded = encode_sft(tokenizer, conversation, system_prompt="ignored: the conversation has one")
    assert tokenizer.decode(encoded.input_ids[: encoded.prompt_length]).count("<|im_start|>") == 5  # 4 turns + generation prompt
    assert "ignored" not in tokenizer.decode(encoded.input_ids)
    assert tokenizer.decode(unmasked(encoded)) == "W" + IM_END


def test_without_chat_template_prompt_completion_eos(plain_tokenizer):
    encoded = encode_sft(plain_tokenizer, SFTExample(prompt="ab", completion="cd", source="s"))
    assert plain_tokenizer.decode(encoded.input_ids) == "abcd" + IM_END
    assert encoded.labels == [IGNORE_INDEX, IGNORE_INDEX] + encoded.input_ids[2:]
    assert encode_prompt(plain_tokenizer, "ab") == encoded.input_ids[:2]
    with pytest.raises(ValueError, match="c:9.*chat template"):
        encode_sft(plain_tokenizer, SFTExample(prompt=[{"role": "user", "content": "x"}], completion="y", source="c:9"))


def test_template_that_breaks_the_prefix_is_an_error():
    tok = char_tokenizer()
    # The generation prompt says "assistant:" while a rendered assistant turn says "assistant".
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant:\n{% endif %}"
    )
    with pytest.raises(ValueError, match=r"data\.jsonl:4: .*not a prefix"):
        encode_sft(tok, EXAMPLE)


def test_template_without_eos_gets_one_appended():
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    encoded = encode_sft(tok, SFTExample(prompt="hi", completion="yo", source="s"))
    assert tok.decode(unmasked(encoded)) == "yo\n" + IM_END


def test_overlong_examples_are_dropped_and_counted_or_raise(tokenizer):
    short = SFTExample(prompt="a", completion="b", source="f.jsonl:1")
    long = SFTExample(prompt="a" * 100, completion="b", source="f.jsonl:2")
    limit = len(encode_sft(tokenizer, short).input_ids)
    kept, dropped = encode_sft_examples(tokenizer, [short, long, short], max_length=limit)
    assert (len(kept), dropped) == (2, 1)
    assert all(len(item.input_ids) <= limit for item in kept)
    length = len(encode_sft(tokenizer, long).input_ids)
    with pytest.raises(ValueError, match=rf"f\.jsonl:2: .* is {length} tokens, over the limit of {limit}"):
        encode_sft_examples(tokenizer, [short, long], max_length=limit, overlong="error")
    with pytest.raises(ValueError, match="overlong"):
        encode_sft_examples(tokenizer, [short], max_length=limit, overlong="truncate")
    prompts, dropped = encode_prompt_examples(tokenizer, [PromptExample("a", "1", "p:1"), PromptExample("a" * 50, "2", "p:2")], max_length=30)
    assert [p.source for p in prompts] == ["p:1"] and dropped == 1


def test_collate_sft_pads_on_the_right(tokenizer):
    batch = [EncodedSFT([5, 6, 7], [IGNORE_INDEX, 6, 7], 1, "a"), EncodedSFT([8], [8], 0, "b")]
    out = collate_sft(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_prompts_pads_on_the_left_and_carries_columns():
    batch = [
        EncodedPrompt([5, 6, 7], "p1", "1", "a", {"level": 1}),
        EncodedPrompt([8], "p2", "2", "b", {"level": 2, "tag": "x", "input_ids": "clash"}),
    ]
    out = collate_prompts(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["answer"] == ["1", "2"] and out["prompt"] == ["p1", "p2"] and out["source"] == ["a", "b"]
    assert out["level"] == [1, 2] and out["tag"] == [None, "x"]


# ----------------------------------------------------------------------------------------------------
# SFTDataModule


def write_sft_file(path, n=10):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"What is {i} + 1?", "completion": f"{i} + 1 = {i + 1}", "answer": i + 1}) + "\n")
    return path


def check_sft_batch(batch, tokenizer, batch_size):
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == batch_size
    padding = batch["attention_mask"] == 0
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()
    for row in range(batch_size):
        labels = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(labels).endswith(IM_END)
        assert "<|im_start|>" not in tokenizer.decode(labels)


def test_sft_datamodule_over_jsonl_holds_out_validation(tmp_path, tokenizer):
    path = write_sft_file(tmp_path / "train.jsonl")
    dm = SFTDataModule(train=str(path), val_size=3, batch_size=4, seed=1)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    assert (len(dm.train_data), len(dm.val_data)) == (7, 3)
    assert not {e.source for e in dm.train_data} & {e.source for e in dm.val_data}
    again = SFTDataModule(train=str(path), val_size=3, seed=1)
    again.attach_tokenizer(tokenizer)
    again.setup("fit")
    assert [e.source for e in again.val_data] == [e.source for e in dm.val_data]  # deterministic by seed

    check_sft_batch(next(iter(dm.train_dataloader())), tokenizer, 4)
    val_batches = list(dm.val_dataloader())
    assert sum(len(b["input_ids"]) for b in val_batches) == 3
    prompts = next(iter(dm.val_prompts_dataloader()))
    assert prompts["input_ids"][:, -1].tolist() == [tokenizer.convert_tokens_to_ids("\n")] * 3  # "...assistant\n" ends every row
    expected = {e.source: e.answer for e in dm.val_examples}
    assert prompts["answer"] == [expected[s] for s in prompts["source"]]
    assert all(str(int(a) - 1) in tokenizer.decode(row) for a, row in zip(prompts["answer"], prompts["input_ids"]))


def test_sft_datamodule_with_separate_val_file(tmp_path, tokenizer):
    train = write_sft_file(tmp_path / "train.jsonl", 6)
    val = write_sft_file(tmp_path / "val.jsonl", 2)
    dm = SFTDataModule(train=str(train), val=str(val), batch_size=2)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    assert (len(dm.train_data), len(dm.val_data)) == (6, 2)
    assert dm.val_data[0].source == f"{val}:1"


def test_sft_datamodule_synthetic_generates_disjoint_validation(tokenizer):
    config = ArithmeticConfig(num_examples=24, seed=2)
    dm = SFTDataModule(synthetic=config, val_size=8, batch_size=5, max_length=1024)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    assert (len(dm.train_data), len(dm.val_data), len(dm.val_prompt_data)) == (24, 8, 8)
    train_prompts = {tokenizer.decode(e.input_ids[: e.prompt_length]) for e in dm.train_data}
    val_prompts = {tokenizer.decode(e.input_ids) for e in dm.val_prompt_data}
    assert not train_prompts & val_prompts
    check_sft_batch(next(iter(dm.train_dataloader())), tokenizer, 5)
    assert all(answer is not None for answer in next(iter(dm.val_prompts_dataloader()))["answer"])


def test_sft_datamodule_drops_overlong_with_a_warning(tmp_path, tokenizer, caplog):
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "q", "completion": "a"}] * 5 + [{"prompt": "q" * 200, "completion": "a"}] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = SFTDataModule(train=str(path), val_size=0, max_length=64)
    dm.attach_tokenizer(tokenizer)
    with caplog.at_level(logging.WARNING, logger="aesl_lightning"):
        dm.setup("fit")
    assert len(dm.train_data) == 5 and dm.num_dropped["train"] == 2
    assert any("dropped 2 of 7" in r.getMessage() and "mixed.jsonl" in r.getMessage() for r in caplog.records)
    assert dm.val_dataloader() == []

    error = SFTDataModule(train=str(path), val_size=0, max_length=64, overlong="error")
    error.attach_tokenizer(tokenizer)
    with pytest.raises(ValueError, match=r"mixed\.jsonl:6: .*over the limit of 64"):
        error.setup("fit")
    nothing_fits = SFTDataModule(train=str(path), val_size=0, max_length=5)
    nothing_fits.attach_tokenizer(tokenizer)
    with pytest.raises(DataFormatError, match=r"mixed\.jsonl: no train examples left after dropping 7"):
        nothing_fits.setup("fit")


def test_sft_datamodule_needs_a_tokenizer_and_finds_the_modules(tmp_path, tokenizer):
    path = write_sft_file(tmp_path / "t.jsonl", 4)
    with pytest.raises(ValueError, match="no tokenizer"):
        SFTDataModule(train=str(path), val_size=1).setup("fit")
    dm = SFTDataModule(train=str(path), val_size=1)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tokenizer))
    dm.setup("fit")
    assert dm.tokenizer is tokenizer and len(dm.train_data) == 3
    with pytest.raises(DataFormatError, match="too few to hold out"):
        bad = SFTDataModule(train=str(path), val_size=4)
        bad.attach_tokenizer(tokenizer)
        bad.setup("fit")


class _TinyLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.tokenizer = char_tokenizer()
        self.model = tiny_model()
        self.shapes = []

    def training_step(self, batch, batch_idx):
        self.shapes.append(tuple(batch["input_ids"].shape))
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("val_size", [4, 0])
def test_sft_datamodule_trains_a_tiny_model(val_size):
    module = _TinyLM()
    dm = SFTDataModule(synthetic=ArithmeticConfig(num_examples=8, max_steps=1), val_size=val_size, batch_size=4, max_length=256)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=dm)
    assert dm.tokenizer is module.tokenizer
    assert [s[0] for s in module.shapes] == [4, 4]
    assert ("val_loss" in trainer.callback_metrics) == (val_size > 0)


# ----------------------------------------------------------------------------------------------------
# PromptDataModule


def test_prompt_datamodule_left_pads_and_carries_answers(tmp_path, tokenizer):
    train = tmp_path / "rl.jsonl"
    rows = [{"question": "q" * (i + 1), "answer": f"work\n#### {i},000", "level": i} for i in range(6)]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"problem": "p", "answer": 3}]))
    dm = PromptDataModule(train=str(train), test=str(test), val_size=2, batch_size=4, shuffle=False)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.data.items()} == {"train": 4, "val": 2, "test": 1}

    batch = next(iter(dm.train_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 4
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # prompts of different lengths, so some rows are padded
    for row in range(4):
        pad = ids.shape[1] - lengths[row]
        assert (ids[row, :pad] == tokenizer.pad_token_id).all() and (mask[row, :pad] == 0).all()
        assert mask[row, pad:].all()
        assert tokenizer.decode(ids[row, pad:]).endswith("<|im_start|>assistant\n")
    assert batch["answer"] == [f"{level}000" for level in batch["level"]]
    assert batch["solution"] == ["work"] * 4
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["answer"] == ["3"] and test_batch["prompt"] == ["p"]


def test_prompt_datamodule_synthetic_splits_and_overlong(tokenizer):
    dm = PromptDataModule(synthetic=ArithmeticConfig(num_examples=10), val_size=3, test_size=4, batch_size=5)
    dm.attach_tokenizer(tokenizer)
    dm.setup()
    assert {k: len(v) for k, v in dm.data.items()} == {"train": 10, "val": 3, "test": 4}
    prompts = {name: {e.prompt for e in examples} for name, examples in dm.examples.items()}
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"] and not prompts["val"] & prompts["test"]
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 5

    lengths = sorted(len(e.input_ids) for e in dm.data["train"])
    limit = lengths[len(lengths) // 2]
    tight = PromptDataModule(synthetic=ArithmeticConfig(num_examples=10), val_size=0, max_prompt_length=limit)
    tight.attach_tokenizer(tokenizer)
    tight.setup()
    assert tight.num_dropped["train"] == sum(n > limit for n in lengths) > 0
    assert [e.source for e in tight.data["train"]] == [e.source for e in dm.data["train"] if len(e.input_ids) <= limit]
    assert tight.val_dataloader() == [] and tight.test_dataloader() == []


def test_local_files_are_validated_when_the_datamodule_is_made(tmp_path):
    """No tokenizer and no setup needed: a broken file fails at construction (before any model is built)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q2"}\n')
    with pytest.raises(DataFormatError, match=rf"^data\.train: {re.escape(str(bad))}:2: missing field 'completion'"):
        SFTDataModule(train=str(bad))
    with pytest.raises(DataFormatError, match=r"^data\.val: .*missing\.jsonl: file not found"):
        SFTDataModule(train="synthetic", val=str(tmp_path / "missing.jsonl"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"problem": "1+1?", "answer": 2}\n{"problem": "2+2?"}\n')
    with pytest.raises(DataFormatError, match=r"^data\.test: .*prompts\.jsonl:2: missing field 'answer'"):
        PromptDataModule(train=None, test=str(prompts))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataFormatError, match=r"^data\.train: .*empty\.json: no examples"):
        PromptDataModule(train=str(tmp_path / "empty.json"))
    SFTDataModule(train="someone/some-hub-dataset")  # hub names are checked at setup (they need the network)
