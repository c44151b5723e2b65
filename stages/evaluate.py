"""DVC stage ``evaluate``: rollout parquet files -> metrics JSON, plot data + PNGs, and a Markdown report.

    python -m stages.evaluate [--params params.yaml]

``evaluate(rollouts, params, equivalent=...)`` is pure (tables in, :class:`laser.report.EvalResult` out);
``main()`` reads ``{paths.rollouts_dir}/<model>/<eval_set>.parquet`` for base and every variant of params.yaml
and writes, each atomically (:func:`laser.report.write_outputs`, which documents the files):

- ``paths.eval_metrics``: the DVC metrics JSON (layout in :func:`evaluate`; no NaN: undefined values are null
  and an ``undefined`` entry says why);
- ``paths.eval_plots/``: DVC plot data as CSV; ``paths.eval_figures/``: the same as PNGs, rendered offline;
- ``paths.eval_summary``: the compact headline per model (what ``dvc exp show`` shows);
- ``paths.eval_report``: Markdown tables and the PNGs (relative links), readable with no network.

Answer equivalence for voting is :func:`laser.answers.cluster_answers`: exact match after light normalisation,
plain numbers compared numerically, every other pair of answers judged by the ``equivalent`` function. ``main``
uses the math-verify process pool of :mod:`laser.verify` (hard timeouts); the default of :func:`evaluate` is
:func:`laser.answers.math_verify_equivalent`, in-process and guarded.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from laser import metrics as M
from laser.answers import EquivalenceFn, cluster_answers, math_verify_equivalent, verifier_equivalent
from laser.cli import stage_main
from laser.completions import completions_markdown
from laser.config import EvaluateParams, Params
from laser.errors import StageError
from laser.report import (
    HEADLINE_KEYS,
    HEADLINE_VIEW,
    EvalResult,
    hist_rows,
    reliability_rows,
    scaling_rows,
    write_outputs,
)
from laser.rollout_table import SampleTable, concat_tables, sample_table
from laser.verify import UNJUDGED

log = logging.getLogger("laser.stages.evaluate")

MODEL_ORDER = ("base",)  # then the training variants, by name
SCALING_SEED = 0


# ---------------------------------------------------------------------------------------------------- metrics


def _clean(obj: Any) -> Any:
    """JSON-ready: numpy scalars -> Python, NaN/inf -> None, int dict keys -> str."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _spearman(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """Spearman's rho of raw score vs response length over samples that have both."""
    scored = np.isfinite(flat["score"]) & np.isfinite(flat["num_tokens"])
    rho = M.spearman(flat["score"][scored], flat["num_tokens"][scored])
    spearman: dict[str, Any] = {"rho": rho, "n": int(scored.sum())}
    if rho is None:
        spearman["undefined"] = ("fewer than 2 samples with a score" if scored.sum() < 2
                                 else "score or length is constant")
    return spearman


