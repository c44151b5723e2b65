"""The math-verify process pool: extraction, statuses, hard timeouts, errors, threads, and gold data checks."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import pytest

from laser.boxes import boxed, last_boxed
from laser.verify import STATUSES, Verdict, VerifierPool, fast_parse, summarize, verify_batch

TIMEOUT_S = 2.0
# sympy evaluates 9^(9^9) (a 370-million-digit integer) when comparing: minutes at best. Parsing is instant.
PATHOLOGICAL = "\\boxed{9^{9^{9}}}"


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2) as p:
        p.start()
        yield p


# ------------------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize("text, expected", [
    ("The answer is \\boxed{18}.", "18"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
    ("\\fbox{7}", "7"),
    ("so \\boxed 5 and done", "5"),
    ("$\\boxed{ 42 }$", "42"),
    ("\\boxed{\\boxed{3}}", "\\boxed{3}"),  # nested: the outer box, one answer
    ("\\boxed{3} and a truncated \\boxed{4", "3"),  # an unclosed box is no answer
    ("no box here: 18", None),
    ("\\boxedfoo{3}", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_box_scan_is_linear():
    """Finding the boxes used to rescan the rest of the text per box (20k boxes: 5 s, 60k: 49 s)."""
    from laser.boxes import find_boxes

    text = "so \\boxed{1} " * 20_000
    start = time.monotonic()
    assert len(find_boxes(text)) == 20_000
    assert time.monotonic() - start < 1.0


def test_boxed_wraps():
    assert boxed("x+1") == "\\boxed{x+1}"
    assert last_boxed(boxed("\\frac{3}{4}")) == "\\frac{3}{4}"


def test_fast_parse_matches_math_verify_parse():
    """The shortcut for integers and integer fractions must give exactly what math-verify's parser gives."""
    import sympy
    from math_verify import parse

    rng = random.Random(0)
    cases = ["0", "-0", "+5", "007", "12345678901234567890", "\\frac{4}{2}", "\\frac{-3}{4}", "-\\frac{-3}{4}",
             "\\frac{0}{5}", "0/3", "4/2", "-\\dfrac{10}{4}"]
    for _ in range(40):
        a, b = rng.randint(-999, 999), rng.randint(1, 999)
        cases += [str(a), f"\\frac{{{a}}}{{{b}}}", f"-\\dfrac{{{abs(a)}}}{{{b}}}", f"{a}/{b}",
                  f"\\tfrac{{{abs(a)}}}{{{b}}}"]

    def canon(parsed):
        return [x if isinstance(x, str) else sympy.srepr(x) for x in parsed]

    for case in cases:
        assert fast_parse(case) is not None, case
        assert canon(fast_parse(case)) == canon(parse(boxed(case), parsing_timeout=None)), case
    for other in ("\\frac{1}{0}", "1/0", "2.5", "x", "1,000", "\\frac{a}{2}", "9^{9^{9}}"):
        assert fast_parse(other) is None, other


# ---------------------------------------------------------------------------------------------------------- statuses


def test_statuses_and_rewards(pool):
    responses = ["3 + 4 = 7. The answer is \\boxed{7}.", "\\boxed{8}", "seven", "\\boxed{}", "\\boxed{0.5}",
                 "\\boxed{\\dfrac{1}{2}}", "\\boxed{1,000}", "\\boxed{27}"]
    golds = ["7", "7", "7", "7", "\\frac{1}{2}", "0.5", "1000", 27]  # AIME-style int gold
    verdicts = pool.verify_batch(responses, golds, timeout_s=TIMEOUT_S)
    assert [v.status for v in verdicts] == ["correct", "incorrect", "no_answer", "no_answer", "correct", "correct",
                                            "correct", "correct"]
    assert [v.reward for v in verdicts] == [1, 0, 0, 0, 1, 1, 1, 1]
    assert verdicts[0] == Verdict("correct", 1, "7", None)
    assert verdicts[2].pred_answer is None


def test_single_boxed_gate(pool):
    responses = ["\\boxed{3} or maybe \\boxed{7}", "\\boxed{7}"]
    loose = pool.verify_batch(responses, ["7", "7"], timeout_s=TIMEOUT_S)
    strict = pool.verify_batch(responses, ["7", "7"], timeout_s=TIMEOUT_S, require_single_boxed=True)
    assert [v.status for v in loose] == ["correct", "correct"]
    assert [v.status for v in strict] == ["no_answer", "correct"]
    assert strict[0].pred_answer == "7"  # still reported


