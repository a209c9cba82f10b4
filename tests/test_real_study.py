"""The real-model study's driver (experiments/real_study.py + experiments/real/): the computation-path labeller, the
snapshot rules, the RL pilot and its remedies, the C1 / C2 / C3 verdicts on hand-made records with known answers,
the schedule that follows the records, the report rebuilt from unit files alone, and a smoke run end to end."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))
import real_study  # noqa: E402
from real import analysis as A  # noqa: E402
from real import report, rules, study  # noqa: E402
from real.evaluate import final_answer, summarise  # noqa: E402
from real.operations import computation_path, distinct_paths  # noqa: E402

from aesl_lightning.study import stats  # noqa: E402
from aesl_lightning.study.units import UnitStore  # noqa: E402

CFG = real_study.load_config(REPO / "experiments" / "real_study.yaml")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ------------------------------------------------------------------------------------------ labeller


@pytest.mark.parametrize("text,path", [
    ("After buying: 7 + 5 = 12\nAfter giving some away: 12 - 3 = 9\nThe answer is \\boxed{9}.", ("5 + 7", "12 - 3")),
    ("Now: 5 + 7 = 12\nThe answer is \\boxed{12}.", ("5 + 7",)),               # commutative operands sorted
    ("3 * 4 = 12 and 12 + 5 = 17", ("3 * 4", "5 + 12")),
    ("4 x 3 = 12\n12 ÷ 4 = 3", ("3 * 4", "12 / 4")),                            # x, ×, ÷ read as * and /
    ("12 - 3 = 8\n8 + 1 = 9", ("12 - 3", "1 + 8")),                             # a slip keeps its operation, changes the next
    ("She spends $12 - $5 = $7.", ("12 - 5",)),
    ("2 + 3 + 4 = 9", ("2 + 3 + 4",)),                                           # a chain is one operation, as written
    ("1,200 + 300 = 1,500", ("300 + 1200",)),
    ("The answer is \\boxed{9}.", ()),                                           # no arithmetic line
    ("Mix 3 x 4 = 12 boxes", ("3 * 4",)),
    ("the box-5 = 3", ()),                                                       # not an arithmetic line
])
def test_computation_path_on_hand_written_solutions(text, path):
    assert computation_path(text) == path


def test_distinct_paths_count_only_compliant_samples():
    a = "x: 7 + 5 = 12\ny: 12 - 3 = 9\nThe answer is \\boxed{9}."
    b = "x: 5 + 7 = 12\ny: 12 - 3 = 9\nThe answer is \\boxed{9}."   # same path as a
    c = "x: 7 - 3 = 4\ny: 4 + 5 = 9\nThe answer is \\boxed{9}."     # another order
    assert distinct_paths([a, b, c, "prose"], [1, 1, 1, 0]) == 2
    assert distinct_paths([a, c], [0, 0]) == 0
    with pytest.raises(ValueError, match="2 texts and 1"):
        distinct_paths([a, b], [1])


@pytest.mark.parametrize("text,expected", [("12 - 3 = 9\nThe answer is \\boxed{9}.", "9"), ("#### 1,000\nThe answer is: 1,000", "1000"),
                                           ("I do not know", "")])
def test_final_answer(text, expected):
    assert final_answer(text) == expected


# ------------------------------------------------------------------------------------------ hand-made records

K = 4


def grid_row(step: int, score: float, boxed: int = K, accuracy: float = 0.5, distinct: float | list = 2.0, n: int = 8,
             correct: list | None = None) -> dict:
    """A grid point whose per-problem D = entropy - self-BLEU is `score` +- 0.01 (alternating), every problem with
    `boxed` of K samples boxed and `distinct` distinct answers."""
    entropy = [round(score + 0.2 + (0.01 if i % 2 else -0.01), 4) for i in range(n)]
    distinct = distinct if isinstance(distinct, list) else [distinct] * n
    columns = {"id": [f"p{i}" for i in range(n)], "greedy_correct": [int(i < accuracy * n) for i in range(n)], "greedy_boxed": [1] * n,
               "greedy_tokens": [30] * n, "greedy_truncated": [0] * n, "correct": correct or [2] * n, "boxed": [boxed] * n, "distinct_answers": distinct,
               "paths": [1] * n, "entropy": entropy, "self_bleu": [0.2] * n, "tokens": [30.0] * n}
    return {"step": step, "columns": columns, "summary": summarise(columns, K), "seconds": 1.0}


def test_best_accuracy_skips_step_0_and_keeps_the_earliest_tie():
    grid = [grid_row(0, 1.0, accuracy=0.9), grid_row(1, 1.0, accuracy=0.25), grid_row(2, 1.0, accuracy=0.5), grid_row(4, 1.0, accuracy=0.5)]
    assert rules.best_accuracy(grid)["step"] == 2


def test_turning_point_behind_the_format_gate_with_a_noise_margin():
    # step 0: prose (no boxed sample) with the highest D: gated out; peak at step 2; step 4 falls by 1.0 >> 2 SE
    grid = [grid_row(0, 3.0, boxed=0), grid_row(1, 1.0), grid_row(2, 1.5), grid_row(4, 0.5), grid_row(8, 0.6)]
    tp = rules.turning_point(grid, format_level=0.8, noise_k=2.0)
    assert (tp["format_step"], tp["peak_step"], tp["detected"], tp["drop_step"]) == (1, 2, True, 4)
    # a fall inside the margin (0.005 < 2 SE of the difference) is no turning point; the peak stays the peak
    flat = [grid_row(0, 3.0, boxed=0), grid_row(1, 1.0), grid_row(2, 1.5), grid_row(4, 1.495)]
    tp = rules.turning_point(flat)
    assert (tp["peak_step"], tp["detected"]) == (2, False)
    # the highest gated point, not the first local peak: 1.2 at step 1 falls at step 2, but step 4 is higher
    later = [grid_row(1, 1.2), grid_row(2, 0.5), grid_row(4, 2.0), grid_row(8, 1.995)]
    tp = rules.turning_point(later)
    assert (tp["peak_step"], tp["detected"]) == (4, False) and "no later point" in tp["reason"]
    assert rules.turning_point([grid_row(0, 1.0, boxed=3), grid_row(1, 2.0, boxed=2)])["reason"].startswith("format never learned")
    assert rules.chosen_steps(grid, 0.8, final=True) == {"best_accuracy": 1, "turning_point": 2, "end": 8}


def rl_result(first: list[list[int]], last: list[list[int]], entropy: tuple[float, float] = (1.0, 0.6), boxed: int = 1,
              start: str = "sft-ce-s0@step00004", settings: dict | None = None, test: list[int] | None = None) -> dict:
    """An RL unit's result over a pool of len(first) prompts, 2 per step, 2 passes: `first[i]` / `last[i]` are prompt
    i's correct flags in pass 1 / pass 2; every completion 10 tokens."""
    def step(correct, e):
        return [{"id": f"q{i}", "correct": c, "boxed": [boxed] * len(c), "entropy_sum": e * 10 * len(c), "tokens": 10 * len(c)}
                for i, c in correct]
    per_step = []
    for flags, e in ((first, entropy[0]), (last, entropy[1])):
        items = list(enumerate(flags))
        per_step += [step(items[j:j + 2], e) for j in range(0, len(items), 2)]
    test = test if test is not None else [1, 0, 1, 0]
    cols = {"id": [f"t{i}" for i in range(len(test))], "greedy_correct": test}
    return {"per_step": per_step, "start": start, "seed": 0, "settings": {**CFG["rl"], **(settings or {})},
            "start_test": {"summary": {"greedy_accuracy": 0.25}, "columns": cols}, "test": {"summary": {"greedy_accuracy": float(np.mean(test))}, "columns": cols}}


