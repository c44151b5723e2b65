"""stages/evaluate.py: answer clustering, the pure evaluate() on crafted rollouts, edge cases, and main() end to end."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laser import answers as A
from laser import report as R
from laser.config import EvaluateParams
from laser.errors import StageError
from stages import evaluate as E

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rollout_table(problems: dict[str, list[tuple]], eval_set: str = "synthetic") -> pa.Table:
    """Rows following the README's rollout parquet contract. problems[pid] = [(pred_answer, reward, score), ...]."""
    rows = []
    for pid, samples in problems.items():
        for i, (pred, reward, score) in enumerate(samples):
            finished = score is not None
            rows.append({
                "problem_id": pid,
                "sample_idx": i,
                "prompt_token_ids": [1, 2, 3],
                "response_token_ids": [4] * (5 + 3 * i) + ([2] if finished else []),
                "response": "" if pred is None else f"so \\boxed{{{pred}}}",
                "finish_reason": "eos" if finished else "length",
                "num_tokens": 5 + 3 * i + int(finished),
                "pred_answer": pred,
                "verify_status": "no_answer" if pred is None else ("correct" if reward else "incorrect"),
                "reward": reward,
                "z_c_logprob": None if score is None else -3.0 + score,
                "score": score,
                "gold_answer": "7",
                "eval_set": eval_set,
            })
    schema = pa.schema([
        ("problem_id", pa.string()), ("sample_idx", pa.int64()), ("prompt_token_ids", pa.list_(pa.int64())),
        ("response_token_ids", pa.list_(pa.int64())), ("response", pa.string()), ("finish_reason", pa.string()),
        ("num_tokens", pa.int64()), ("pred_answer", pa.string()), ("verify_status", pa.string()),
        ("reward", pa.int64()), ("z_c_logprob", pa.float64()), ("score", pa.float64()),
        ("gold_answer", pa.string()), ("eval_set", pa.string()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def no_math_verify(pairs):
    raise AssertionError(f"unexpected equivalence query {pairs}")


# Problem p1: plain vote picks the wrong "3" (3 votes), weighted vote picks "7" (0.9 + 0.8 = 1.7 > 0.4)
# Problem p2: "7" and "7.0" are one numeric cluster (2 votes, right); weighted agrees; best-of picks "7.0"
TRAINED = {
    "p1": [("3", 0, 0.1), ("3", 0, 0.2), ("3", 0, 0.1), ("7", 1, 0.9)],
    "p2": [("7", 1, 0.6), (None, 0, 0.95), ("7.0", 1, 0.7), ("5", 0, None)],
}
BASE = {
    "p1": [("3", 0, 0.5), ("3", 0, 0.5), ("7", 1, 0.5), ("7", 1, 0.5)],
    "p2": [("7", 1, 0.5), ("7", 1, 0.5), ("5", 0, 0.5), ("5", 0, 0.5)],
}


# -------------------------------------------------------------------------------------------------- clustering


def test_normalize_answer():
    assert A.normalize_answer(" $\\dfrac{1}{2}$ ") == "\\frac{1}{2}"
    assert A.normalize_answer("\\left( 1, 2 \\right).") == "(1,2)"
    assert A.normalize_answer("  ") is None
    assert A.normalize_answer(None) is None
    assert A.normalize_answer(float("nan")) is None


def test_cluster_answers_exact_numeric_and_equivalence():
    seen = []

    def fake(pairs):
        seen.extend(pairs)
        return [{a, b} == {"\\frac{1}{2}", "0.5"} or {a, b} == {"\\frac12", "0.5"} for a, b in pairs]

    ids, num_pairs = A.cluster_answers(
        [["\\frac{1}{2}", "2", None, "0.5", " \\dfrac{1}{2}", "2.0", "\\frac12", ""], ["x", "x"]], fake)
    # exact after normalisation: \frac{1}{2} == \dfrac{1}{2}; numeric: 2 == 2.0; fake: 0.5 ~ both fractions
    assert ids == [[0, 1, -1, 0, 0, 1, 0, -1], [0, 0]]
    assert num_pairs == len(seen) == 7  # 5 groups = 10 pairs, minus the 3 pairs of plain numbers
    assert ("2", "0.5") not in seen


def test_math_verify_equivalent():
    assert A.math_verify_equivalent([("\\frac{1}{2}", "0.5"), ("2", "3"), ("x+1", "1+x"), ("", "1")]) == [
        True, False, True, False]
    assert A.math_verify_equivalent([("1" * 400, "1" * 400)]) == [False]  # too long: not sent to sympy
    assert A.math_verify_equivalent([]) == []


def test_verifier_equivalent_counts_the_pairs_it_cannot_judge():
    unjudged = collections.Counter()
    equivalent = A.verifier_equivalent(timeout_s=5.0, num_workers=1, unjudged=unjudged)
    assert equivalent([("\\frac{1}{2}", "0.5"), ("1" * 400, "1" * 400), ("2", "3")]) == [True, False, False]
    assert unjudged == {"too_long": 1}  # counted, not silently "different"


# ------------------------------------------------------------------------------------------------- evaluate()


def test_evaluate_hand_values():
    result = E.evaluate({"trained": {"synthetic": rollout_table(TRAINED)}, "base": {"synthetic": rollout_table(BASE)}},
                        EvaluateParams(subset_seeds=2), equivalent=no_math_verify)
    json.dumps(result.metrics, allow_nan=False)
    assert list(result.metrics["models"]) == ["base", "trained"]
    t = result.metrics["models"]["trained"]["eval_sets"]["synthetic"]
    assert t["num_problems"] == 2 and t["num_samples"] == 8
    assert t["avg@K"] == pytest.approx(3 / 8)
    assert t["pass@k"]["4"] == 1.0
    assert t["pass@k"]["1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert t["maj@k"]["4"] == 0.5  # p1 wrong ("3"), p2 right ("7" ~ "7.0")
    assert t["weighted_maj@k"]["4"] == 1.0  # p1 right: 1.7 vs 0.4
    assert t["best_of@k"]["4"] == 1.0  # p1: 0.9 right; p2: 0.95 has no answer and ranks last, 0.7 is right
    assert t["counts"]["no_answer"] == 1 and t["counts"]["no_score"] == 1
    assert t["counts"]["finish_reason"] == {"eos": 7, "length": 1}
    sv = t["self_verification"]
    # all: scores .1 .2 .1 .9 | .6 0(no answer) .7 0(no score); correct: 3,6,... -> correct {.9,.6,.7} all above
    assert sv["all"]["acc_correct"] == 1.0
    assert sv["all"]["acc_incorrect"] == 1.0  # .1 .2 .1 0 0 all at or below 0.5
    assert sv["all"]["f1"] == 1.0 and sv["all"]["auroc"] == 1.0
    assert sv["answered"]["n"] == 7 and sv["answered"]["n_incorrect"] == 4
    assert t == result.metrics["models"]["trained"]["overall"]  # one eval set: overall is the same block
    b = result.metrics["models"]["base"]["eval_sets"]["synthetic"]
    assert b["self_verification"]["all"]["acc_correct"] == 0.0  # 0.5 is not above the threshold
    assert b["self_verification"]["all"]["acc_incorrect"] == 1.0
    assert b["self_verification"]["all"]["f1"] == 0.0
    assert b["spearman_score_length"]["rho"] is None
    assert b["spearman_score_length"]["undefined"] == "score or length is constant"
    cmp = result.metrics["comparison"]["trained"]["synthetic"]
    assert cmp["weighted_maj@K"]["trained"] == 1.0
    assert cmp["sv_f1"]["delta"] == pytest.approx(1.0)
    assert set(result.metrics["comparison"]["trained"]) == {"synthetic", "overall", "macro"}
    assert set(result.plots) == {"scaling_synthetic", "score_hist", "reliability"}
    assert [r["k"] for r in result.plots["scaling_synthetic"]] == [1, 2, 4]
    assert result.plots["scaling_synthetic"][-1]["trained_weighted_maj"] == 1.0
    hist = result.plots["score_hist"]
    assert sum(r["trained_correct"] for r in hist) == 3 and sum(r["trained_incorrect"] for r in hist) == 4


def test_unjudged_samples_stay_out_of_self_verification():
    """A verifier timeout has no label: before, it counted as an incorrect sample in the self-verification
    metrics (training already left it out)."""
    table = rollout_table({"p": [("7", 1, 0.9), ("3", 0, 0.1), ("8", 0, 0.95)]})
    statuses = table.column("verify_status").to_pylist()
    statuses[2] = "timeout"
    table = table.set_column(table.schema.get_field_index("verify_status"), "verify_status", pa.array(statuses))
    result = E.evaluate({"trained": {"s": table}}, EvaluateParams(subset_seeds=1), equivalent=no_math_verify)
    block = result.metrics["models"]["trained"]["eval_sets"]["s"]
    for view in ("all", "answered"):
        sv = block["self_verification"][view]
        assert (sv["n"], sv["acc_incorrect"], sv["f1"], sv["auroc"]) == (2, 1.0, 1.0, 1.0)
    assert block["counts"]["unjudged"] == 1
    assert block["avg@K"] == pytest.approx(1 / 3)  # accuracy still counts it (as incorrect), as official
    assert any("left out of self-verification" in note for note in result.notes)


def test_macro_average_over_eval_sets_is_the_headline():
    """overall pools samples (a large set dominates); macro weighs each eval set the same (the paper's Avg)."""
    big = {f"p{i}": [("7", 1, 0.9), ("7", 1, 0.8)] for i in range(9)}
    small = {"q": [("1", 0, 0.9), ("2", 0, 0.8)]}
    result = E.evaluate({"trained": {"big": rollout_table(big), "small": rollout_table(small)}},
                        EvaluateParams(subset_seeds=1), equivalent=no_math_verify)
    heads = result.metrics["models"]["trained"]["headline"]
    assert heads["overall"]["avg@K"] == pytest.approx(18 / 20)
    assert heads["macro"]["avg@K"] == pytest.approx((1.0 + 0.0) / 2)
    assert heads["macro"]["sv_f1"] is None  # undefined on both sets (one class each): no average of nothing
    assert heads["macro"]["K"] == 2 and result.metrics["headline_view"] == "macro"
    report = R.render_report(result, "plots")
    assert "macro-average over eval sets" in report


def test_report_labels_the_base_score_as_untrained():
    result = E.evaluate({"trained": {"s": rollout_table(TRAINED)}, "base": {"s": rollout_table(BASE)}},
                        EvaluateParams(subset_seeds=1), equivalent=no_math_verify)
    report = R.render_report(result, "plots")
    assert "base (untrained score)" in report


def test_evaluate_accepts_pandas_and_pools_overall():
    pytest.importorskip("pandas")
    other = {"q1": [("1", 1, 0.9), ("2", 0, 0.1)]}
    result = E.evaluate({"trained": {"a": rollout_table(TRAINED).to_pandas(), "b": rollout_table(other)}},
                        EvaluateParams(subset_seeds=2), equivalent=no_math_verify)
    overall = result.metrics["models"]["trained"]["overall"]
    assert overall["num_problems"] == 3 and overall["num_samples"] == 10
    assert overall["samples_per_problem"] == {"min": 2, "max": 4}
    assert list(overall["pass@k"]) == ["1", "2"]  # stops at the smallest sample count
    assert overall["avg@K"] == pytest.approx(4 / 10)
    assert "comparison" not in result.metrics


@pytest.mark.parametrize(("case", "problems"), [
    ("all_correct", {"p": [("7", 1, 0.9), ("7", 1, 0.2)]}),
    ("all_wrong", {"p": [("1", 0, 0.9), ("2", 0, 0.2)], "q": [("3", 0, None), ("3", 0, 0.1)]}),
    ("single_sample", {"p": [("7", 1, 0.9)]}),
    ("no_answers", {"p": [(None, 0, 0.9), (None, 0, None)], "q": [(None, 0, 0.3), (None, 0, 0.1)]}),
    ("no_scores", {"p": [("7", 1, None), ("3", 0, None)]}),
])
def test_evaluate_edge_cases_are_defined(case, problems):
    result = E.evaluate({"trained": {"s": rollout_table(problems)}}, EvaluateParams(subset_seeds=2),
                        equivalent=no_math_verify)
    text = json.dumps(result.metrics, allow_nan=False)  # no NaN anywhere
    block = result.metrics["models"]["trained"]["overall"]
    for curve in ("pass@k", "maj@k", "weighted_maj@k", "best_of@k"):
        assert all(isinstance(v, float) for v in block[curve].values()), (case, curve)
    for view in ("all", "answered"):
        sv = block["self_verification"][view]
        for key in ("acc_correct", "acc_incorrect", "f1", "precision", "recall", "f1_standard", "auroc", "ece"):
            assert sv[key] is None or math.isfinite(sv[key])
            assert (sv[key] is None) == (key in sv["undefined"]), (case, view, key)
    if case == "all_correct":
        assert block["maj@k"]["2"] == 1.0 and block["self_verification"]["all"]["acc_incorrect"] is None
    if case == "all_wrong":
        assert block["pass@k"]["2"] == 0.0 and block["self_verification"]["all"]["acc_correct"] is None
    if case == "single_sample":
        assert list(block["pass@k"]) == ["1"] and block["spearman_score_length"]["rho"] is None
    if case == "no_answers":
        assert block["maj@k"]["2"] == 0.0 and block["self_verification"]["answered"]["n"] == 0
        assert block["self_verification"]["all"]["acc_incorrect"] == 1.0  # no answer => score 0
    if case == "no_scores":
        assert block["spearman_score_length"]["undefined"] == "fewer than 2 samples with a score"
    report = R.render_report(result, "plots")
    assert "nan" not in report.lower() and "NaN" not in text


def test_duplicate_samples_are_rejected():
    table = rollout_table({"p": [("1", 1, 0.5), ("1", 1, 0.5)]})
    table = table.set_column(1, "sample_idx", pa.array([0, 0], pa.int64()))
    with pytest.raises(StageError, match="duplicate sample_idx"):
        E.evaluate({"base": {"s": table}}, EvaluateParams(), equivalent=no_math_verify)


# --------------------------------------------------------------------------------------------------- main()


def test_main_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(
        "paths:\n  rollouts_dir: out/rollouts\n  eval_metrics: out/eval/metrics.json\n"
        "  eval_plots: out/eval/plots\n  eval_figures: out/eval/figures\n  eval_summary: out/eval/summary.json\n"
        "  eval_report: out/eval/report.md\n  train_dir: out/train\n"
        "variants:\n  laser: {}\n  grpo: {self_reward: {enabled: false}}\n"
        "evaluate:\n  subset_seeds: 2\n  threshold: 0.5\n  ece_bins: 5\n")
    # a LaTeX answer beside a decimal one exercises the math-verify equivalence in main()'s verifier pool
    latex = {"p3": [("\\frac{1}{2}", 1, 0.8), ("0.5", 1, 0.7), ("2", 0, 0.4), ("2", 0, 0.1)]}
    # "old": an earlier run's variant, not in params.yaml: not evaluated
    for model, problems in (("base", BASE), ("laser", {**TRAINED, **latex}), ("grpo", TRAINED), ("old", BASE)):
        for eval_set in ("setA", "set-b"):
            path = Path("out/rollouts", model, f"{eval_set}.parquet")
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(rollout_table(problems, eval_set), path)

    E.main([])

    metrics = json.loads(Path("out/eval/metrics.json").read_text())
    assert set(metrics) == {"settings", "headline_view", "models", "equivalence", "comparison", "run"}
    assert metrics["run"]["model"] == "smollm2-135m-instruct" and len(metrics["run"]["params_digest"]) == 12
    assert metrics["run"]["git_revision"] is None  # tmp_path is not a git checkout: said so, not invented
    assert metrics["settings"]["ece_bins"] == 5
    assert metrics["equivalence"]["pairs_unjudged"] == {"timeout": 0, "error": 0, "too_long": 0}
    assert list(metrics["models"]) == ["base", "grpo", "laser"]
    assert metrics["run"]["variants"] == {"laser": {"method": "LaSeR", "train_steps": 8, "train_seed": 0},
                                          "grpo": {"method": "GRPO", "train_steps": 8, "train_seed": 0}}
    trained = metrics["models"]["laser"]
    assert set(trained) == {"eval_sets", "overall", "headline"}
    assert set(trained["eval_sets"]) == {"setA", "set-b"}
    assert set(trained["headline"]) == {"setA", "set-b", "overall", "macro"}
    assert set(trained["headline"]["overall"]) == set(R.HEADLINE_KEYS)
    # p3: \frac{1}{2} ~ 0.5 (math-verify) gives 2 votes for the right answer against 2 for "2": the earliest wins
    assert trained["eval_sets"]["setA"]["maj@k"]["4"] == pytest.approx(2 / 3)
    assert metrics["equivalence"]["pairs_checked"] >= 1
    assert set(metrics["comparison"]) == {"grpo", "laser"}
    assert set(metrics["comparison"]["laser"]) == {"setA", "set-b", "overall", "macro"}

    plots, figures = Path("out/eval/plots"), Path("out/eval/figures")
    names = {"scaling_setA", "scaling_set-b", "score_hist", "reliability"}
    assert {p.name for p in plots.iterdir()} == {f"{n}.csv" for n in names}
    assert {p.name for p in figures.iterdir()} == {f"{n}.png" for n in names}
    for name in names:
        assert (figures / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
        header = (plots / f"{name}.csv").read_text().splitlines()[0]
        assert header.startswith("k,") if name.startswith("scaling") else header.startswith("bin_lower,")
    report = Path("out/eval/report.md").read_text()
    for name in names:
        assert f"](figures/{name}.png)" in report
    summary = json.loads(Path("out/eval/summary.json").read_text())
    assert set(summary) == {"base", "grpo", "laser", "K"} and summary["K"] == 4
    assert summary["laser"]["accuracy"] == trained["headline"]["macro"]["avg@K"]
    assert set(summary["laser"]) == {"accuracy", "maj", "weighted_maj", "sv_f1", "sv_auroc", "sv_ece"}
    assert "## Training" not in report  # no training curves in this directory: no section pointing at nothing
    assert "## base vs laser" in report and "## base vs grpo" in report
    # the paper's main table: rows Base / GRPO / LaSeR per eval set and the macro-average
    main = report[report.index("## Main table"):report.index("## Headline numbers")]
    for view in ("setA", "set-b", "macro"):
        block = main[main.index(f"**{view}**"):]
        rows = [line.split(" | ")[0].lstrip("| ") for line in block.splitlines()[4:7]]
        assert rows == ["Base", "GRPO (`grpo`)", "LaSeR (`laser`)"], block
        laser_row = block.splitlines()[6]
        macro = trained["headline"][view]
        assert f"| {macro['avg@K']:.3f} | {macro['maj@K']:.3f} | {macro['weighted_maj@K']:.3f} |" in laser_row
    assert "params digest `" + metrics["run"]["params_digest"] in report and "unknown (not a git checkout)" in report
    assert "## 95% intervals (bootstrap over problems) and collapse" in report
    for block in (trained["overall"], trained["eval_sets"]["setA"]):
        low, high = block["ci95"]["avg@K"]
        assert low <= block["avg@K"] <= high
    assert not list(Path("out/eval").glob(".*tmp*"))  # no temp files left behind


def test_a_collapsed_self_verification_is_named_in_the_notes():
    """Every trained score above the threshold: the report says it calls everything correct."""
    everything_yes = {f"p{i}": [("7", 1, 0.9), ("3", 0, 0.8), ("7", 1, 0.95), ("4", 0, 0.7)] for i in range(6)}
    separating = {f"p{i}": [("7", 1, 0.9), ("3", 0, 0.1), ("7", 1, 0.8), ("4", 0, 0.2)] for i in range(6)}
    for problems, collapsed in ((everything_yes, True), (separating, False)):
        result = E.evaluate({"trained": {"s": rollout_table(problems)}}, EvaluateParams(bootstrap_resamples=50),
                            equivalent=no_math_verify)
        reason = result.metrics["models"]["trained"]["overall"]["sv_collapse"]
        assert (reason is not None) == collapsed
        if collapsed:
            assert "calls every sample correct" in reason
            assert any("trained/overall: self-verification collapsed" in n for n in result.notes)


def test_report_ends_with_the_last_train_steps_completions(tmp_path):
    from laser.completions import completions_markdown

    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps({"step": s, "sample": 0, "prompt_tail": f"What is {s} + 1?",
                                        "response": "\\boxed{2}", "answer": "2", "finish_reason": "eos",
                                        "reward": 1.0, "judged": True, "score": 0.7}) + "\n" for s in (1, 2)))
    result = E.evaluate({"trained": {"s": rollout_table(TRAINED)}}, EvaluateParams(subset_seeds=1),
                        equivalent=no_math_verify)
    result.appendix = completions_markdown(path)
    report = R.render_report(result, "plots")
    assert "Sampled completions (train step 2)" in report and "What is 2 + 1?" in report
    assert "What is 1 + 1?" not in report