def test_answer_math_verify_gives_up_on_is_an_error_not_incorrect(pool):
    """``1+1+...+1`` (5001 terms, correct) is too deep for math-verify's parser, which then compares strings: not
    a judgement. Malformed LaTeX is still the answer's fault (incorrect), and a short sum is judged."""
    long_sum = "+".join(["1"] * 5001)
    verdicts = pool.verify_batch([boxed(long_sum), boxed("x+"), boxed("+".join(["1"] * 50)), "\\boxed{5}"],
                                 ["5001", "5", "50", "9" * 5000], timeout_s=30)
    assert [v.status for v in verdicts] == ["error", "incorrect", "correct", "error"]
    assert "gave up" in verdicts[0].error and "RecursionError" in verdicts[0].error
    assert verdicts[0].pred_answer == long_sum and verdicts[0].reward == 0
    assert "gold" in verdicts[3].error
    assert summarize(verdicts)["error"] == 2


def test_unparseable_gold_is_an_error_not_a_silent_zero(pool):
    verdicts = pool.verify_batch(["\\boxed{5}", "\\boxed{5}"], ["}", "5"], timeout_s=TIMEOUT_S)
    assert verdicts[0].status == "error" and "gold" in verdicts[0].error and verdicts[0].reward == 0
    assert verdicts[1].status == "correct"
    counts = summarize(verdicts)
    assert counts["error"] == 1 and counts["correct"] == 1 and counts["total"] == 2


def test_summarize_counts_every_status():
    verdicts = [Verdict(s, int(s == "correct"), None) for s in ("correct", "correct", "timeout", "error")]
    counts = summarize(verdicts)
    assert set(STATUSES) <= set(counts)
    assert counts == {"correct": 2, "incorrect": 0, "no_answer": 0, "timeout": 1, "error": 1, "total": 4,
                      "accuracy": 0.5}
    assert summarize([])["accuracy"] == 0.0


def test_mismatched_lengths_and_bad_timeout(pool):
    with pytest.raises(ValueError, match="gold"):
        pool.verify_batch(["\\boxed{1}"], [], timeout_s=1)
    with pytest.raises(ValueError, match="timeout_s"):
        pool.verify_batch(["\\boxed{1}"], ["1"], timeout_s=0)
    assert pool.verify_batch([], [], timeout_s=1) == []


# ----------------------------------------------------------------------------------------- timeouts, deaths, threads


def test_pathological_item_times_out_and_the_rest_is_verified(pool):
    responses = [f"\\boxed{{{i}}}" for i in range(40)]
    golds = [str(i) for i in range(40)]
    responses[17] = PATHOLOGICAL
    golds[17] = "5"
    start = time.monotonic()
    verdicts = pool.verify_batch(responses, golds, timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert verdicts[17].status == "timeout" and verdicts[17].reward == 0 and verdicts[17].pred_answer == "9^{9^{9}}"
    assert all(v.status == "correct" for i, v in enumerate(verdicts) if i != 17)
    assert elapsed < TIMEOUT_S + 2.0, elapsed  # the stuck worker is killed, not waited on
    # the pool is whole again: the replaced worker serves the next batch
    assert [v.status for v in pool.verify_batch(["\\boxed{2}"] * 3, ["2"] * 3, timeout_s=TIMEOUT_S)] == ["correct"] * 3


def test_finding_the_box_is_inside_the_per_item_deadline(pool):
    """The box scan runs in the worker: a response that takes longer to scan than ``timeout_s`` times out, and a
    long one within budget (60k boxes) is judged in about its budget, not outside it."""
    deep = "\\boxed{" + "{}" * 1_000_000 + "} so \\boxed{1}"  # two million braces to balance first
    slow, fine = pool.verify_batch([deep, "\\boxed{2}"], ["1", "2"], timeout_s=0.02)
    assert slow.status == "timeout" and slow.pred_answer is None
    assert fine.status == "correct"
    many = "\\boxed{7} " * 60_000
    start = time.monotonic()
    assert pool.verify_batch([many], ["7"], timeout_s=TIMEOUT_S)[0].status == "correct"
    assert time.monotonic() - start < TIMEOUT_S + 1.0


def test_worker_killed_mid_item_gives_error(pool):
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        v=pool.verify_batch([PATHOLOGICAL, "\\boxed{3}"], ["5", "3"], timeout_s=60)))
    thread.start()
    time.sleep(1.0)
    busy = [w for w in list(pool._workers) if w.pending]
    assert busy, "the pathological item should be running"
    os.kill(busy[0].process.pid, signal.SIGKILL)
    thread.join(30)
    assert not thread.is_alive()
    first, second = result["v"]
    assert first.status == "error" and "died" in first.error and first.reward == 0
    assert second.status == "correct"