PASSING = ([[0, 0, 0, 0]] * 4, [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]])  # gains 0.5, 0.5, 0.75, 0.75
FLAT = ([[1, 0, 0, 0]] * 4, [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]])


def test_pilot_check_known_answers():
    p = A.pilot_check(rl_result(*PASSING), CFG["pilot"], (1.0, 0.1))
    assert p["gain"] == pytest.approx(0.625) and p["se"] == pytest.approx(np.std([0.5, 0.5, 0.75, 0.75], ddof=1) / 2)
    assert p["entropy_first"] == pytest.approx(1.0) and p["entropy_last"] == pytest.approx(0.6) and p["boxed_rate_last"] == 1.0
    assert p["pass"]
    assert not A.pilot_check(rl_result(*FLAT), CFG["pilot"], (1.0, 0.1))["pass"]                       # no gain
    collapsed = A.pilot_check(rl_result(*PASSING, entropy=(1.0, 0.4)), CFG["pilot"], (1.0, 0.1))
    assert collapsed["checks"] == {"gain": True, "gain_over_se": True, "boxed": True, "entropy": False}  # entropy < half
    assert not A.pilot_check(rl_result(*PASSING, boxed=0), CFG["pilot"], (1.0, 0.1))["checks"]["boxed"]


def record(kind: str, result: dict, params: dict | None = None) -> dict:
    return {"kind": kind, "params": params or {}, "result": result,
            "machine": {"busy": False, "seconds": 60.0, "start": {"commit": "abc", "loadavg": [0.1, 0, 0]}, "end": {"commit": "abc", "loadavg": [0.2, 0, 0]}}}