def _block(d: SampleTable, params: EvaluateParams) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics of one sample set, extras for the plots)."""
    n = d.valid.sum(axis=1)
    flat = d.flat
    num_samples = int(d.valid.sum())
    k_max = int(n.min()) if len(n) else 0
    curves = M.scaling_curves(d.cluster, d.correct, d.score, M.scaling_ks(k_max), params.subset_seeds,
                              seed=SCALING_SEED, valid=d.valid)
    answered, judged = flat["answered"], flat["judged"]
    all_scores = np.where(answered, flat["score"], np.nan)  # no answer => score 0 (after clipping)
    # a sample the verifier could not judge has no label: it stays out of self-verification (as in training)
    sv_all = M.self_verification_report(all_scores[judged], flat["correct"][judged], params.threshold,
                                        params.ece_bins)
    sv_answered = M.self_verification_report(flat["score"][answered & judged], flat["correct"][answered & judged],
                                             params.threshold, params.ece_bins)
    block: dict[str, Any] = {
        "num_problems": len(d.problem_ids),
        "num_samples": num_samples,
        "samples_per_problem": {"min": k_max, "max": int(n.max()) if len(n) else 0},
        "counts": d.counts,
        "avg@K": float(flat["correct"].mean()) if num_samples else None,
        **{f"{curve}@k": curves[curve] for curve in ("pass", "maj", "weighted_maj", "best_of")},
        "self_verification": {"all": sv_all, "answered": sv_answered},
        # why the "all" view says nothing (None: it does not collapse)
        "sv_collapse": M.self_verification_collapse(all_scores[judged], flat["correct"][judged], params.threshold,
                                                    params.collapse_auroc),
        "spearman_score_length": _spearman(flat),
        "ci95": intervals(d, params),
    }
    if not num_samples:
        block["undefined"] = {"avg@K": "no samples"}
    extras = {
        "reliability": M.calibration_bins(M.clip_scores(all_scores[judged]), flat["correct"][judged],
                                          params.ece_bins),
        "scores": flat["score"][judged],
        "correct": flat["correct"][judged],
    }
    return block, extras


def intervals(d: SampleTable, params: EvaluateParams) -> dict[str, list[float] | None]:
    """95% bootstrap intervals over problems of accuracy (avg@K), paper-F1 and AUROC (the "all" view: a missing
    answer or score reads as score 0; unjudged samples left out, as in the headline)."""
    score = np.where(d.cluster >= 0, d.score, np.nan)
    labelled = d.valid & d.judged

    def accuracy(idx):
        valid = d.valid[idx]
        return float(d.correct[idx][valid].mean()) if valid.any() else None

    def sv_f1(idx):
        keep = labelled[idx]
        return M.self_verification(score[idx][keep], d.correct[idx][keep], params.threshold)["f1"]

    def sv_auroc(idx):
        keep = labelled[idx]
        raw = score[idx][keep]
        return M.auroc(np.where(np.isnan(raw), -np.inf, raw), d.correct[idx][keep])

    n = len(d.problem_ids)
    return {name: M.bootstrap_ci(fn, n, params.bootstrap_resamples, seed=SCALING_SEED)
            for name, fn in (("avg@K", accuracy), ("sv_f1", sv_f1), ("sv_auroc", sv_auroc))}


def headline(block: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one metrics block (K = the largest k of its scaling curves); keys:
    :data:`laser.report.HEADLINE_KEYS`."""
    k = max((int(x) for x in block["pass@k"]), default=None)

    def at(name: str) -> Any:  # keys are ints before JSON cleaning, strings after
        return None if k is None else block[name].get(k, block[name].get(str(k)))

    sv = block["self_verification"]["all"]
    return {"K": k, "avg@K": block["avg@K"], "pass@K": at("pass@k"), "maj@K": at("maj@k"),
            "weighted_maj@K": at("weighted_maj@k"), "best_of@K": at("best_of@k"),
            "sv_acc_correct": sv["acc_correct"], "sv_acc_incorrect": sv["acc_incorrect"], "sv_f1": sv["f1"],
            "sv_auroc": sv["auroc"], "sv_ece": sv["ece"],
            "spearman_score_length": block["spearman_score_length"]["rho"]}


def _model_order(names: Sequence[str]) -> list[str]:
    return [m for m in MODEL_ORDER if m in names] + sorted(m for m in names if m not in MODEL_ORDER)


# ------------------------------------------------------------------------------------------------ evaluate steps


def _load(rollouts: dict[str, dict[str, Any]], notes: list[str]) -> dict[str, dict[str, SampleTable]]:
    """``{model: {eval_set: SampleTable}}``, models in report order, eval sets sorted; a model without eval sets is
    skipped with a note."""
    data: dict[str, dict[str, SampleTable]] = {}
    for model in _model_order(list(rollouts)):
        sets = {name: sample_table(table, f"{model}/{name}") for name, table in sorted(rollouts[model].items())}
        if sets:
            data[model] = sets
        else:
            notes.append(f"model {model!r} has no eval sets; skipped")
    return data


