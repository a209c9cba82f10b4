"""The strategy world's pre-registered rules and checks (experiments/world/), on hand-made grids with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from world import analysis, rules, study  # noqa: E402

from aesl_lightning.study.units import UnitStore  # noqa: E402


def _row(step: int, target_rate: float, greedy: float, entropy: list[float], bleu: list[float], strategy_counts=None, pass1=0.5,
         success=0.5) -> dict:
    counts = strategy_counts or [[0, 4, 0, 0]] * len(entropy)
    return {"step": step,
            "summary": {"target_rate": target_rate, "greedy_accuracy": greedy, "pass@1": pass1,
                        "strategy_shares": {"direct": 0.0, "round": 1.0, "column": 0.0, "other": 0.0},
                        "strategy_success": {"round": {"n": 8, "success": success}}},
            "columns": {"token_entropy": entropy, "self_bleu": bleu, "strategy_counts": counts}}


def test_format_gate_and_best_accuracy_take_the_first_of_equal_maxima():
    grid = [_row(0, 0.0, 0.1, [1.0], [0.0]), _row(4, 0.85, 0.5, [1.0], [0.0]), _row(8, 0.9, 0.5, [1.0], [0.0]), _row(16, 0.5, 0.2, [1.0], [0.0])]
    assert [r["step"] for r in rules.gated(grid)] == [4, 8]
    assert rules.best_accuracy(grid)["step"] == 4  # a later tie does not replace it


def test_turning_point_needs_a_drop_beyond_the_noise_margin():
    n = 16
    flat = [1.0 + 0.01 * (i % 2) for i in range(n)]
    peak = [2.0 + 0.01 * (i % 3) for i in range(n)]
    dropped = [0.5 + 0.01 * (i % 5) for i in range(n)]
    zero = [0.0] * n
    grid = [_row(0, 0.0, 0.0, peak, zero), _row(2, 0.9, 0.3, flat, zero), _row(4, 0.9, 0.3, peak, zero), _row(8, 0.9, 0.3, dropped, zero)]
    tp = rules.turning_point(grid)
    assert (tp["peak_step"], tp["detected"], tp["drop_step"], tp["format_step"]) == (4, True, 8, 2)  # step 0 is not gated

    noisy = [(1.0 if i % 2 else -1.0) for i in range(n)]  # mean 0, SD 1: a 0.1 drop is well inside 2 SE
    grid = [_row(2, 0.9, 0.3, [0.1 + x for x in noisy], zero), _row(4, 0.9, 0.3, noisy[::-1], zero)]
    tp = rules.turning_point(grid)
    assert tp["peak_step"] == 2 and not tp["detected"]

    assert rules.turning_point([_row(0, 0.1, 0.0, peak, zero)])["reason"] == "format never learned"


def test_paper_score_is_entropy_minus_self_bleu_and_strategy_score_is_entropy_in_bits():
    assert rules.paper_score({"token_entropy": [1.5, 0.5], "self_bleu": [0.5, float("nan")]}) == [1.0, 0.5]
    assert rules.strategy_score({"strategy_counts": [[2, 2, 0, 0], [4, 0, 0, 0], [1, 1, 1, 1]]}) == [1.0, 0.0, 2.0]


def test_m3_and_m3b_read_the_gate_the_end_shares_and_the_accuracy_left_for_rl():
    zero = [0.0]
    grid = [_row(0, 0.0, 0.0, zero, zero, pass1=0.0, success=0.6), _row(8, 0.9, 0.4, zero, zero, pass1=0.35, success=0.6),
            _row(128, 0.95, 0.4, zero, zero, pass1=0.3, success=0.55)]
    m = analysis.m3({"grid": grid})
    assert m["format_step"] == 8 and m["pass"] and m["M3b"] and m["pass1_at_format_step"] == 0.35
    grid[1]["summary"]["pass@1"] = 0.02  # format learned but (almost) nothing solved: RL would have no signal
    assert not analysis.m3({"grid": grid})["M3b"]
    grid[-1]["summary"]["strategy_success"]["round"]["success"] = 0.3  # the cold-start strategy eroded by more than 0.1
    assert not analysis.m3({"grid": grid})["pass"]


def test_manipulation_check_pairs_each_prompt_of_pass_2_with_its_pass_1():
    def batch(rewards):
        return [{"a": i, "b": i, "reward": r} for i, r in enumerate(rewards)]

    rl = {"per_step": [batch([0.0, 0.5]), batch([1.0, 0.5])]}  # a pool of 2 prompts, 2 per step: step 0 is pass 1, step 1 pass 2
    p = analysis.passes(rl, pool_size=2, per_step=2)
    assert p["prompts"] == 2 and p["pass1"] == 0.25 and p["pass2"] == 0.75 and p["gain"] == 0.5
    assert p["se"] == pytest.approx(0.5)  # differences 1.0 and 0.0: sample SD 0.707, over sqrt(2) prompts


def _cfg(seeds, control_seeds=None):
    return {"coldstarts": {"narrow": ["round"], "best": ["column"], "all": ["direct", "round", "column"]},
            "main": {"seeds": seeds, "arms": ["rl_only", "ce_best_acc", "aesl_end", "best_ce_turning"], "sft_only": [["all", "ce"]],
                     **({"control_seeds": control_seeds} if control_seeds else {})}}


def test_main_units_run_seed_by_seed_main_world_first_and_controls_on_their_own_seeds():
    ids = [u.id for u in study.main_units(_cfg([0, 1]))]
    assert ids == ["base", "sft-narrow-aesl-s0", "sft-narrow-ce-s0", "sft-best-ce-s0", "sft-all-ce-s0",
                   "rl-rl_only-s0", "rl-ce_best_acc-s0", "rl-aesl_end-s0", "rl-best_ce_turning-s0",
                   "sft-narrow-aesl-s1", "sft-narrow-ce-s1", "sft-best-ce-s1", "sft-all-ce-s1",
                   "rl-rl_only-s1", "rl-ce_best_acc-s1", "rl-aesl_end-s1", "rl-best_ce_turning-s1"]
    ids = [u.id for u in study.main_units(_cfg([0, 1], {"best": [0], "all": [1]}))]
    assert "sft-best-ce-s1" not in ids and "rl-best_ce_turning-s1" not in ids and "sft-all-ce-s0" not in ids
    assert "sft-best-ce-s0" in ids and "sft-all-ce-s1" in ids and "rl-ce_best_acc-s1" in ids


def test_a_record_made_under_other_settings_is_refused(tmp_path):
    cfg = {"world": {"x": 1}, "base": {"steps": 3}}
    unit = study.stamp(cfg, [study.Unit("base", "base")])[0]
    store = UnitStore(tmp_path)
    store.save("base", {"kind": "base", "params": {**unit.params, "config": "someotherone"}, "deps": [], "result": {},
                        "machine": {"busy": False, "seconds": 1.0}})
    with pytest.raises(SystemExit, match="recorded under other settings"):
        study.check_records([unit], store)


def _check(step, success, shares=(0.35, 0.35, 0.3), target=0.0):
    names = ("direct", "round", "column")
    return {"step": step, "summary": {"strategy_shares": {**dict(zip(names, shares)), "other": 0.0}, "target_rate": target,
                                      "strategy_success": {k: {"n": 100, "success": v} for k, v in zip(names, success)}}}


def test_the_base_is_the_first_snapshot_that_passes_m1_m2_with_a_usable_round_strategy():
    checks = [_check(1250, (0.5, 0.3, 0.9)),        # round too weak
              _check(1000, (0.2, 0.05, 0.6)),       # earlier, round too weak (order is by step, not by list position)
              _check(1500, (0.6, 0.55, 0.9)),       # the first that qualifies
              _check(1750, (0.7, 0.7, 0.95)),       # also qualifies, but later
              _check(2000, (0.95, 0.94, 0.96))]     # spread too small (M1 fails)
    assert analysis.choose_base(checks) == 1500
    assert analysis.choose_base([checks[0], checks[-1]]) is None
    assert analysis.choose_base([_check(1500, (0.6, 0.55, 0.9), target=0.05)]) is None  # M2: the base already writes the target format


def test_the_generation_cap_must_fit_every_strategy_in_either_format():
    import copy

    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments" / "strategy_world.yaml").read_text())
    longest = study.longest_solution(cfg)
    # 3-digit sums written column by column in the target format: 100-105 characters, + the end token
    assert longest == {"tokens": 106, "strategy": "column", "format": "target"}
    study.check_generation_cap(cfg)  # the frozen config fits
    short = copy.deepcopy(cfg)
    short["eval"]["max_new_tokens"] = 96  # amendment 9: every column solution in the target format was cut
    with pytest.raises(SystemExit, match="96 cuts solutions before their answer: a column solution in the target format takes up to 106"):
        study.check_generation_cap(short)


def test_superseded_rl_records_do_not_make_main_results():
    from world import report

    record = {"kind": "rl", "machine": {"busy": False, "seconds": 100.0, "start": {}, "end": {}}, "result": {},
              "superseded": "made with a cap that cut the best strategy (amendment 9)"}
    summary = report.summarise({"main": {"seeds": [0]}, "rl": {}}, {"rl-ce_end-s0-v5e": record})
    assert "comparisons" not in summary and "arms" not in summary
    assert summary["costs"]["rl"]["idle_units"] == 1  # still counted where the pre-flight lists costs


def test_a_fresh_checkout_rebuilds_the_weights_its_pending_units_need_and_checks_them_against_the_records(tmp_path):
    """Weights are not committed: a new checkout rebuilds the base (stopped at its chosen step) and the SFT run a pending
    RL unit starts from, and each rebuild must reproduce its record's evaluations exactly, else the study stops."""
    import json

    import torch

    import strategy_world as driver

    torch.set_num_threads(1)
    cfg = driver.load_config(driver.HERE / "strategy_world.yaml", smoke=True)
    out, work = tmp_path / "out", tmp_path / "work"
    units = study.main_units(cfg)
    first = [u for u in units if u.id in ("base", "sft-narrow-ce-s0")]
    study.run(cfg, work, out, first, None, check_cap=False)
    assert not (out / "restores.jsonl").exists()  # nothing was missing

    import shutil

    shutil.rmtree(work)  # a fresh checkout: records, no weights
    later = [u for u in units if u.id in ("base", "sft-narrow-ce-s0", "rl-ce_end-s0")]
    study.run(cfg, work, out, later, None, check_cap=False)
    log = [json.loads(line) for line in (out / "restores.jsonl").read_text().splitlines()]
    assert [(e["unit"], e["matches_record"]) for e in log] == [("base", True), ("sft-narrow-ce-s0", True)]
    assert UnitStore(out).done("rl-ce_end-s0")
    base = UnitStore(out).load("base")["result"]["weights"]  # the base is kept beside the records, file by file
    assert "model.safetensors" in base["sha256"] and (out / base["folder"] / "model.safetensors").is_file()
    cpu = UnitStore(out).load("rl-ce_end-s0")["machine"]["start"]["cpu"]
    assert cpu["cores"] >= 1 and isinstance(cpu["flags"], list)

    store = UnitStore(out)  # a record the rebuild cannot reproduce stops the study before any unit runs
    record = store.load("sft-narrow-ce-s0")
    record["result"]["grid"][-1]["summary"]["pass@1"] = 0.123456
    store.save("sft-narrow-ce-s0", record)
    shutil.rmtree(work / "runs" / "sft-narrow-ce-s0")
    with pytest.raises(SystemExit, match="did not reproduce"):
        study.run(cfg, work, out, [u for u in units if u.id in ("base", "sft-narrow-ce-s0", "rl-ce_turning-s0")], None, check_cap=False)
    assert not store.done("rl-ce_turning-s0")

    shutil.rmtree(work / "base")  # a committed base file that is not the recorded one is refused, not used
    kept = out / store.load("base")["result"]["weights"]["folder"] / "config.json"
    kept.write_text(kept.read_text() + " ")
    with pytest.raises(SystemExit, match="not the recorded file"):
        study.run(cfg, work, out, [u for u in units if u.id in ("base", "rl-rl_only-s0")], None, check_cap=False)