def ce_record(seed: int, decline: bool = True) -> dict:
    """A CE unit's grid: format from step 1, the peak of D at step 2, then a fall; best accuracy at step 4; distinct
    answers 3.0 at the peak and 1.5 (decline) or 3.0 at the end."""
    grid = [grid_row(0, 3.0, boxed=0, accuracy=0.0, distinct=4.0), grid_row(1, 1.0, accuracy=0.25, distinct=2.5),
            grid_row(2, 1.5, accuracy=0.5, distinct=3.0), grid_row(4, 0.5, accuracy=0.75, distinct=[1.5, 1.5, 2, 1] * 2 if decline else 3.0)]
    return record("sft-grid", {"grid": grid, "seed": seed}, {"seed": seed})


def test_c1_verdicts_on_hand_made_records():
    cfg = copy.deepcopy(CFG)
    declining = {f"sft-ce-s{s}": ce_record(s) for s in range(5)}
    c = A.c1(declining, cfg)
    assert c["detected"] == 5 and c["decline"]["estimate"] == pytest.approx(1.5) and c["decline"]["low"] > 0
    assert c["sign_flip_p_one_sided"] == pytest.approx(1 / 32) and c["verdict"] == "supported"
    flat = {f"sft-ce-s{s}": ce_record(s, decline=False) for s in range(5)}
    c = A.c1(flat, cfg)
    assert c["decline"]["high"] == pytest.approx(0.0) and c["verdict"] == "refuted"   # no decline of 0.10 or more
    four = {k: v for k, v in declining.items() if k != "sft-ce-s4"}
    assert A.c1(four, cfg)["verdict"] == "inconclusive"   # 4 seeds: the one-sided p cannot go below 1/16
    I = stats.Interval
    c1cfg = cfg["c1"]
    assert A.c1_verdict(I(0.5, 0.2, 0.8, 0.95, 10), 1 / 32, 3, 5, c1cfg) == "inconclusive"  # turning point in 3 of 5 only
    assert A.c1_verdict(I(0.5, 0.2, 0.8, 0.95, 10), 1 / 32, 4, 5, c1cfg) == "supported"
    assert A.c1_verdict(I(0.5, 0.2, 0.8, 0.95, 10), 2 / 32, 5, 5, c1cfg) == "inconclusive"
    assert A.c1_verdict(I(0.0, -0.05, 0.09, 0.95, 10), 0.5, 5, 5, c1cfg) == "refuted"
    assert A.c1_verdict(I(0.0, -0.05, 0.11, 0.95, 10), 0.5, 5, 5, c1cfg) == "inconclusive"


