"""Verifier throughput (answers/s): the process pool vs one process, on GSM8K test golds and fractions.

    python bench/bench_verify.py [--repeats 3] [--out bench/results/verify.json]

Workloads (responses are ``"... The answer is \\boxed{x}."``):
- ``gsm8k_correct``: each GSM8K test gold answer against itself (1,319 items; identical pairs are verified once
  by the pool, which is part of its design, so ``unique_pairs`` is reported too);
- ``gsm8k_shuffled``: golds against a shuffled copy (nearly all pairs distinct, nearly all incorrect);
- ``fractions``: 1,000 random ``\\frac{p}{q}`` golds against an equal (scaled or decimal) or a different value;
- ``math500_solutions``: MATH-500 gold solutions against their answers (LaTeX: intervals, tuples, radicals...).

Integers and integer fractions skip LaTeX parsing (``laser.verify.fast_parse``), so on them the pool's cost is
mostly its pipes; decimals and MATH-style answers go through math-verify's parser (~1 ms each).

Modes, each on fresh processes given the same LaTeX warm-up (:data:`laser.verify.WARMUP_PAIRS`), which is not
timed: ``single_process`` (a new interpreter runs ``check_answer`` in a loop: no timeout protection, no pipes),
``pool_1`` and ``pool_2`` (a new :class:`laser.verify.VerifierPool` with 1 and 2 workers; its start-up is
reported as ``startup_s``). The median of the repeats is reported. Needs
../shared/data for the GSM8K and MATH-500 workloads (skipped when absent).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laser.boxes import boxed, last_boxed  # noqa: E402
from laser.data import gsm8k_final_answer  # noqa: E402
from laser.io import atomic_write_json  # noqa: E402
from laser.verify import WARMUP_PAIRS, VerifierPool, check_answer, summarize  # noqa: E402


def workloads() -> dict[str, tuple[list[str], list[str]]]:
    out = {}
    gsm8k = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
    if gsm8k.exists():
        golds = [gsm8k_final_answer(json.loads(line)["answer"]) for line in gsm8k.read_text().splitlines()]
        out["gsm8k_correct"] = ([f"The answer is {boxed(g)}." for g in golds], golds)
        shuffled = golds[:]
        random.Random(0).shuffle(shuffled)
        out["gsm8k_shuffled"] = ([f"The answer is {boxed(s)}." for s in shuffled], golds)
    else:
        print(f"note: {gsm8k} absent, GSM8K workloads skipped", file=sys.stderr)
    math500 = ROOT.parent / "shared" / "data" / "benchmarks" / "math500" / "test.jsonl"
    if math500.exists():
        rows = [json.loads(line) for line in math500.read_text().splitlines()]
        out["math500_solutions"] = ([r["solution"] for r in rows], [r["answer"] for r in rows])
    rng = random.Random(1)
    responses, golds = [], []
    for _ in range(1000):
        p, q = rng.randint(1, 99), rng.randint(2, 99)
        gold = f"\\frac{{{p}}}{{{q}}}"
        kind = rng.random()
        if kind < 0.4:
            k = rng.randint(2, 9)
            pred = f"\\frac{{{p * k}}}{{{q * k}}}"
        elif kind < 0.5:
            pred = f"{p / q:.6f}"
        else:
            pred = f"\\frac{{{p + rng.randint(1, 5)}}}{{{q}}}"
        responses.append(f"The answer is {boxed(pred)}.")
        golds.append(gold)
    out["fractions"] = (responses, golds)
    return out


def _quiet() -> None:
    import logging

    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def clear_caches() -> None:
    from math_verify import parser
    from sympy.core.cache import clear_cache

    clear_cache()
    for name in ("parse_latex_cached", "parse_expr_cached"):
        fn = getattr(parser, name, None)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


def run_single(name: str) -> tuple[float, dict]:
    """One process, fresh like a pool worker: a new interpreter does the warm-up, then times the loop."""
    out = subprocess.run([sys.executable, __file__, "--single", name], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["seconds"], result["statuses"]


def _single(responses: list[str], golds: list[str]) -> tuple[float, dict]:
    _quiet()
    for pred, gold in WARMUP_PAIRS:
        check_answer(pred, gold)
    clear_caches()
    cache: dict = {}
    statuses = []
    start = time.perf_counter()
    for response, gold in zip(responses, golds):
        pred = last_boxed(response)
        statuses.append(check_answer(pred, gold, cache)[0] if pred else "no_answer")
    elapsed = time.perf_counter() - start
    return elapsed, {s: statuses.count(s) for s in sorted(set(statuses))}


def run_pool(workers: int, responses: list[str], golds: list[str], timeout_s: float) -> tuple[float, float, dict]:
    t0 = time.perf_counter()
    with VerifierPool(workers, warmup=True) as pool:
        pool.start()
        startup = time.perf_counter() - t0
        start = time.perf_counter()
        verdicts = pool.verify_batch(responses, golds, timeout_s=timeout_s)
        elapsed = time.perf_counter() - start
    counts = {k: v for k, v in summarize(verdicts).items() if k not in ("total", "accuracy") and v}
    return startup, elapsed, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "verify.json"))
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: time one workload in this process
    args = parser.parse_args()
    if args.single:
        seconds, statuses = _single(*workloads()[args.single])
        print(json.dumps({"seconds": seconds, "statuses": statuses}))
        return

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_start": os.getloadavg()},
        "repeats": args.repeats,
        "timeout_s": args.timeout_s,
        "workloads": {},
    }
    for name, (responses, golds) in workloads().items():
        entry = {"items": len(responses),
                 "unique_pairs": len({(last_boxed(r), g) for r, g in zip(responses, golds)}), "modes": {}}
        times, counts = [], None
        for _ in range(args.repeats):
            elapsed, counts = run_single(name)
            times.append(elapsed)
        entry["modes"]["single_process"] = {"seconds": statistics.median(times),
                                            "answers_per_s": len(responses) / statistics.median(times),
                                            "statuses": counts}
        for workers in (1, 2):
            startups, times = [], []
            for _ in range(args.repeats):
                startup, elapsed, counts = run_pool(workers, responses, golds, args.timeout_s)
                startups.append(startup)
                times.append(elapsed)
            entry["modes"][f"pool_{workers}"] = {"seconds": statistics.median(times),
                                                 "answers_per_s": len(responses) / statistics.median(times),
                                                 "startup_s": statistics.median(startups), "statuses": counts}
        result["workloads"][name] = entry
        rates = ", ".join(f"{mode} {m['answers_per_s']:.0f}/s" for mode, m in entry["modes"].items())
        print(f"{name}: {len(responses)} items ({entry['unique_pairs']} unique pairs): {rates}")
    result["machine"]["load_avg_end"] = os.getloadavg()
    atomic_write_json(args.out, result)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