def _assign_clusters(data: dict[str, dict[str, SampleTable]], equivalent: EquivalenceFn) -> int:
    """Set ``cluster`` of every table (answers of all models and eval sets clustered in one batch); returns the
    number of answer pairs sent to ``equivalent``."""
    everything = [d for sets in data.values() for d in sets.values()]
    clusters, num_pairs = cluster_answers([a for d in everything for a in d.answers], equivalent)
    start = 0
    for d in everything:
        rows = clusters[start : start + len(d.answers)]
        start += len(d.answers)
        cluster = np.full(d.valid.shape, -1, dtype=np.int64)
        for p, row in enumerate(rows):
            cluster[p, : len(row)] = row
        d.cluster = cluster
    return num_pairs


def _model_metrics(sets: dict[str, SampleTable], params: EvaluateParams) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``{eval_sets, overall, headline}`` of one model, the plot extras of its pooled samples)."""
    blocks = {name: _block(d, params)[0] for name, d in sets.items()}
    overall, extras = _block(concat_tables(list(sets.values())), params)
    heads = {**{name: headline(b) for name, b in blocks.items()}, "overall": headline(overall)}
    heads[HEADLINE_VIEW] = macro_headline([heads[name] for name in blocks])
    return {"eval_sets": blocks, "overall": overall, "headline": heads}, extras


def macro_headline(heads: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean over eval sets of each headline number (the paper's "Avg": each eval set weighs the same,
    whatever its size); None where any set's value is undefined. K is the sets' K when they agree."""
    out: dict[str, Any] = {}
    for key in HEADLINE_KEYS:
        values = [h[key] for h in heads]
        if key == "K":
            out[key] = values[0] if len(set(values)) == 1 else None
        else:
            out[key] = None if any(v is None for v in values) else float(np.mean(values))
    return out


def _model_notes(model: str, mm: dict[str, Any]) -> list[str]:
    """Remarks on one model's blocks: verifier timeouts/errors, missing rewards, uneven sample counts."""
    notes = []
    for name, b in {**mm["eval_sets"], "overall": mm["overall"]}.items():
        c = b["counts"]
        bad = {k: v for k, v in c.get("verify_status", {}).items() if k in UNJUDGED}
        if bad:
            notes.append(f"{model}/{name}: verify_status {bad}: counted as incorrect in accuracy, left out of "
                         "self-verification")
        if c["no_reward"]:
            notes.append(f"{model}/{name}: {c['no_reward']} samples without a reward (counted as incorrect)")
        collapse = b["sv_collapse"]
        if collapse:
            who = "the untrained base score" if model == "base" else "self-verification"
            notes.append(f"{model}/{name}: {who} collapsed: {collapse}")
        if name != "overall" and b["samples_per_problem"]["min"] != b["samples_per_problem"]["max"]:
            notes.append(f"{model}/{name}: problems have {b['samples_per_problem']['min']}–"
                         f"{b['samples_per_problem']['max']} samples; scaling curves stop at the smallest")
    return notes


def _comparison(base: dict[str, Any], trained: dict[str, Any], model: str, notes: list[str]) -> dict[str, Any]:
    """One trained model's headline against the base model's: ``{view: {key: {base, trained, delta}}}``."""
    common = [name for name in base["eval_sets"] if name in trained["eval_sets"]]
    names = [*common]
    if set(base["eval_sets"]) == set(trained["eval_sets"]):
        names += ["overall", HEADLINE_VIEW]
    else:
        notes.append(f"base and {model} have different eval sets: the comparison covers the common ones only "
                     f"({', '.join(common) or 'none'}), not 'overall' nor '{HEADLINE_VIEW}'")
    out = {}
    for name in names:
        hb, ht = base["headline"][name], trained["headline"][name]
        out[name] = {key: {"base": hb[key], "trained": ht[key],
                           "delta": None if hb[key] is None or ht[key] is None else ht[key] - hb[key]}
                     for key in HEADLINE_KEYS}
    return out