def test_exploratory_declines_run_from_the_best_accuracy_step_to_the_end():
    # best greedy accuracy at step 2 (0.75), not at the end (step 4, 0.5): distinct answers 3.0 -> 1.5 per problem; right
    # samples 2 of 4 -> 4 or 0 of 4, so pass@k - pass@1 goes 1 - 2/4 = 0.5 -> 0 on every problem
    grid = [grid_row(0, 3.0, boxed=0, accuracy=0.0, distinct=4.0), grid_row(1, 1.0, accuracy=0.25, distinct=2.5),
            grid_row(2, 1.5, accuracy=0.75, distinct=3.0), grid_row(4, 0.5, accuracy=0.5, distinct=[1.5, 1.5, 2, 1] * 2, correct=[4, 0] * 4)]
    records = {f"sft-ce-s{s}": record("sft-grid", {"grid": grid, "seed": s}) for s in range(5)}
    e = A.c1(records, CFG)["exploratory"]
    assert e["distinct_answers"]["best_accuracy_steps"] == [2] * 5
    assert (e["distinct_answers"]["at_best"], e["distinct_answers"]["at_end"]) == (3.0, 1.5)
    assert e["distinct_answers"]["decline"]["estimate"] == pytest.approx(1.5) and e["distinct_answers"]["seed_declines"] == [1.5] * 5
    assert e["pass_gap"]["at_best"] == pytest.approx(0.5) and e["pass_gap"]["decline"]["estimate"] == pytest.approx(0.5)
    assert e["pass_gap"]["sign_flip_p_one_sided"] == pytest.approx(1 / 32)  # five seeds, all declining
    assert A.pass_gap_per_problem({"correct": [0, 1, 3, 4]}, 4) == [0.0, 0.75, 0.25, 0.0]


def test_rl_test_change_is_paired_by_problem_with_an_exact_mcnemar():
    result = rl_result(*PASSING)
    before = {"id": [f"t{i}" for i in range(8)], "greedy_correct": [1, 1, 1, 1, 1, 1, 0, 0]}
    result["start_test"] = {"columns": before}
    result["test"] = {"columns": {"id": before["id"], "greedy_correct": [0, 0, 0, 0, 0, 1, 0, 1]}}
    t = A.test_change(result)
    assert (t["lost"], t["gained"], t["problems"]) == (5, 1, 8)
    assert t["before"] == pytest.approx(0.75) and t["after"] == pytest.approx(0.25) and t["change"] == pytest.approx(-0.5)
    assert t["mcnemar_p"] == pytest.approx(2 * (1 + 6) / 64)  # two-sided exact: 2 P(X <= 1), X ~ Binomial(6, 1/2)
    result["test"]["columns"]["id"] = list(reversed(before["id"]))
    with pytest.raises(ValueError):
        A.test_change(result)  # unpaired problems are an error, not a comparison


def test_comparison_verdict_rules():
    I, v = stats.Interval, CFG["verdicts"]
    assert A.comparison_verdict(I(0.1, 0.05, 0.15, 0.95, 10), 0.01, [0.1, 0.05, 0.12], v) == "supported"
    assert A.comparison_verdict(I(0.1, 0.05, 0.15, 0.95, 10), 0.01, [0.1, -0.01, 0.2], v) == "inconclusive"  # a seed against
    assert A.comparison_verdict(I(0.1, 0.05, 0.15, 0.95, 10), 0.06, [0.1, 0.05, 0.12], v) == "inconclusive"
    assert A.comparison_verdict(I(0.0, -0.02, 0.025, 0.95, 10), 0.9, [0.0, 0.01, -0.01], v) == "refuted"
    assert A.comparison_verdict(I(0.0, -0.02, 0.035, 0.95, 10), 0.9, [0.0, 0.01, -0.01], v) == "inconclusive"
    assert A.comparison_verdict(I(-0.1, -0.15, -0.05, 0.95, 10), 0.01, [-0.1] * 3, v) == "opposite"


def _arm_records(a_flags: list[int], b_flags: list[int], manip: bool = True) -> dict:
    out = {}
    for s in range(3):
        pa = PASSING if manip else FLAT
        out[f"rl-ce_turning-s{s}"] = record("rl", rl_result(*pa, start=f"sft-ce-s{s}@step00002", test=a_flags))
        out[f"rl-ce_best_acc-s{s}"] = record("rl", rl_result(*PASSING, start=f"sft-ce-s{s}@step00001", test=b_flags))
    return out


