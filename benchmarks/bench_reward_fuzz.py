"""Fuzz the math reward with generated hostile completions: no exception, no call over 2 s, nothing executed.

    python benchmarks/bench_reward_fuzz.py                      # 10,000 completions, 2 verifier workers
    python benchmarks/bench_reward_fuzz.py --num 2000 --workers 2 --json out.json   # {"setting", "summary", "raw"}

Categories (about equal shares, seeded): nested braces, huge numbers, sympy-killers (exponent towers, huge
powers, sums and integrals), factorials, Python code (each payload would `touch` a unique file), null bytes
and control characters, lone surrogates, 100k-character strings, LaTeX junk, hedges, and honest answers
(right and wrong, so that the reward is seen to still score correctly). Every completion is scored by its own
`math_accuracy` call (the per-call time is what "0 calls over 2 s" measures); then the whole set is scored
again in batches of `--batch` completions (throughput with the workers in parallel). The load average is
recorded before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aesl_lightning.scoring import rewards  # noqa: E402
from aesl_lightning.scoring.rewards import math_accuracy, verifier_pool  # noqa: E402

LATEX_BITS = [
    "\\frac{", "\\sqrt{", "\\left(", "\\right)", "\\begin{pmatrix}", "\\end{pmatrix}", "\\\\", "&", "^{", "_{", "}",
    "{", "\\cdot", "\\times", "\\infty", "\\pi", "\\mathbb{R}", "\\text{", "\\overline{", "\\int_0^1", "\\sum_{n=1}^",
    "\\prod", "\\lim_{x\\to 0}", "\\binom{", "\\log", "\\sin", "x", "y", "=", "+", "-", "(", ")", "[", "]", ",", "!",
    "\\%", "\\$", "$", "\\boxed{", "\\dfrac", "\\cup", "\\in", "\\le", "\\ge", "\\pm", "\\,", "\\!", "\\;", "0.5",
]


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(1, 9)) + "".join(rng.choice("0123456789") for _ in range(n - 1))


def nested_braces(rng, _):
    depth = rng.choice([10, 50, 200, 1000, 5000])
    kind = rng.randrange(4)
    if kind == 0:
        return "\\boxed{" + "{" * depth + "1" + "}" * depth + "}"
    if kind == 1:
        return "\\boxed{" + "\\frac{" * depth + "1" + "}{2}" * depth + "}"
    if kind == 2:
        return "\\boxed{" * depth + "7" + "}" * (depth - rng.randint(0, 1))
    return "The answer is $" + "\\sqrt{" * depth + "2" + "}" * depth + "$"


def huge_numbers(rng, _):
    n = rng.choice([41, 100, 1000, 10_000, 90_000])
    kind = rng.randrange(4)
    if kind == 0:
        return f"\\boxed{{{_digits(rng, min(n, 200))}}}"
    if kind == 1:
        return f"The answer is {_digits(rng, n)}"
    if kind == 2:
        return f"\\boxed{{1e{_digits(rng, rng.randint(3, 8))}}}"
    return f"\\boxed{{{_digits(rng, 30)}.{_digits(rng, min(n, 200))}}}"


def sympy_killers(rng, _):
    base = rng.choice(["10", "9", "2", "x", "e", "(10^{10})"])
    towers = [
        f"{base}^{base}^{base}^{base}",
        f"{base}^{{{base}^{{{base}^{{{base}}}}}}}",
        f"{base}^{{{_digits(rng, rng.randint(5, 12))}}}",
        f"({base}^{{{_digits(rng, 4)}}})^{{{_digits(rng, 4)}}}",
        f"\\sum_{{n=1}}^{{10^{{{rng.randint(6, 30)}}}}} n^{{{rng.randint(2, 50)}}}",
        f"\\int_0^{{10^{{10}}}} x^{{{_digits(rng, 4)}}} dx",
        f"\\prod_{{k=1}}^{{{_digits(rng, 7)}}} k",
        f"(x+1)^{{{rng.randint(200, 9999)}}} - (x-1)^{{{rng.randint(200, 9999)}}}",
        f"\\binom{{{_digits(rng, 9)}}}{{{_digits(rng, 8)}}}",
        f"{_digits(rng, 30)}^{{{_digits(rng, 4)}}} \\bmod {_digits(rng, 12)}",
        "\\sqrt{" * 30 + "2" + "}" * 30,
        f"\\frac{{1}}{{0}}^{{{_digits(rng, 5)}}}",
    ]
    expr = rng.choice(towers)
    return rng.choice([f"\\boxed{{{expr}}}", f"The answer is ${expr}$", f"So {expr}"])


def factorials(rng, _):
    n = rng.choice([_digits(rng, 4), _digits(rng, 6), _digits(rng, 9), "(10!)", "((10!)!)"])
    bangs = "!" * rng.choice([1, 2, 5, 20])
    return rng.choice([f"\\boxed{{{n}{bangs}}}", f"The answer is ${n}{bangs}$", f"\\boxed{{\\factorial{{{n}}}}}"])


def code_strings(rng, proof_dir):
    target = proof_dir / f"pwned-{uuid.UUID(int=rng.getrandbits(128)).hex}"
    payloads = [
        f"__import__('os').system('touch {target}')",
        f"eval(\"__import__('os').system('touch {target}')\")",
        f"exec(\"open('{target}', 'w')\")",
        f"open('{target}', 'w').close()",
        f"(lambda: __import__('subprocess').call(['touch', '{target}']))()",
        f"[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0](['touch', '{target}'])",
        f"Symbol('x').__class__.__init__.__globals__['os'].system('touch {target}')",
        f"import os; os.system('touch {target}')",
    ]
    code = rng.choice(payloads)
    return rng.choice([f"\\boxed{{{code}}}", f"The answer is {code}", f"${code}$", code, f"\\boxed{{1}} {code}"])


def control_chars(rng, _):
    junk = "".join(chr(rng.choice([0, 1, 7, 8, 11, 12, 27, 127])) for _ in range(rng.randint(1, 2000)))
    return rng.choice([f"\\boxed{{4{junk}2}}", f"The answer is 42{junk}", junk, f"\\boxed{{{junk}}}", "\x00" * 10_000])


def lone_surrogates(rng, _):
    s = "".join(chr(rng.randint(0xD800, 0xDFFF)) for _ in range(rng.randint(1, 200)))
    return rng.choice([f"\\boxed{{{s}}}", f"\\boxed{{4{s}2}}", f"The answer is {s}42", s + "\\boxed{42}"])


def long_strings(rng, _):
    n = rng.choice([50_000, 99_990, 100_000, 150_000])
    kind = rng.randrange(6)
    if kind == 0:
        return "".join(rng.choice("abc {}\\^_$0123456789") for _ in range(n))
    if kind == 1:
        return "\\boxed{" * (n // 7)
    if kind == 2:
        return "1+" * (n // 2) + "1"
    if kind == 3:
        return "x" * (n - 12) + "\\boxed{42}"
    if kind == 4:
        return "$" * n
    return ("\\boxed{1} " * (n // 10))[:n]


def latex_junk(rng, _):
    body = "".join(rng.choice(LATEX_BITS) for _ in range(rng.randint(5, 400)))
    return rng.choice([f"\\boxed{{{body}}}", f"The answer is ${body}$", body, f"$${body}$$"])


def hedges(rng, _):
    a, b = rng.randint(1, 99), rng.randint(100, 199)
    return rng.choice([
        f"The answer is {a} or {b}", f"\\boxed{{{a}}} wait no \\boxed{{{b}", f"\\boxed{{{a}}} or \\boxed{{{b}}}",
        f"\\boxed{{{a} \\text{{ or }} {b}}}", f"\\boxed{{{a} \\lor {b}}}", f"\\boxed{{{a}, {b}}}",
    ]), str(a)


def honest(rng, _):
    a, b = rng.randint(1, 999), rng.randint(1, 999)
    right = rng.random() < 0.5
    shown = a + b if right else a + b + rng.randint(1, 9)
    kind = rng.randrange(4)
    text = [f"{a} + {b} = {shown}. The answer is \\boxed{{{shown}}}.", f"\\boxed{{\\frac{{{2 * shown}}}{{2}}}}",
            f"So the answer is {shown}.", f"The answer is ${shown}$"][kind]
    return text, str(a + b), 1.0 if right else 0.0


CATEGORIES = {
    "nested_braces": nested_braces, "huge_numbers": huge_numbers, "sympy_killers": sympy_killers,
    "factorials": factorials, "code_strings": code_strings, "control_chars": control_chars,
    "lone_surrogates": lone_surrogates, "long_strings": long_strings, "latex_junk": latex_junk,
    "hedges": hedges, "honest": honest,
}


def generate(num: int, seed: int, proof_dir: Path) -> list[tuple[str, str, str, float | None]]:
    """(category, completion, gold, expected reward or None when any 0/1 is acceptable), `num` of them."""
    rng = random.Random(seed)
    names = list(CATEGORIES)
    cases = []
    for i in range(num):
        name = names[i % len(names)]
        out = CATEGORIES[name](rng, proof_dir)
        if name == "honest":
            text, gold, expected = out
        elif name == "hedges":
            (text, gold), expected = out, 0.0
        else:
            text, gold, expected = out, rng.choice(["42", "\\frac{14}{3}", "1", "10^{10}", "\\sqrt{2}"]), None
        cases.append((name, text, gold, expected))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    proof_dir = Path(tempfile.mkdtemp(prefix="aesl-fuzz-"))
    load_before = os.getloadavg()
    cases = generate(args.num, args.seed, proof_dir)
    pool = verifier_pool(args.workers)
    started = time.perf_counter()
    pool.start()
    startup = time.perf_counter() - started

    times: dict[str, list[float]] = defaultdict(list)
    exceptions: Counter = Counter()
    wrong_expected: Counter = Counter()
    rewarded: Counter = Counter()
    scores: list[float | None] = []
    sequential_started = time.perf_counter()
    for name, text, gold, expected in cases:
        t0 = time.perf_counter()
        try:
            (score,) = math_accuracy(["p"], [text], answer=[gold])
        except Exception as err:  # noqa: BLE001 - counting them is the point
            exceptions[f"{name}: {type(err).__name__}"] += 1
            score = None
        times[name].append(time.perf_counter() - t0)
        scores.append(score)
        rewarded[name] += score == 1.0
        if expected is not None and score != expected:
            wrong_expected[name] += 1
    sequential = time.perf_counter() - sequential_started
    killed_sequential = pool.killed

    batch_times, batch_exceptions = [], 0
    batched_started = time.perf_counter()
    batched_scores = []
    for i in range(0, len(cases), args.batch):
        chunk = cases[i : i + args.batch]
        t0 = time.perf_counter()
        try:
            batched_scores += math_accuracy(["p"] * len(chunk), [c[1] for c in chunk], answer=[c[2] for c in chunk])
        except Exception:  # noqa: BLE001
            batch_exceptions += 1
        batch_times.append(time.perf_counter() - t0)
    batched = time.perf_counter() - batched_started
    pool.close()

    executed = sorted(p.name for p in proof_dir.iterdir())
    all_times = [t for ts in times.values() for t in ts]
    result = {
        "num_completions": len(cases), "workers": args.workers, "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "pool_startup_s": round(startup, 2),
        "sequential_total_s": round(sequential, 1),
        "per_call_ms": {"median": round(1e3 * statistics.median(all_times), 3),
                        "p99": round(1e3 * sorted(all_times)[int(0.99 * len(all_times))], 1),
                        "max": round(1e3 * max(all_times), 1)},
        "calls_over_2s": sum(t > 2.0 for t in all_times),
        "calls_over_1s": sum(t > 1.0 for t in all_times),
        "hard_limit_hits_sequential": killed_sequential,
        "exceptions": sum(exceptions.values()) + batch_exceptions, "exception_kinds": dict(exceptions),
        "files_created_by_payloads": len(executed),
        "expected_score_mismatches": dict(wrong_expected),
        "batched_total_s": round(batched, 1), "batch_size": args.batch,
        "batched_max_s": round(max(batch_times), 2),
        # a completion cut by the hard limit in one pass may finish in the other; anything else must agree
        "batched_vs_sequential_disagreements": sum(a != b for a, b in zip(scores, batched_scores)),
        "per_category": {
            name: {"n": len(ts), "median_ms": round(1e3 * statistics.median(ts), 3), "max_ms": round(1e3 * max(ts), 1),
                   "rewarded_1": rewarded[name]}
            for name, ts in times.items()
        },
        "limits": {"time_limit_s": rewards.DEFAULT_TIME_LIMIT, "max_answer_chars": rewards.MAX_ANSWER_CHARS,
                   "max_completion_chars": rewards.MAX_COMPLETION_CHARS},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        summary = {"calls_over_2s": result["calls_over_2s"], "calls_over_1s": result["calls_over_1s"],
                   "exceptions": result["exceptions"], "files_created_by_payloads": result["files_created_by_payloads"],
                   "expected_score_mismatches": sum(wrong_expected.values()),
                   "per_call_median_ms": result["per_call_ms"]["median"], "per_call_p99_ms": result["per_call_ms"]["p99"],
                   "per_call_max_ms": result["per_call_ms"]["max"], "sequential_total_s": result["sequential_total_s"],
                   "batched_total_s": result["batched_total_s"],
                   "batched_vs_sequential_disagreements": result["batched_vs_sequential_disagreements"]}
        setting = {"completions": args.num, "seed": args.seed, "workers": args.workers, "batch": args.batch,
                   "categories": list(CATEGORIES), **result["limits"]}
        args.json.write_text(json.dumps({"setting": setting, "summary": summary, "raw": result}, indent=2) + "\n")
    ok = result["exceptions"] == 0 and result["calls_over_2s"] == 0 and not executed
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