def test_idle_worker_death_is_repaired(pool):
    victim = pool._workers[0].process
    victim.kill()
    victim.wait(10)
    verdicts = pool.verify_batch([f"\\boxed{{{i}}}" for i in range(20)], [str(i) for i in range(20)],
                                 timeout_s=TIMEOUT_S)
    assert all(v.status == "correct" for v in verdicts)


def test_worker_that_cannot_start_is_a_clear_error(monkeypatch):
    import laser.verify

    monkeypatch.setattr(laser.verify.sys, "executable", "/bin/false")
    with VerifierPool(num_workers=1) as broken, pytest.raises(laser.verify.VerifierError, match="start"):
        broken.verify_batch(["\\boxed{1}"], ["1"], timeout_s=1)


def test_module_level_verify_batch_from_threads():
    """Prefect runs tasks in threads: math-verify's signal timeouts would raise there; the pool does not."""
    results: dict[int, list[Verdict]] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            results[k] = verify_batch([f"\\boxed{{{k}}}", f"\\boxed{{{k + 1}}}", "no box"], [str(k)] * 3,
                                      timeout_s=TIMEOUT_S, num_workers=2)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for k in range(4):
        assert [v.status for v in results[k]] == ["correct", "incorrect", "no_answer"]


def test_closed_pool_refuses_work():
    pool = VerifierPool(num_workers=1)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.verify_batch(["\\boxed{1}"], ["1"], timeout_s=1)


# ------------------------------------------------------------------------------------------------ real gold answers


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _gsm8k_golds(shared_data):
    from laser.data import gsm8k_final_answer

    return [gsm8k_final_answer(r["answer"]) for r in _jsonl(shared_data / "gsm8k" / "test.jsonl")]


@pytest.mark.shared_data
def test_math500_gold_solutions_verify(pool, shared_data):
    rows = _jsonl(shared_data / "benchmarks" / "math500" / "test.jsonl")
    verdicts = pool.verify_batch([r["solution"] for r in rows], [r["answer"] for r in rows], timeout_s=5)
    counts = summarize(verdicts)
    assert counts["correct"] >= 0.99 * len(rows), counts


@pytest.mark.shared_data
def test_gsm8k_gold_answers_verify_and_shuffled_are_rejected(pool, shared_data):
    golds = _gsm8k_golds(shared_data)
    verdicts = pool.verify_batch([f"So the answer is {boxed(g)}." for g in golds], golds, timeout_s=5)
    assert summarize(verdicts)["correct"] >= 0.995 * len(golds), summarize(verdicts)

    shuffled = golds[:]
    random.Random(0).shuffle(shuffled)
    differ = [i for i, (a, b) in enumerate(zip(golds, shuffled)) if a != b]  # equal ones are rightly accepted
    verdicts = pool.verify_batch([boxed(shuffled[i]) for i in differ], [golds[i] for i in differ], timeout_s=5)
    rejected = sum(v.status == "incorrect" for v in verdicts)
    assert rejected >= 0.99 * len(differ), summarize(verdicts)


@pytest.mark.shared_data
def test_math500_shuffled_answers_are_rejected(pool, shared_data):
    rows = _jsonl(shared_data / "benchmarks" / "math500" / "test.jsonl")
    answers = [r["answer"] for r in rows]
    shuffled = answers[:]
    random.Random(1).shuffle(shuffled)
    differ = [i for i, (a, b) in enumerate(zip(answers, shuffled)) if a.strip() != b.strip()]
    verdicts = pool.verify_batch([rows[i]["solution"] for i in differ], [shuffled[i] for i in differ], timeout_s=5)
    rejected = sum(v.status == "incorrect" for v in verdicts)
    assert rejected >= 0.99 * len(differ), summarize(verdicts)