def test_compare_known_answers_and_the_manipulation_gate():
    a, b = [1] * 12 + [0] * 4, [0] * 12 + [0] * 4   # 12 discordant pairs for A in each of 3 seeds
    c = A.compare(_arm_records(a, b), "ce_turning", "ce_best_acc", [0, 1, 2], CFG)
    assert c["difference"]["estimate"] == pytest.approx(0.75) and c["seed_means"] == pytest.approx([0.75] * 3)
    assert c["fisher_mcnemar_p"] == pytest.approx(stats.fisher_combined([stats.mcnemar_exact(12, 0)] * 3))
    assert c["verdict"] == "supported" and c["discordance"] == pytest.approx(0.75)
    same = A.compare(_arm_records(b, b), "ce_turning", "ce_best_acc", [0, 1, 2], CFG)
    assert same["difference"]["high"] == 0.0 and same["verdict"] == "refuted"
    unread = A.compare(_arm_records(a, b, manip=False), "ce_turning", "ce_best_acc", [0, 1, 2], CFG)
    assert unread["verdict"].startswith("not read") and unread["manipulation"]["ce_turning"]["passed"] == 0


# ------------------------------------------------------------------------------------------ schedule from records


def _ids(records: dict) -> list[str]:
    return [u.id for u in study.study_units(CFG, records)]


def test_schedule_follows_the_pilot_records():
    base = {"sft-ce-s0": ce_record(0)}
    ids = _ids(base)
    assert ids[:7] == ["base-test", "sft-ce-s0", "sft-ce-s1", "sft-ce-s2", "sft-ce-s3", "sft-ce-s4", "screen"] and ids[7:] == ["pilot-rl"]
    failed = {**base, "pilot-rl": record("rl", rl_result(*FLAT))}
    assert _ids(failed)[7:] == ["pilot-rl", "pilot-rl-lr5e-5"]
    both = {**failed, "pilot-rl-lr5e-5": record("rl", rl_result(*FLAT, settings={"lr": 5e-5}))}
    units = study.study_units(CFG, both)
    assert [u.id for u in units][7:] == ["pilot-rl", "pilot-rl-lr5e-5", "pilot-rl-4pass"]
    assert units[-1].params["settings"] == {"lr": 2e-5, "passes": 4} and units[-1].kind == "rl-4pass"  # ties: the first lr
    every = {**both, "pilot-rl-4pass": record("rl", rl_result(*FLAT, settings={"lr": 2e-5, "passes": 4}))}
    assert A.pilot_decision(every, CFG)["status"] == "failed"
    assert _ids(every)[-3:] == ["sft-ce-s5", "sft-ce-s6", "sft-ce-s7"]                        # compute goes to C1 seeds
    passed = {**base, "pilot-rl": record("rl", rl_result(*PASSING))}
    units = {u.id: u for u in study.study_units(CFG, passed)}
    assert units["rl-ce_best_acc-s0"].kind == "reuse"                                          # the passing pilot is that run
    assert units["rl-ce_turning-s0"].params["start"]["step"] == 2 and units["rl-ce_turning-s0"].kind == "rl"
    assert "rl-ce_best_acc-s1" not in units and "sft-aesl-s1" in units                           # waits for sft-ce-s1's record
    assert units["rl-rl_only-s0"].kind == "rl-base" and "rl-dft_end-s0" not in units
    assert list(units)[-1] == "rl-rl_only-s0"
    stamped = study.stamp(CFG, list(units.values()))
    other = copy.deepcopy(CFG)
    other["rl"]["lr"] = 3e-5
    assert study.stamp(other, [units["pilot-rl"]])[0].params["config"] != next(u for u in stamped if u.id == "pilot-rl").params["config"]


# ------------------------------------------------------------------------------------------ report from unit files alone


