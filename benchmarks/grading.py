"""Throughput of answer grading (:mod:`rewards.grading`, math-verify): 10,000 (completion, gold) pairs.

    python benchmarks/grading.py                 # 10,000 pairs, each workload once
    python benchmarks/grading.py --pairs 2000 --repeats 3
    python benchmarks/grading.py --math-pairs 2000      # a shorter all-distinct MATH workload

Prints one JSON object. Workloads (every string is distinct unless said so, so parse caches
do not help unless the workload repeats strings on purpose):

- ``tiny``: tiny-world completions (integers, some malformed) against integer golds;
- ``math``: MATH-style completions (``... so the answer is \\boxed{<LaTeX>}``) against LaTeX golds
  (fractions, radicals, sets, polynomials, intervals), half right, half wrong;
- ``math_repeated``: the same, drawn from 200 distinct (completion, gold) pairs: the parse cache
  at work, as in GRPO where a prompt's gold label is graded once per completion;
- ``vote_groups_of_8``: ``majority_vote`` over groups of 8 MATH-style completions, all different
  (``--vote-completions``, default 2,000): the worst case, every pair of a group compared.

Parse caches are cleared before each timed run; times are medians over ``--repeats`` of wall
clock (``seconds``) and of this process's CPU time (``cpu_seconds``: less sensitive to a shared
machine), on the main thread (the guard is ``setitimer``; off the main thread the same work
runs in a worker process).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _latex_pool(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` distinct (answer, equal-but-differently-written gold) LaTeX pairs."""
    out = []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(2, 999)
        kind = i % 6
        if kind == 0:
            out.append((f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{2 * a}}}{{{2 * b}}}"))
        elif kind == 1:
            out.append((f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}"))
        elif kind == 2:
            out.append((f"\\{{{a},{b}\\}}", f"\\{{{b},{a}\\}}"))
        elif kind == 3:
            out.append((f"x^2+{a}x+{b}", f"{b}+{a}x+x^2"))
        elif kind == 4:
            out.append((f"x={a}.{b}", f"{a}.{b}"))
        else:
            out.append((f"[{a}, {a + b})", f"[{a},{a + b})"))
    return out


def workloads(n: int, seed: int = 0) -> dict[str, tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    tiny_c, tiny_g = [], []
    for i in range(n):
        gold = rng.randint(-99, 198)
        guess = gold if rng.random() < 0.6 else gold + rng.randint(-9, 9)
        text = str(guess) if i % 10 else rng.choice([f"{guess}{guess}", f"4-{abs(guess)}", "", "=", f"{guess} 1"])
        tiny_c.append(text)
        tiny_g.append(str(gold))
    pool = _latex_pool(rng, n)
    math_c, math_g = [], []
    for i, (answer, gold) in enumerate(pool):
        wrong = pool[(i + 1) % n][0]
        math_c.append(f"Step {i}: we simplify. So the answer is \\boxed{{{answer if i % 2 else wrong}}}.")
        math_g.append(gold)
    small = _latex_pool(random.Random(seed + 1), 200)
    rep_c = [f"So the answer is \\boxed{{{small[i % 200][0]}}}." for i in range(n)]
    rep_g = [small[i % 200][1] for i in range(n)]
    return {"tiny": (tiny_c, tiny_g), "math": (math_c, math_g), "math_repeated": (rep_c, rep_g)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--math-pairs", type=int, default=None,
                        help="pairs of the all-distinct MATH workload (default: --pairs)")
    parser.add_argument("--vote-completions", type=int, default=2_000, help="completions of the vote workload")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("rewards.grading").setLevel(logging.ERROR)
    from rewards import MajorityVote
    from rewards.grading import SKIPPED, clear_caches, grade

    grade(["\\boxed{1}"], ["1"])  # imports and math-verify's regex compilation, outside the timing
    report: dict = {"pairs": args.pairs, "repeats": args.repeats}
    loads = workloads(args.pairs)
    if args.math_pairs is not None:
        loads["math"] = workloads(args.math_pairs)["math"]
    for name, (texts, gold) in loads.items():
        times, cpu, scores = [], [], None
        for _ in range(args.repeats):
            clear_caches()
            start, start_cpu = time.perf_counter(), time.process_time()
            scores = grade(texts, gold)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        seconds = statistics.median(times)
        report[name] = {"seconds": round(seconds, 3), "cpu_seconds": round(statistics.median(cpu), 3),
                        "pairs": len(texts), "pairs_per_s": round(len(texts) / seconds, 1),
                        "pairs_per_cpu_s": round(len(texts) / statistics.median(cpu), 1),
                        "accuracy": round(sum(s or 0.0 for s in scores) / len(scores), 4)}
    texts = workloads(args.vote_completions)["math"][0]
    times, cpu = [], []
    for _ in range(args.repeats):
        clear_caches()
        start, start_cpu = time.perf_counter(), time.process_time()
        MajorityVote()(prompts=[i // 8 for i in range(len(texts))], completions=texts)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    seconds = statistics.median(times)
    report["vote_groups_of_8"] = {"seconds": round(seconds, 3), "cpu_seconds": round(statistics.median(cpu), 3),
                                  "completions_per_s": round(len(texts) / seconds, 1),
                                  "completions_per_cpu_s": round(len(texts) / statistics.median(cpu), 1)}
    report["skipped"] = dict(SKIPPED)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