def test_under_a_deadline_a_seed_starts_only_if_all_its_pending_units_fit():
    from aesl_lightning.study.units import Unit

    class Empty:
        def records(self):
            return {}

        def done(self, unit_id):
            return unit_id == "sft-narrow-ce-s0"

    units = [Unit("base", "base"), Unit("sft-narrow-ce-s0", "sft", ("base",), {"seed": 0}), Unit("rl-ce_end-s0", "rl", (), {"seed": 0}),
             Unit("sft-narrow-ce-s1", "sft", ("base",), {"seed": 1}), Unit("rl-ce_end-s1", "rl", (), {"seed": 1}),
             Unit("rl-rl_only-s2", "rl", (), {"seed": 2})]
    planned = {"base": 0, "sft": 100, "rl": 100}
    kept = study.whole_seeds(units, Empty(), planned, deadline=1000 + 250, now=1000)
    # seed 0 needs 100 s (its SFT is done), seed 1 200 s more: 300 > 250, so seed 1 is refused whole; seed 2 (100 s) fits after seed 0
    assert [u.id for u in kept] == ["base", "sft-narrow-ce-s0", "rl-ce_end-s0", "rl-rl_only-s2"]
    assert study.whole_seeds(units, Empty(), planned, deadline=None, now=0) == units


