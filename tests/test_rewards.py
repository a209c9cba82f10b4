"""Reward functions: TRL signature, boxed extraction, symbolic answer checking."""

import os
import sys
import time
from pathlib import Path

import pytest

from aesl_lightning.scoring.rewards import (
    MAX_COMPLETION_CHARS,
    VerifierPool,
    answers_match,
    boxed_format,
    extract_boxed,
    final_answers,
    math_accuracy,
    prefilter_reason,
)
from aesl_lightning.scoring.verifier import worker_environment


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{47}.", "47"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("no answer here", None),
        ("\\boxed{12", None),
        ("\\boxed{1} and \\boxed{2", None),  # an unfinished box after the last complete one
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\boxed{7}}", "\\boxed{7}"),  # top level only
    ],
)
def test_extract_boxed_takes_the_last_balanced_box(text, expected):
    assert extract_boxed(text) == expected


def test_math_accuracy_is_symbolic_and_follows_trl_signature():
    completions = ["12 + 35 = 47\nThe answer is \\boxed{47}", "\\boxed{0.5}", "\\boxed{50}", "I think 47"]
    rewards = math_accuracy(["p"] * 4, completions, answer=["47", "1/2", "47", "47"], extra_column=[1, 2, 3, 4])
    assert rewards == [1.0, 1.0, 0.0, 1.0]


def test_conversational_completions_and_missing_answers():
    completions = [[{"role": "assistant", "content": "\\boxed{3}"}], "\\boxed{3}"]
    assert math_accuracy(["a", "b"], completions, answer=["3", None]) == [1.0, None]
    with pytest.raises(ValueError, match="answers"):
        math_accuracy(["a"], ["\\boxed{1}"], answer=["1", "2"])


def test_answers_match_negative_and_thousands():
    assert answers_match("\\boxed{-5}", "-5")
    assert not answers_match("\\boxed{5}", "-5")
    assert answers_match("\\boxed{1,234}", "1234")


def test_boxed_format():
    rewards = boxed_format(["p"] * 3, ["a\n\\boxed{4}", "\\boxed{4} and more", "4"])
    assert rewards == [1.0, 0.0, 0.0]
    deep = ["\\boxed{\\frac{\\sqrt{3}}{2}}.", "\\boxed{4} \\boxed{", "\\boxed{" * 20_000 + "}" * 19_999]
    started = time.perf_counter()
    assert boxed_format(["p"] * 3, deep) == [1.0, 0.0, 0.0]
    assert time.perf_counter() - started < 0.5  # linear, however deep the nesting


# ----------------------------------------------------------------------------------------------------
# Only the final answer counts, and hedging scores 0


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("The answer is 42 or 43", "42", 0.0),
        ("The answer is 42 or 43", "43", 0.0),
        ("\\boxed{42} wait no \\boxed{43", "42", 0.0),
        ("\\boxed{42} wait no \\boxed{43", "43", 0.0),
        ("\\boxed{42} or \\boxed{43}", "42", 0.0),
        ("\\boxed{42} or \\boxed{43}", "43", 0.0),
        ("\\boxed{42 \\text{ or } 43}", "42", 0.0),
        ("\\boxed{42 \\lor 43}", "43", 0.0),
        ("\\boxed{42, 43}", "42", 0.0),
        ("First \\boxed{0.5}, i.e. \\boxed{\\frac{1}{2}}", "1/2", 1.0),  # the same answer twice is one answer
        ("So 6 x 7 = 42.\nThe answer is 42.", "42", 1.0),
        ("The answer is $\\frac{1}{2}$", "1/2", 1.0),
        ("The answer is $\\frac{1}{2}$ or $\\frac{1}{3}$", "1/2", 0.0),
        ("12 + 35 = 47", "47", 0.0),  # no box and two numbers: ambiguous
        ("It is 47.\nOr maybe 48", "47", 0.0),  # the last line is the fallback answer
        ("\\boxed{47}" + " padding" * 10_000, "47", 1.0),
    ],
    ids=lambda value: repr(value)[:40] if isinstance(value, str) else str(value),
)
def test_only_the_final_committed_answer_counts(completion, gold, expected):
    assert math_accuracy(["p"], [completion], answer=[gold]) == [expected]


