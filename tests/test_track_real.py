"""The real-model track's driver (experiments/track_real.py): configuration, evaluation rows, turning point,
the run plan and the verdict rules, on small synthetic records (fast, offline)."""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))
import track_real as T  # noqa: E402

CONFIG = T.load_config(REPO / "experiments" / "real_track.yaml")


def test_config_loads_and_errors_name_the_field(tmp_path):
    assert CONFIG["sft"]["grid"][0] == 0 and CONFIG["sft"]["grid"][-1] == CONFIG["sft"]["max_steps"]
    broken = copy.deepcopy(CONFIG)
    del broken["grpo"]["lr"]
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"section 'grpo': missing \['lr'\]"):
        T.load_config(path)
    broken = copy.deepcopy(CONFIG)
    broken["sft"]["grid"] = [1, 2, CONFIG["sft"]["max_steps"]]
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="sft.grid must start at 0"):
        T.load_config(path)


@pytest.mark.parametrize("text,expected", [
    ("12 - 3 = 9\nThe answer is \\boxed{9}.", "9"),
    ("#### 1,000\nThe answer is: 1,000", "1000"),
    ("\\boxed{4} or maybe \\boxed{5}", "4|5"),
    ("I do not know", ""),
])
def test_final_answer(text, expected):
    assert T.final_answer(text) == expected


def _row(greedy, boxed, correct, distinct, k=4):
    return {"greedy_correct": greedy, "greedy_boxed": boxed, "greedy_tokens": 10, "correct": correct, "boxed": k, "distinct_answers": distinct,
            "self_bleu": 0.5, "entropy": 1.0, "tokens": 12.0}