def test_report_is_rebuilt_from_unit_files_alone(tmp_path):
    store = UnitStore(tmp_path)
    records = {f"sft-ce-s{s}": ce_record(s) for s in range(5)}
    records.update({"pilot-rl": record("rl", rl_result(*FLAT), {"settings": {}}),
                    "pilot-rl-lr5e-5": record("rl", rl_result(*FLAT, settings={"lr": 5e-5}), {"settings": {"lr": 5e-5}}),
                    "pilot-rl-4pass": record("rl", rl_result(*FLAT, settings={"passes": 4}), {"settings": {"lr": 2e-5, "passes": 4}}),
                    "screen": record("screen", {"start": "sft-ce-s0@step00004", "qualifying": 20, "pool": ["q0", "q1", "q2", "q3"], "summary": {}})})
    for k, r in records.items():
        store.save(k, {"id": k, **r})
    path = report.write(CFG, UnitStore(tmp_path), tmp_path)
    text = path.read_text()
    assert "**C1 verdict: supported**" in text and "untestable on this hardware" in text and "the pool is what qualified" in text
    assert "| pass@k - pass@1 |" in text and "Exploratory (plan amendment 4" in text
    assert "0.500 -> 0.500 (0 / 0, p 1.000)" in text  # RL's paired effect on test in the pilot table
    assert "| pilot-rl | lr 2e-05, 2 passes over the pool (the plan's settings) |" in text and "| pilot-rl-4pass | lr 2e-05, 4 passes" in text
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["pilot"]["status"] == "failed" and summary["C1"]["detected"] == 5
    assert (tmp_path / "diversity_curve.png").is_file()


def test_pilot_settings_read_as_words():
    assert report.rl_settings({}, CFG) == "lr 2e-05, 2 passes over the pool (the plan's settings)"
    assert report.rl_settings({"lr": 5e-5}, CFG) == "lr 5e-05, 2 passes over the pool"
    assert report.rl_settings({"passes": 4, "beta": 0.04}, CFG) == "lr 2e-05, 4 passes over the pool, beta 0.04"


def test_units_name_the_cpu_that_ran_them():
    epyc = {"model": "AMD EPYC", "cores": 2, "flags": ["avx", "avx2", "avx512f", "avx512_bf16"]}
    assert report.cpu_label(epyc) == "AMD EPYC (avx512_bf16)"
    assert report.cpu_label({"model": "Intel Xeon", "flags": ["avx", "avx2", "fma"]}) == "Intel Xeon (avx2)"
    assert report.cpu_label(None) == "-"


def test_report_names_the_amendments_it_follows_and_a_reuse_has_no_load(tmp_path):
    plan = tmp_path / "plan.md"
    assert report.plan_label(plan) == "plan"  # no plan beside the records
    plan.write_text("# plan\n## Amendment 1 (x)\ntext mentioning ## Amendment 9 inline\n## Amendment 2 (y)\n## Amendment 4 (z)\n")
    assert report.plan_label(plan) == "plan amendments 1-4"
    plan.write_text("# plan\n## Amendment 3 (x)\n")
    assert report.plan_label(plan) == "plan amendment 3"
    # a reuse repeats no work: its near-zero wall time makes any other process look like a busy machine
    assert report._busy({"kind": "reuse", "busy": True}) == "-"
    assert report._busy({"kind": "rl", "busy": True}) == "yes" and report._busy({"kind": "rl", "busy": False}) == "no"


# ------------------------------------------------------------------------------------------ configs and smoke run


def test_gpu_config_keeps_the_definitions():
    gpu = real_study.load_config(REPO / "experiments" / "real_study_gpu.yaml")
    for section, keys in {"sft": ("grid", "losses", "max_steps", "lr", "batch_size"), "eval": ("samples", "max_new_tokens"),
                          "rl": ("num_generations", "prompts_per_step", "passes", "lr", "reward_weights", "loss_type", "beta"),
                          "pilot": ("min_gain", "se_k", "min_boxed", "min_entropy_ratio"), "verdicts": ("sesoi", "alpha")}.items():
        for key in keys:
            assert gpu[section][key] == CFG[section][key], (section, key)
    assert set(gpu) == set(CFG) and set(gpu["estimates"]) == set(CFG["estimates"])
    assert len(gpu["c1"]["seeds"]) > len(CFG["c1"]["seeds"]) and gpu["eval"]["test_problems"] > CFG["eval"]["test_problems"]