def test_pathological_answers_are_rejected_before_parsing():
    hostile = {
        "\\boxed{" + "{" * 50 + "1" + "}" * 50 + "}": "braces",
        "\\boxed{10^{10^{10^{10}}}}": "tower",
        "\\boxed{9^{99999999}}": "exponent above",
        "\\boxed{" + "9" * 100 + "}": "digits",
        "\\boxed{100000!}": "factorial",
        "\\boxed{4\\x00 2}": "null byte",
        "\\boxed{4\\ud8002}": "surrogate",
        "\\boxed{" + "x+" * 200 + "1}": "longer than",
    }
    for completion, reason in hostile.items():
        completion = completion.replace("\\x00", "\x00").replace("\\ud800", "\ud800")
        answers, why = final_answers(completion)
        assert why is None and len(answers) == 1
        found = prefilter_reason(answers[0], "42")
        assert found is not None and reason.split()[0] in found, (completion[:40], found)
        started = time.perf_counter()
        assert math_accuracy(["p"], [completion], answer=["42"]) == [0.0]
        assert time.perf_counter() - started < 0.05  # decided without math-verify
    assert final_answers("x" * (MAX_COMPLETION_CHARS + 1))[1] is not None
    assert prefilter_reason("\\boxed{2^{10}}", "1024") is None and math_accuracy(["p"], ["\\boxed{2^{10}}"], answer=["1024"]) == [1.0]


# A worker speaking the pool's protocol that hangs (ignoring SIGTERM and SIGALRM) on "HANG", like a sympy stall.
HANGING_WORKER = """
import json, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    task = json.loads(line)
    while task["answer"] == "HANG":
        time.sleep(1)
    print(json.dumps({"id": task["id"], "ok": task["answer"] == task["gold"]}), flush=True)
"""


def test_a_stalled_check_is_cut_at_the_hard_limit_and_its_worker_replaced():
    pool = VerifierPool(workers=2, command=[sys.executable, "-c", HANGING_WORKER])
    try:
        pool.start()
        started = time.perf_counter()
        results = pool.check([("HANG", "1"), ("7", "7"), ("HANG", "2"), ("8", "9"), ("5", "5")], time_limit=0.5)
        elapsed = time.perf_counter() - started
        assert results == [False, True, False, False, True]
        assert pool.killed == 2 and elapsed < 3.0, elapsed  # two stalls of 0.5 s, plus restarting two workers
        assert pool.check([("3", "3")], time_limit=5) == [True]  # the replacements answer
    finally:
        pool.close()
    assert all(w.process.poll() is not None for w in pool.workers) and pool.workers == []


def test_workers_start_beside_the_package_they_import():
    # The layout move put the verifier one folder deeper; its workers then started inside the package folder and could
    # not import it unless it was installed (a checkout run as a script hung for two minutes, then "stopped answering").
    env, cwd = worker_environment()
    assert (Path(cwd) / "aesl_lightning" / "scoring" / "verifier.py").is_file()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == cwd


def test_a_worker_that_dies_at_start_up_is_a_clear_error():
    pool = VerifierPool(workers=1, command=[sys.executable, "-c", "import sys; sys.stderr.write('No module named aesl_x'); sys.exit(3)"])
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"(?s)exited during start-up \(exit code 3.*No module named aesl_x"):
        pool.start()
    assert time.perf_counter() - started < 30 and pool.workers == []
    pool.close()


def test_works_from_threads_and_in_parallel():
    from concurrent.futures import ThreadPoolExecutor

    completions = ["\\boxed{\\dfrac{14}{3}}", "\\boxed{4.5}", "\\boxed{\\sqrt{4}}", "\\boxed{85}"] * 4
    golds = ["\\frac{14}{3}", "\\frac{14}{3}", "2", "85"] * 4
    expected = [1.0, 0.0, 1.0, 1.0] * 4
    with ThreadPoolExecutor(4) as executor:
        results = list(executor.map(lambda i: math_accuracy(["p"], [completions[i]], answer=[golds[i]])[0], range(16)))
    assert results == expected
    assert math_accuracy(["p"] * 16, completions, answer=golds) == expected


def _score_in_daemon(queue):
    queue.put(math_accuracy(["p", "p"], ["\\boxed{\\frac{1}{2}}", "\\boxed{85}"], answer=["0.5", "86"]))


def test_works_in_a_daemonic_worker_process():
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_score_in_daemon, args=(queue,), daemon=True)
    process.start()
    try:
        assert queue.get(timeout=120) == [1.0, 0.0]
    finally:
        process.join(timeout=30)


def test_math_verify_log_messages_are_cut(caplog):
    import logging

    from aesl_lightning.scoring.verifier import LOG_CHARS, _quiet_math_verify

    _quiet_math_verify()
    logger = logging.getLogger("math_verify.parser")
    with caplog.at_level(logging.WARNING, logger="math_verify"):
        logger.setLevel(logging.WARNING)
        logger.warning("Timeout during parsing: %s", "x" * 100_000)
    assert caplog.records and len(caplog.records[-1].getMessage()) < LOG_CHARS + 40


# ----------------------------------------------------------------------------------------------------
# An answer that names several values scores 0 unless the gold names the same set (issue 26, item 5)