def test_summarise_rows_by_hand():
    rows = [_row(1, 1, 4, 1), _row(0, 0, 1, 3), _row(0, 1, 0, 2)]
    s = T.summarise_rows(rows, 4)
    assert s["greedy_accuracy"] == pytest.approx(1 / 3)
    assert s["greedy_boxed_rate"] == pytest.approx(2 / 3)
    assert s["pass@1"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert s["pass@4"] == pytest.approx(2 / 3)  # n = k: a problem passes when any sample is correct
    assert s["pass@k_minus_pass@1"] == pytest.approx(2 / 3 - 1.25 / 3)
    assert s["distinct_answers"] == pytest.approx(2.0)
    assert s["zero_variance_share"] == pytest.approx(2 / 3)  # all 4 right, or none


def _history(entropies, bleus, accuracies, steps=None):
    steps = steps or list(range(0, 2 * len(entropies), 2))
    return [{"step": s, "val/entropy": e, "val/self_bleu": b, "val/greedy_accuracy": a} for s, e, b, a in zip(steps, entropies, bleus, accuracies)]


def test_turning_point_interior_and_boundary():
    falling = _history([1.0, 0.8, 0.6, 0.4, 0.3], [0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.3, 0.4, 0.5, 0.5])
    tp = T.turning_point(falling, CONFIG)
    assert tp["step"] == 0 and tp["boundary"] and tp["fired"]
    peaked = _history([0.8, 1.2, 1.4, 0.9, 0.6, 0.5], [0.3, 0.2, 0.1, 0.3, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4, 0.5, 0.5])
    tp = T.turning_point(peaked, CONFIG)
    assert tp["step"] == 4 and not tp["boundary"] and tp["fired"]
    rising = _history([0.5, 0.6, 0.7, 0.8], [0.5, 0.4, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4])
    tp = T.turning_point(rising, CONFIG)
    assert tp["step"] == 6 and tp["boundary"] and not tp["fired"]


def test_best_accuracy_step_skips_step_0_and_takes_the_earliest_tie():
    history = _history([1] * 5, [0] * 5, [0.9, 0.3, 0.5, 0.5, 0.4])
    assert T.best_accuracy_step(history) == 4


def _sft_record(seed, history):
    return {"seed": seed, "history": history, "turning_point": T.turning_point(history, CONFIG)}


def test_c1_verdict():
    peaked = _history([0.8, 1.2, 1.4, 0.9, 0.6, 0.5], [0.3, 0.2, 0.1, 0.3, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4, 0.5, 0.5])
    falling = _history([1.0, 0.8, 0.6, 0.4, 0.3], [0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.3, 0.4, 0.5, 0.5])
    assert T.c1_verdict([_sft_record(0, peaked), _sft_record(1, peaked), _sft_record(2, falling)])["verdict"] == "supported"
    assert T.c1_verdict([_sft_record(0, falling), _sft_record(1, falling), _sft_record(2, peaked)])["verdict"] == "refuted"
    # an interior peak where accuracy has not risen above the base is no turning point of SFT
    flat = _history([0.8, 1.2, 1.4, 0.9, 0.6, 0.5], [0.3, 0.2, 0.1, 0.3, 0.5, 0.6], [0.5, 0.4, 0.4, 0.4, 0.4, 0.4])
    result = T.c1_verdict([_sft_record(0, flat), _sft_record(1, flat), _sft_record(2, falling)])
    assert result["verdict"] == "inconclusive" and not result["per_seed"][0]["interior"]


def test_plan_runs_has_every_arm_and_seed_and_dependencies_come_first():
    runs = T.plan_runs(CONFIG)
    ids = [r.id for r in runs]
    assert len(ids) == len(set(ids))
    seeds, arms = CONFIG["seeds"], T.active_arms(CONFIG)
    assert len(arms) >= 6 and len(seeds) >= 3
    for seed in seeds:
        for arm in arms:
            assert f"grpo/{arm}-s{seed}" in ids and f"start_eval/{arm}-s{seed}" in ids
    assert [i for i in ids if i.startswith("sweep/")] == [f"sweep/step{s:05d}" for s in CONFIG["sft"]["grid"]]
    position = {i: n for n, i in enumerate(ids)}
    assert all(position[d] < position[r.id] for r in runs for d in r.deps)
    anchored = copy.deepcopy(CONFIG)
    anchored["sft"]["aesl_anchored"] = {"tau_tok": 0.95, "tau_seq": 0.95, "rho": 0.1}
    assert "grpo/aesl_anchored-s0" in [r.id for r in T.plan_runs(anchored)]
    assert T.loss_fields(anchored, "aesl_anchored") == {"name": "aesl", "tau_tok": 0.95, "tau_seq": 0.95, "rho": 0.1}


def test_starting_points(tmp_path):
    paths = T.Paths(tmp_path / "out", tmp_path / "work")
    history = _history([0.8, 1.2, 1.4, 0.9, 0.6, 0.5], [0.3, 0.2, 0.1, 0.3, 0.5, 0.6], [0.1, 0.2, 0.6, 0.4, 0.5, 0.5])
    T.atomic_write_json(paths.result("sft/ce-s1"), {"history": history, "final": "FINAL", "best_accuracy_step": 4,
                                                     "turning_point": {"step": 0}})
    assert T.starting_point(CONFIG, paths, "rl_only", 1) == (CONFIG["model"], None)
    assert T.starting_point(CONFIG, paths, "ce_end", 1) == (str(paths.run_dir("sft/ce-s1") / "final"), CONFIG["sft"]["max_steps"])
    assert T.starting_point(CONFIG, paths, "ce_best_acc", 1) == (str(paths.run_dir("sft/ce-s1") / "snapshots" / "step00004"), 4)
    assert T.starting_point(CONFIG, paths, "ce_turning_point", 1) == (CONFIG["model"], 0)  # a peak at step 0 is the base


def _arm_records(accuracy: float, seeds=(0, 1, 2), problems=200, rng_seed=0, rewards=None):
    rng = random.Random(rng_seed)
    records = []
    for seed in seeds:
        rows = [{"id": f"k{i}", "greedy_correct": int(rng.random() < accuracy)} for i in range(problems)]
        steps = [{"train/reward/mean": r} for r in (rewards or [0.2] * 8)]
        records.append({"seed": seed, "eval": {"test": {"rows": rows}}, "per_step": steps})
    return records


def test_compare_and_verdicts():
    better, worse = _arm_records(0.6, rng_seed=1), _arm_records(0.3, rng_seed=2)
    result = T.compare(better, worse, replicates=400)
    assert result["difference"]["low"] > 0.15 and result["signs"] == [1, 1, 1] and result["mcnemar_p"] < 1e-6
    assert T.verdict(result, mde=0.07) == "supported"
    assert T.verdict(T.compare(worse, better, replicates=400), mde=0.07) == "refuted"
    same_a, same_b = _arm_records(0.4, rng_seed=3), _arm_records(0.4, rng_seed=4)
    tie = T.compare(same_a, same_b, replicates=400)
    assert tie["difference"]["low"] < 0 < tie["difference"]["high"]
    # the same data judged against a tiny MDE stays inconclusive, against a large one the claimed effect is ruled out
    assert T.verdict(tie, mde=0.0) == "inconclusive"
    assert T.verdict(tie, mde=0.5) == "refuted"
    misaligned = _arm_records(0.4, problems=199)
    with pytest.raises(ValueError, match="pairing needs the same problems"):
        T.compare(same_a, misaligned)


def test_rl_moved():
    before = _arm_records(0.3, rng_seed=5)
    flat = _arm_records(0.3, rng_seed=6, rewards=[0.3] * 8)
    assert not T.rl_moved(flat, before)["moved"]
    rising = _arm_records(0.3, rng_seed=6, rewards=[0.2, 0.2, 0.25, 0.3, 0.3, 0.35, 0.4, 0.4])
    moved = T.rl_moved(rising, before)
    assert moved["moved"] and moved["reward_change"] == pytest.approx(0.2) and moved["reward_slope"] > 0


def test_evaluate_problems_rows_with_a_tiny_model(tmp_path):
    from aesl_lightning.data.synthetic import write_jsonl
    from aesl_lightning.infra.models import load_causal_lm, load_tokenizer
    from aesl_lightning.scoring.rewards import math_accuracy

    path = tmp_path / "test.jsonl"
    write_jsonl([{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+3?", "answer": "5"}, {"prompt": "3*3?", "answer": "9"}], path)
    tokenizer, model = load_tokenizer("tiny-llama"), load_causal_lm("tiny-llama")
    settings = T.EvalSettings(samples=3, max_new_tokens=6, batch_size=2, seed=1)
    result = T.evaluate_problems(model, tokenizer, path, settings)
    rows = result["rows"]
    assert [r["source"] for r in rows] == [f"{path}:{i}" for i in (1, 2, 3)]
    assert [r["id"] for r in rows] == [f"test.jsonl:{i}" for i in (1, 2, 3)]  # no key column: the file's name and line
    assert [r["greedy_correct"] for r in rows] == [int(x) for x in math_accuracy([None] * 3, [r["greedy_text"] for r in rows], answer=["2", "5", "9"])]
    assert all(len(r["sample_texts"]) == 3 and 1 <= r["distinct_answers"] <= 3 and 0 <= r["correct"] <= 3 for r in rows)
    assert result["summary"]["problems"] == 3 and result["timing"]["sample_tokens"] > 0
    assert T.evaluate_problems(model, tokenizer, path, settings)["rows"] == rows  # seeded: the same samples again


@pytest.mark.integration
def test_base_model_evaluation_on_two_word_problems(tmp_path):
    from aesl_lightning.data.word_problems import EASY, generate_split, write_splits
    from aesl_lightning.infra.models import load_causal_lm, load_tokenizer

    write_splits({"test": generate_split("test", 2, EASY, seed=0)}, tmp_path)
    tokenizer, model = load_tokenizer("smollm2-135m-instruct"), load_causal_lm("smollm2-135m-instruct")
    result = T.evaluate_problems(model, tokenizer, tmp_path / "test.jsonl", T.EvalSettings(samples=2, max_new_tokens=48, batch_size=2))
    assert result["summary"]["problems"] == 2 and result["timing"]["greedy_tokens"] > 0
    assert all(r["greedy_text"] for r in result["rows"])


def test_projected_seconds_by_hand():
    config = copy.deepcopy(CONFIG)
    config["seeds"] = [0, 1, 2]
    config["sft"].update(max_steps=10, grid=[0, 5, 10], batch_size=8, aesl_anchored=None)
    config["grpo"].update(steps=4, prompts=2, num_generations=4, sweep_steps=2)
    config["eval"].update(samples=4, val_problems=10, test_problems=20, test_hard_problems=10)
    costs = {"sft_step": 2.0, "greedy_tps": 10.0, "sample_tps": 40.0, "tokens": 20.0, "base_tokens": 50.0, "grpo_step": 30.0}
    per_problem = 20.0 * (1 / 10 + 4 / 40)  # one greedy + 4 samples of 20 tokens: 4 s
    test_eval = 20 * per_problem + 10 * per_problem * 1.3
    b = T.projected_seconds(config, costs)
    assert b["sft"] == pytest.approx(3 * 3 * (10 * 2.0 + 3 * 10 * per_problem))
    assert b["start_eval"] == pytest.approx(3 * 6 * test_eval)
    assert b["grpo"] == pytest.approx(3 * 6 * (4 * 30.0 + test_eval))
    assert b["sweep"] == pytest.approx(3 * (2 * 30.0 + 20 * per_problem))
    assert b["total"] == pytest.approx(b["sft"] + b["start_eval"] + b["grpo"] + b["sweep"])
    estimated = T.projected_seconds(config, {**costs, "grpo_step": None})["grpo_step_used"]
    assert estimated == pytest.approx(2 * 4 * 20 / 40 + 1.5 * 2.0 * 8 / 8)


def test_shrink_ladder_applies_the_plans_cuts_cumulatively_in_order():
    config = copy.deepcopy(CONFIG)
    config["sft"].update(grid=[0, 1, 2, 4, 8])
    config["grpo"].update(steps=40, sweep_steps=2)
    config["eval"].update(test_problems=256, test_hard_problems=128, val_problems=64)
    costs = {"sft_step": 2.0, "greedy_tps": 10.0, "sample_tps": 40.0, "tokens": 20.0, "base_tokens": 50.0, "grpo_step": 30.0}
    ladder = T.shrink_ladder(config, costs)
    assert [label[:3] for label, _ in ladder] == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]
    hours = [h for _, h in ladder]
    assert all(later < earlier for earlier, later in zip(hours, hours[1:]))
    # by hand: (d) keeps grid points 0, 2, 8 in the sweep; (f) drops the sweep, whose cost is the gap from (e)
    final = copy.deepcopy(config)
    final["eval"].update(test_problems=128, test_hard_problems=64, val_problems=32)
    final["grpo"]["steps"] = 30
    per_point = 2 * 30.0 + 128 * 20.0 * (1 / 10 + 4 / 40)
    no_sweep = T.projected_seconds({**final, "sweep_grid": []}, costs)["total"] / 3600
    assert hours[-1] == pytest.approx(no_sweep)
    assert hours[-2] - hours[-1] == pytest.approx(3 * per_point / 3600)
    assert config["eval"]["test_problems"] == 256 and "sweep_grid" not in config  # the caller's config is untouched


def test_go_no_go_rules():
    base = {"test": {"summary": {"greedy_boxed_rate": 0.05, "greedy_accuracy": 0.2}}}
    rules = T.go_no_go({"preflight/base": base}, budget={"total": 2.5 * 3600})
    assert [r["passes"] for r in rules] == [True, True, None, False, True]
    base["test"]["summary"]["greedy_accuracy"] = 0.6
    assert T.go_no_go({"preflight/base": base})[1]["passes"] is False
    check = {"reward_gain_halves": 0.01, "passes": False}
    assert T.go_no_go({"preflight/base": base, "preflight/grpo_check": check})[2]["passes"] is False