def test_smoke_run_end_to_end_and_resume(tmp_path):
    work = tmp_path / "work"
    real_study.main(["--smoke", "--run", "--work", str(work), "--threads", "1"])
    out = work / "results"
    records = UnitStore(out).records()
    expected = {"base-test", "sft-ce-s0", "sft-ce-s1", "screen", "pilot-rl", "sft-aesl-s0", "rl-ce_best_acc-s0", "rl-ce_turning-s0",
                "rl-aesl_end-s0", "rl-rl_only-s0"}
    assert set(records) == expected
    assert records["rl-ce_best_acc-s0"]["result"]["same_as"] == "pilot-rl"
    pilot = records["pilot-rl"]["result"]
    assert pilot["steps"] == 4 and [len(b) for b in pilot["per_step"]] == [2, 2, 2, 2] and len(pilot["test"]["columns"]["id"]) == 4
    grid = records["sft-ce-s0"]["result"]["grid"]
    assert [r["step"] for r in grid] == [0, 1, 2, 4] and {"distinct_answers", "paths", "entropy"} <= set(grid[0]["columns"])
    kept = sorted(p.name for p in (work / "runs" / "sft-ce-s0" / "snapshots").iterdir())
    assert kept == sorted(f"step{s:05d}" for s in set(records["sft-ce-s0"]["result"]["snapshots"].values()))
    assert all(r["machine"]["start"]["commit"] for r in records.values())
    checkpointing = bool(CFG["machine"].get("gradient_checkpointing", False))  # the memory setting each RL unit ran with
    assert all(r["result"]["gradient_checkpointing"] is checkpointing for i, r in records.items() if i.startswith(("pilot", "rl-")))
    assert "C2" in (out / "results.md").read_text()
    real_study.main(["--smoke", "--run", "--work", str(work), "--threads", "1"])   # resumes: nothing left to run
    assert UnitStore(out).records().keys() == records.keys()


def test_lost_snapshots_are_rebuilt_bit_identical_and_checked_against_the_record(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from real import stages

    work = tmp_path / "work"
    real_study.main(["--smoke", "--run", "--only", "sft-ce-s0", "--work", str(work), "--threads", "1"])
    out = work / "results"
    record = UnitStore(out).load("sft-ce-s0")
    steps = sorted(set(record["result"]["snapshots"].values()))
    original = {s: load_file(stages.snapshot_dir(work, "sft-ce-s0", s) / "model.safetensors") for s in steps}
    shutil.rmtree(work / "runs")                                        # a new machine: the work folder is gone
    cfg = real_study.load_config(REPO / "experiments" / "real_study.yaml", smoke=True)
    checks = stages.restore_sft(cfg, work, "sft-ce-s0", record["result"], steps, log=lambda line: None)
    assert sorted(checks) == steps
    for s in steps:
        rebuilt = load_file(stages.snapshot_dir(work, "sft-ce-s0", s) / "model.safetensors")
        assert rebuilt.keys() == original[s].keys() and all((rebuilt[k] == original[s][k]).all() for k in rebuilt)
        assert json.loads((stages.snapshot_dir(work, "sft-ce-s0", s) / stages.RESTORED).read_text())["step"] == s

    # the driver rebuilds a missing start by itself, and the unit's record says its start was rebuilt
    shutil.rmtree(work / "runs")
    lines: list[str] = []
    study.run(cfg, work, out, None, only="screen", log=lines.append)
    screen = UnitStore(out).load("screen")["result"]
    best = rules.best_accuracy(record["result"]["grid"])["step"]
    assert any(line.startswith("[restore] sft-ce-s0") for line in lines) and screen["start_restored"]["step"] == best
    assert f"screen (from sft-ce-s0 step {best})" in study.report(cfg, out).read_text()

    # a record the rerun does not reproduce: a clear error, no snapshot at that step
    tampered = copy.deepcopy(record["result"])
    next(r for r in tampered["grid"] if r["step"] == steps[-1])["columns"]["greedy_tokens"][0] += 1
    shutil.rmtree(work / "runs")
    with pytest.raises(RuntimeError, match=f"step-{steps[-1]} weights decode 1 of"):
        stages.restore_sft(cfg, work, "sft-ce-s0", tampered, steps, log=lambda line: None)
    assert not (stages.snapshot_dir(work, "sft-ce-s0", steps[-1]) / "config.json").exists()
    with pytest.raises(ValueError, match="were not evaluated"):
        stages.restore_sft(cfg, work, "sft-ce-s0", record["result"], [3], log=lambda line: None)