def test_a_set_of_superseded_main_runs_is_summarised_apart_and_never_pooled():
    import json

    from world import report

    units = Path(__file__).resolve().parents[1] / "experiments" / "results" / "strategy-world" / "units"
    records = {p.stem: json.loads(p.read_text()) for p in units.glob("rl-*-s0-avx2.json")}
    assert records, "the avx2 records of seed 0 are the fixture"
    cfg = {"main": {"seeds": [0, 1], "arms": ["rl_only", "ce_end"], "control_seeds": {}}, "rl": {"pool_size": 128, "prompts_per_step": 16}}
    summary = report.summarise(cfg, records)
    assert "arms" not in summary  # nothing current
    apart = summary["superseded_main"]["avx2"]["arms"]
    assert set(apart) == {"rl_only", "ce_end"} and apart["ce_end"]["seeds"] == 1
    assert apart["ce_end"]["test_accuracy"] == [records["rl-ce_end-s0-avx2"]["result"]["test"]["summary"]["greedy_accuracy"]]


def test_rl_moved_only_when_the_paired_gain_exceeds_two_standard_errors():
    assert analysis.moved({"gain": 0.10, "se": 0.04})
    assert not analysis.moved({"gain": 0.10, "se": 0.05})  # exactly 2 SE is not beyond it
    assert not analysis.moved({"gain": -0.5, "se": 0.01})  # a fall is not "moved"
    assert not analysis.moved({"gain": 0.0, "se": 0.0})    # rl_only: every reward 0
    assert not analysis.moved({"gain": 0.2, "se": float("nan")})