HEDGES = [
    "43 ó 42", "43 或 42", "43 или 42", "43 または 42", "43 hoặc 42", "43 أو 42", "43 या 42", "43 אוֹ 42",
    "43 | 42", "43 \\mid 42", "43 \\cup 42", "43 \\& 42", "43 \\text{, } 42", "43 \\colon 42", "42 \\approx 43",
]


def test_hedges_in_any_language_or_symbol_score_0():
    # beyond the list: the same hedges with the right value as a fraction, negative, nested or in text
    more = ["43 ó \\frac{84}{2}", "43 = 42", "(43 ó 42)", "\\text{43 ó 42}", "43 \\quad 42", "43 \\\\ 42", "x = 43 \\text{ ó } x = 42",
            "42 \\text{ (ó 43)}", "\\{43\\} \\cup \\{42\\}", "43^{ó} 42"]
    completions = [f"\\boxed{{{hedge}}}" for hedge in HEDGES + more] + ["The answer is $43 | 42$", "\\boxed{43 ó -42}"]
    golds = ["42"] * (len(completions) - 1) + ["-42"]
    assert math_accuracy(["p"] * len(completions), completions, answer=golds) == [0.0] * len(completions)


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{42}", "42"),
        ("\\boxed{2, 3}", "2, 3"),
        ("\\boxed{2, 3}", "\\{2,3\\}"),
        ("\\boxed{\\{3, 2\\}}", "2, 3"),
        ("\\boxed{x=2, y=3}", "x=2, y=3"),
        ("\\boxed{[0, 1]}", "[0, 1]"),
        ("\\boxed{\\frac{1}{2}}", "1/2"),
        ("\\boxed{-3}", "-3"),
        ("\\boxed{1,000}", "1000"),
        ("\\boxed{1{,}234{,}567}", "1234567"),  # LaTeX's thousands separator
        ("\\boxed{3.5}", "3.5"),
        ("\\boxed{x = 4}", "4"),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{2}"),
        ("\\boxed{2^{10}}", "1024"),
        ("\\boxed{10\\%}", "10"),
        ("\\boxed{42 \\text{ cm}}", "42"),
        ("\\boxed{42 \\text{ cm}^2}", "42"),
        ("\\boxed{\\$42}", "42"),
        ("\\boxed{42^\\circ}", "42"),
        ("\\boxed{|{-42}|}", "42"),
        ("\\boxed{\\log_2 8}", "3"),
        ("\\boxed{6 \\times 7 = 42}", "42"),  # two expressions of one value
        ("\\boxed{\\frac{84}{2} = 42}", "42"),
        ("\\boxed{42.}", "42"),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_single_values_and_equal_sets_still_score_1(completion, gold):
    from aesl_lightning.scoring.rewards import check_answers

    assert check_answers([completion], [gold], time_limit=30) == [True]  # a generous limit: a loaded machine is no verdict


def test_the_values_an_answer_names_are_read_from_its_grammar():
    from aesl_lightning.scoring.answer_values import answer_values, names_several_values

    for hedge in HEDGES:
        values, nested = answer_values(hedge)
        assert sorted(values) == ["42", "43"] and not nested, hedge
    singles = ["42", "\\frac{1}{2}", "-3", "1,000", "3.5", "x = 4", "\\sqrt{2}", "2^{10}", "10\\%", "42 \\text{ cm}", "2(x+1)",
               "x^2+3x+2", "2xy + 3", "2x\\sqrt{3}", "3\\frac{1}{2}", "\\log_2 8", "f(2) = 3", "|x - 3| + 2", "1.5 \\times 10^{3}",
               "(1, 2)", "\\{2, 3\\}", "[0, 1)", "\\{x \\mid x > 2\\}", "0.\\overline{3}", "e^{i\\pi} + 1", "x = \\pm 2"]
    for single in singles:
        assert answer_values(single) == ([single], False), single
    assert answer_values("(43 ó 42)") == (["(43 ó 42)"], True)  # named inside brackets
    assert answer_values("6 \\times 7 = 42") == (["6 \\times 7", "42"], False)
    assert answer_values("\\sqrt[3]{8} = 2") == (["\\sqrt[3]{8}", "2"], False)  # each value whole, arguments included
    assert names_several_values("\\{2,3\\}") and names_several_values("2, 3") and not names_several_values("42")
    started = time.perf_counter()
    for hostile in ["|" * 20_000, "(" * 20_000 + "1", "\\text{" * 10_000, "1 | " * 5_000, "\\"]:
        answer_values(hostile)
    assert time.perf_counter() - started < 2.0  # linear: no recursion, no rescanning


def test_math_verify_salvages_no_number_from_text_it_cannot_parse():
    from aesl_lightning.scoring.verifier import _verify_in_process

    assert not _verify_in_process("\\boxed{43 ó 42}", "42")  # math-verify's default read it as 42
    assert _verify_in_process("\\boxed{\\frac{84}{2}}", "42")