def _plot_rows(out_models: dict[str, Any], extras: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``scaling_<eval_set>`` (eval sets sorted), ``score_hist`` and ``reliability`` plot rows."""
    plots: dict[str, list[dict[str, Any]]] = {}
    for name in sorted({name for mm in out_models.values() for name in mm["eval_sets"]}):
        plots[f"scaling_{name}"] = scaling_rows(
            {m: mm["eval_sets"][name] for m, mm in out_models.items() if name in mm["eval_sets"]})
    plots["score_hist"] = hist_rows(extras)
    plots["reliability"] = reliability_rows(extras)
    return plots


def evaluate(rollouts: dict[str, dict[str, Any]], params: EvaluateParams,
             equivalent: EquivalenceFn = math_verify_equivalent) -> EvalResult:
    """Evaluate rollouts: ``rollouts[model][eval_set]`` is a pyarrow.Table or pandas.DataFrame following the
    rollout parquet contract (README "Contracts"; columns used: problem_id, sample_idx, pred_answer, reward, score,
    num_tokens, and finish_reason / verify_status when present, for counts).

    ``metrics`` layout::

        settings: {threshold, ece_bins, subset_seeds, scaling_seed}
        models.<model>.eval_sets.<eval_set> and models.<model>.overall (all eval sets pooled), each:
          num_problems, num_samples, samples_per_problem {min, max}, counts {no_answer, no_score, no_reward,
          finish_reason {...}, verify_status {...}}, avg@K, pass@k / maj@k / weighted_maj@k / best_of@k
          {"1": acc, "2": acc, ...}, self_verification.{all, answered}: {n, n_correct, n_incorrect,
          n_predicted_correct, acc_correct, acc_incorrect, f1, precision, recall, f1_standard, auroc, ece,
          undefined {metric: reason}}, sv_collapse (why "all" self-verification says nothing, or null),
          spearman_score_length {rho, n[, undefined]}, ci95 {avg@K, sv_f1, sv_auroc}: [low, high] (bootstrap over
          problems)
        models.<model>.headline.<eval_set | overall | macro>: {K, avg@K, pass@K, maj@K, weighted_maj@K,
          best_of@K, sv_acc_correct, sv_acc_incorrect, sv_f1, sv_auroc, sv_ece, spearman_score_length};
          ``macro`` (the headline, the paper's "Avg") is the mean over eval sets, ``overall`` pools their samples
        comparison (with base and at least one other model): <model>.<eval_set | overall | macro>.<headline key>:
          {base, trained (the model's value), delta}
        headline_view: "macro"
        run (the stage adds it): {model, variants {<name>: {method, train_steps, train_seed}}, seeds {rollout},
          git_revision, params_digest}
        equivalence: {pairs_checked, pairs_unjudged {timeout, error, too_long} (the stage adds it)}

    Conventions: k runs over 1, 2, 4, … up to the smallest sample count of a problem (plus that count when it is
    not a power of two); a problem's vote/best-of response is its earliest member (see laser.metrics); "all"
    self-verification reads a missing score or a missing answer as score 0, "answered" keeps only samples with
    an extractable answer (a missing score still reads 0); both leave out samples the verifier could not judge
    (timeout, error: counted in ``counts.unjudged``); AUROC ranks raw scores, a missing one lowest. Best-of
    ranks unanswered samples last. Spearman uses raw scores of samples that have one.
    """
    notes: list[str] = []
    data = _load(rollouts, notes)
    num_pairs = _assign_clusters(data, equivalent)
    out_models: dict[str, Any] = {}
    extras: dict[str, dict[str, Any]] = {}
    for model, sets in data.items():
        out_models[model], extras[model] = _model_metrics(sets, params)
        notes += _model_notes(model, out_models[model])
    metrics: dict[str, Any] = {
        "settings": {"threshold": params.threshold, "ece_bins": params.ece_bins,
                     "subset_seeds": params.subset_seeds, "scaling_seed": SCALING_SEED},
        "headline_view": HEADLINE_VIEW,
        "models": out_models,
        "equivalence": {"pairs_checked": num_pairs},
    }
    trained = [m for m in out_models if m != "base"]
    if "base" in out_models and trained:
        metrics["comparison"] = {m: _comparison(out_models["base"], out_models[m], m, notes) for m in trained}
    return EvalResult(metrics=_clean(metrics), plots=_clean(_plot_rows(out_models, extras)), notes=notes)


# ------------------------------------------------------------------------------------------------------- main


def read_rollouts(rollouts_dir: str | Path, models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{model: {eval_set: pyarrow.Table}}`` from ``<rollouts_dir>/<model>/<eval_set>.parquet`` for each of
    ``models`` (base and the variants of params.yaml; another directory there is an earlier run's and is left
    alone); a model without rollouts is an error naming the stage that makes them."""
    import pyarrow.parquet as pq

    root = Path(rollouts_dir)
    out: dict[str, dict[str, Any]] = {}
    for model in models:
        files = sorted(f for f in (root / model).glob("*.parquet") if not f.name.startswith("."))
        if not files:
            stage = "rollout_base" if model == "base" else f"rollout@{model}"
            raise StageError(f"no rollout files for model {model!r}: expected {root / model}/<eval_set>.parquet "
                             f"(dvc repro {stage})")
        out[model] = {f.stem: pq.read_table(f) for f in files}
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in out) if root.is_dir() else []
    if others:
        log.info("not evaluated (not base nor a variant in params.yaml): %s", ", ".join(others))
    return out


def run(params: Params, _args: Any = None) -> None:
    """Read the rollouts of base and of every training variant, evaluate them with the verifier pool as the
    equivalence check, write every output."""
    rollouts = read_rollouts(params.paths.rollouts_dir, ["base", *params.variants])
    log.info("evaluating %s", {m: sorted(s) for m, s in rollouts.items()})
    unjudged: Counter[str] = Counter()
    equivalent = verifier_equivalent(params.verifier.timeout_s, params.verifier.num_workers, unjudged)
    result = evaluate(rollouts, params.evaluate, equivalent=equivalent)
    result.metrics["equivalence"]["pairs_unjudged"] = {k: unjudged[k] for k in (*sorted(UNJUDGED), "too_long")}
    if sum(unjudged.values()):
        result.notes.append(f"answer equivalence: {sum(unjudged.values())} pair(s) could not be judged "
                            f"({dict(unjudged)}) and count as different answers in voting")
    result.metrics["run"] = run_header(params)
    trained = {v: params.paths.trained(v) for v in params.variants}
    result.appendix = "\n".join(f"### {v}\n\n{text}" for v, p in trained.items()
                                if (text := completions_markdown(p.completions)))  # "" when train kept none
    write_outputs(result, params.paths, params.evaluate.threshold, {v: p.curves for v, p in trained.items()})
    for model, mm in result.metrics["models"].items():
        log.info("%s %s: %s", model, HEADLINE_VIEW, mm["headline"][HEADLINE_VIEW])
    for note in result.notes:
        log.warning("%s", note)
    log.info("wrote %s, %s, %s/, %s/, %s", params.paths.eval_summary, params.paths.eval_metrics,
             params.paths.eval_plots, params.paths.eval_figures, params.paths.eval_report)


def run_header(params: Params) -> dict[str, Any]:
    """What the report's header names: model, steps, seeds, the git revision evaluated and a params digest."""
    import dataclasses
    import hashlib
    import json
    import subprocess

    def git(*args: str) -> str | None:
        out = subprocess.run(["git", *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    revision = git("rev-parse", "--short=12", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if revision else False
    relevant = {k: v for k, v in dataclasses.asdict(params).items() if k not in ("paths", "flow")}
    variants = {}
    for name in params.variants:
        v = params.for_variant(name)
        variants[name] = {"method": "LaSeR" if v.self_reward.enabled else "GRPO", "train_steps": v.train.steps,
                          "train_seed": v.train.seed}
    return {"model": params.model.name, "variants": variants, "seeds": {"rollout": params.rollout.seed},
            "git_revision": None if revision is None else revision + (" + uncommitted changes" if dirty else ""),
            "params_digest": hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]}


def main(argv: Sequence[str] | None = None) -> None:
    stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