def _rl_record(before, after, ids=None):
    ids = ids or list(range(len(before)))
    return {"result": {"start_test": {"columns": {"id": ids, "greedy_correct": before}},
                       "test": {"columns": {"id": list(range(len(after))), "greedy_correct": after}}}}


def test_rl_gain_pairs_each_test_problem_after_rl_with_itself_before():
    records = {"rl-ce_end-s0": _rl_record([0, 0, 1, 1], [1, 1, 1, 0]), "rl-ce_end-s1": _rl_record([0, 1, 1, 1], [1, 1, 1, 1])}
    g = analysis.rl_gain(records, "ce_end", [0, 1, 2])
    assert g["seeds"] == 2 and g["difference"]["estimate"] == pytest.approx((0.25 + 0.25) / 2)
    assert analysis.rl_gain({"rl-ce_end-s0": records["rl-ce_end-s0"]}, "ce_end", [0]) is None  # one seed: no interval
    records["rl-ce_end-s1"] = _rl_record([0, 1, 1, 1], [1, 1, 1, 1], ids=[3, 2, 1, 0])
    with pytest.raises(ValueError, match="rl-ce_end-s1: the test before and after RL are not the same problems"):
        analysis.rl_gain(records, "ce_end", [0, 1])


def test_signal_tracking_ranks_each_signal_against_the_strategy_entropy():
    # strategy entropy falls over the gated points (2, 1, 0 bits); token entropy and distinct answers fall with it,
    # self-BLEU rises (so it correlates negatively), pass@k - pass@1 goes the other way
    counts = [[[1, 1, 1, 1]], [[2, 2, 0, 0]], [[4, 0, 0, 0]]]
    rows = []
    for i, c in enumerate(counts):
        row = _row(8 * (i + 1), 0.9, 0.3, [1.0 - 0.3 * i], [0.2 + 0.3 * i], strategy_counts=c)
        row["summary"].update(token_entropy=1.0 - 0.3 * i, self_bleu=0.2 + 0.3 * i, distinct_answers=3.0 - i, **{"pass@k_minus_pass@1": 0.1 * i})
        rows.append(row)
    t = analysis.signal_tracking(rows)
    assert t == {"paper": pytest.approx(1.0), "token_entropy": pytest.approx(1.0), "self_bleu": pytest.approx(-1.0),
                 "distinct_answers": pytest.approx(1.0), "pass@k_minus_pass@1": pytest.approx(-1.0)}
    assert set(analysis.signal_tracking(rows[:2]).values()) == {None}  # two points give no rank correlation


