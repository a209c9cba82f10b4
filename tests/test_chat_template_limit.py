"""A chat template is code from the model's folder: one with runaway loops stops with an error naming the example
within its time limit instead of hanging the data loading; a normal template renders exactly as before."""

import sys
import threading
import time

import pytest

from aesl_lightning.data import encode
from aesl_lightning.data.formats import SFTExample
from aesl_lightning.infra.models import load_tokenizer

NESTED_LOOPS = ("{% set ns = namespace(n=0) %}{% for i in range(100000) %}{% for j in range(100000) %}"
                "{% set ns.n = ns.n + 1 %}{% endfor %}{% endfor %}{{ ns.n }}")


def _in_thread(call, wait):
    """`call()`'s result or exception, or "hung" if it has not returned after `wait` seconds (a daemon thread, so an
    unbounded render cannot keep the test run alive)."""
    box = {}

    def run():
        try:
            box["result"] = call()
        except Exception as err:  # noqa: BLE001 (handed to the test)
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(wait)
    return "hung" if thread.is_alive() else box


def test_a_chat_template_with_nested_range_loops_stops_quickly_with_the_examples_name(monkeypatch):
    tokenizer = load_tokenizer("tiny-llama")
    tokenizer.chat_template = NESTED_LOOPS
    monkeypatch.setattr(encode, "CHAT_TEMPLATE_SECONDS", 0.5)
    example = SFTExample(prompt="What is 2 + 3?", completion="5", answer="5", source="data.jsonl:7")
    start = time.monotonic()
    outcome = _in_thread(lambda: encode.encode_sft(tokenizer, example), wait=10)
    assert outcome != "hung", "the chat template rendered with no time limit"
    assert time.monotonic() - start < 5
    error = outcome.get("error")
    assert isinstance(error, encode.ChatTemplateTimeout)
    assert str(error).startswith("data.jsonl:7: the tokenizer's chat template did not finish within 0.5 s")

    outcome = _in_thread(lambda: encode.encode_prompt(tokenizer, "Hi", source="prompts.jsonl:2"), wait=10)
    assert outcome != "hung" and "prompts.jsonl:2:" in str(outcome.get("error"))


def test_a_normal_template_renders_the_same_ids_and_the_trace_function_is_restored():
    tokenizer = load_tokenizer("tiny-llama")
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    before = sys.gettrace()
    ids = encode.encode_prompt(tokenizer, "What is 2 + 3?")
    assert sys.gettrace() is before
    assert ids == list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                     return_dict=False))
    with pytest.raises(encode.ChatTemplateTimeout, match="step did not finish within 0.1 s"):
        with encode.time_limit(0.1, "step"):
            while True:  # calls are checked everywhere (lines only in template code)
                str.strip(" ")
                _noop()
    assert sys.gettrace() is before


def _noop():
    pass