def _comparison(low, high, seeds=10, planned=10, moved=((10, 10), (10, 10))):
    return {"verdict": "inconclusive", "difference": {"estimate": (low + high) / 2, "low": low, "high": high}, "seeds": seeds,
            "planned_seeds": planned, "rl_moved": {"a": list(moved[0]), "b": list(moved[1])},
            "read": all(2 * m[0] > m[1] for m in moved)}


def test_a_comparison_is_read_only_at_its_planned_seeds_and_when_rl_moved_in_most_units_of_both_arms():
    from world import report

    assert report._reading("C2: turning point vs best accuracy", _comparison(-0.02, 0.05)) == "inconclusive"
    assert report._reading("C2: turning point vs best accuracy", _comparison(-0.02, 0.05, seeds=4)).startswith("interim, no verdict")
    r = report._reading("C2: turning point vs best accuracy", _comparison(-0.02, 0.05, moved=((5, 10), (10, 10))))
    assert r.startswith("not read: RL did not move in most units of both arms (a 5/10, b 10/10)")
    # the `best` control predicts no effect: as predicted only when the whole interval lies inside +-0.03
    assert report._reading(report.CONTROL_BEST, _comparison(-0.02, 0.025, seeds=5, planned=5)).startswith("as predicted")
    assert report._reading(report.CONTROL_BEST, _comparison(-0.058, 0.018, seeds=5, planned=5)).startswith("not as predicted")


def test_the_all_control_is_as_predicted_only_when_its_decline_stays_below_the_smallest_effect():
    from world import report

    def c1(high, n=5):
        return {"seeds": [{}] * n, "planned_seeds": 5, "decline": {"difference": {"low": -0.05, "high": high}, "verdict": "refuted"}}

    assert report._c1_reading(c1(0.08), control=True).startswith("as predicted (no collapse")
    assert report._c1_reading(c1(0.7), control=True).startswith("not as predicted")
    assert report._c1_reading(c1(0.08), control=False) == "refuted"
    assert report._c1_reading(c1(0.08, n=3), control=True).startswith("interim at 3 of 5 seeds")
