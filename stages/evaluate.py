"""DVC stage ``evaluate``: rollout parquet files -> metrics JSON, plot data + PNGs, and a Markdown report.

``evaluate(rollouts, params, equivalent=...)`` is pure (tables in, :class:`EvalResult` out); ``main()`` reads
``{paths.rollouts_dir}/<model>/<eval_set>.parquet`` for every model directory and file present and writes, each
atomically:

- ``paths.eval_metrics``: the DVC metrics JSON (layout in :func:`evaluate`; no NaN: undefined values are null
  and an ``undefined`` entry says why);
- ``paths.eval_plots/``: DVC plot data as CSV (``scaling_<eval_set>.csv``: x = ``k``, y = ``<model>_<curve>``;
  ``score_hist.csv``: x = ``bin_center``, y = ``<model>_correct`` / ``<model>_incorrect``; ``reliability.csv``:
  x = ``<model>_confidence`` or ``bin_center``, y = ``<model>_accuracy``) and the same as PNGs, rendered offline;
- ``paths.eval_report``: Markdown tables and the PNGs (relative links), readable with no network.

Answer equivalence for voting: per problem, answers are grouped by exact match after light normalisation
(:func:`normalize_answer`); two plain numbers are compared numerically; every other pair of group
representatives goes to the ``equivalent`` function (a batch of (a, b) pairs -> bools), and groups judged
equivalent are merged (transitively). ``main`` uses the math-verify process pool of :mod:`laser.verify` (hard
timeouts); the default of :func:`evaluate` is :func:`math_verify_equivalent`, in-process and guarded.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from laser import metrics as M
from laser.config import EvaluateParams, PathsParams, load_params
from laser.io import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger("laser.stages.evaluate")

EquivalenceFn = Callable[[Sequence[tuple[str, str]]], list[bool]]

REQUIRED_COLUMNS = ("problem_id", "sample_idx", "pred_answer", "reward", "score", "num_tokens")
CURVES = ("pass", "maj", "weighted_maj", "best_of")
CURVE_TITLES = {"pass": "pass@k", "maj": "maj@k", "weighted_maj": "self-reward-weighted maj@k",
                "best_of": "best-of-k by score"}
MODEL_ORDER = ("base", "trained")
HIST_BINS = 25
MAX_VERIFY_CHARS = 300  # longer answers are compared as normalised strings only (math-verify can hang on them)
SCALING_SEED = 0


@dataclass
class EvalResult:
    """What :func:`evaluate` computes. ``metrics`` is JSON-ready; ``plots`` maps a plot name (file stem) to its
    rows (CSV columns = the keys of the first row); ``notes`` are remarks a reader should see."""

    metrics: dict[str, Any]
    plots: dict[str, list[dict[str, Any]]]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- answer equivalence

_LATEX_SPACING = re.compile(r"\\[!,;: ]|\\left|\\right|\\displaystyle")


def normalize_answer(answer: Any) -> str | None:
    """Light normalisation for exact matching: strip ``$``, spacing macros, ``\\left``/``\\right``, whitespace,
    a trailing period; ``\\dfrac``/``\\tfrac`` -> ``\\frac``. None (or NaN, or empty after normalising) -> None."""
    if not isinstance(answer, str):
        return None
    s = answer.strip().strip("$")
    s = _LATEX_SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = "".join(s.split()).rstrip(".")
    return s or None


def _as_number(normalized: str) -> float | None:
    try:
        value = float(normalized)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def math_verify_equivalent(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """In-process math-verify equivalence of answer pairs (a as gold, b as prediction, both wrapped in
    ``\\boxed{}``), with math-verify's signal timeouts disabled (they work only on the main thread).

    Guarded: an answer longer than ``MAX_VERIFY_CHARS`` or any exception gives False. There is no hard timeout
    here; :func:`verifier_equivalent` runs the same check in a process pool that has one.
    """
    if not pairs:
        return []
    from math_verify import parse, verify

    cache: dict[str, Any] = {}

    def parsed(text: str) -> Any:
        if text not in cache:
            try:
                cache[text] = parse("\\boxed{" + text + "}", parsing_timeout=None)
            except Exception:
                cache[text] = []
        return cache[text]

    out = []
    for a, b in pairs:
        if len(a) > MAX_VERIFY_CHARS or len(b) > MAX_VERIFY_CHARS:
            out.append(False)
            continue
        pa, pb = parsed(a), parsed(b)
        try:
            out.append(bool(pa and pb and verify(pa, pb, timeout_seconds=None)))
        except Exception:
            out.append(False)
    return out


def verifier_equivalent(timeout_s: float, num_workers: int = 2) -> EquivalenceFn:
    """An equivalence function backed by :func:`laser.verify.verify_batch` (process pool, hard timeouts):
    b is equivalent to a when ``\\boxed{b}`` verifies "correct" against gold a. Timeouts and errors: False."""

    def equivalent(pairs: Sequence[tuple[str, str]]) -> list[bool]:
        if not pairs:
            return []
        from laser.verify import boxed, verify_batch

        keep = [i for i, (a, b) in enumerate(pairs) if max(len(a), len(b)) <= MAX_VERIFY_CHARS]
        verdicts = verify_batch([boxed(pairs[i][1]) for i in keep], [pairs[i][0] for i in keep],
                                timeout_s=timeout_s, num_workers=num_workers)
        out = [False] * len(pairs)
        for i, verdict in zip(keep, verdicts):
            out[i] = verdict.status == "correct"
        return out

    return equivalent


def cluster_answers(problems: Sequence[Sequence[Any]], equivalent: EquivalenceFn) -> tuple[list[list[int]], int]:
    """Cluster ids per problem: ``problems[p][i]`` is sample i's extracted answer (str or None).

    Returns (ids, number of pairs sent to ``equivalent``): ``ids[p][i]`` is -1 for no answer, else a cluster id
    in 0..C-1 numbered by first appearance. All pairs of all problems go to ``equivalent`` in one batch.
    """
    keyed: list[list[int]] = []  # exact-match group per sample
    reps: list[list[str]] = []  # raw answer of each group's first member
    numbers: list[list[float | None]] = []
    for answers in problems:
        index: dict[str, int] = {}
        ids, rep, num = [], [], []
        for answer in answers:
            key = normalize_answer(answer)
            if key is None:
                ids.append(-1)
                continue
            if key not in index:
                index[key] = len(rep)
                rep.append(answer.strip())
                num.append(_as_number(key))
            ids.append(index[key])
        keyed.append(ids)
        reps.append(rep)
        numbers.append(num)

    parents = [list(range(len(rep))) for rep in reps]

    def find(p: int, g: int) -> int:
        while parents[p][g] != g:
            parents[p][g] = parents[p][parents[p][g]]
            g = parents[p][g]
        return g

    def union(p: int, g: int, h: int) -> None:
        g, h = find(p, g), find(p, h)
        if g != h:
            parents[p][max(g, h)] = min(g, h)

    queries: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
    for p, (rep, num) in enumerate(zip(reps, numbers)):
        for g in range(len(rep)):
            for h in range(g + 1, len(rep)):
                if num[g] is not None and num[h] is not None:
                    if math.isclose(num[g], num[h], rel_tol=1e-9, abs_tol=1e-12):
                        union(p, g, h)
                else:
                    queries.setdefault((rep[g], rep[h]), []).append((p, g, h))
    pairs = list(queries)
    verdicts = equivalent(pairs) if pairs else []
    if len(verdicts) != len(pairs):
        raise ValueError(f"equivalence function returned {len(verdicts)} verdicts for {len(pairs)} pairs")
    for pair, same in zip(pairs, verdicts):
        if same:
            for p, g, h in queries[pair]:
                union(p, g, h)

    out = []
    for p, ids in enumerate(keyed):
        renumber: dict[int, int] = {}
        row = []
        for g in ids:
            if g < 0:
                row.append(-1)
            else:
                root = find(p, g)
                row.append(renumber.setdefault(root, len(renumber)))
        out.append(row)
    return out, len(pairs)


# ----------------------------------------------------------------------------------------------- rollout tables


@dataclass
class _Data:
    """One (model, eval set) rollout table as (P, W) arrays, problems in first-appearance order, samples sorted by
    sample_idx; W = the most samples of a problem, ``valid`` False on padding."""

    problem_ids: list[str]
    answers: list[list[Any]]
    correct: np.ndarray
    score: np.ndarray
    num_tokens: np.ndarray
    valid: np.ndarray
    counts: dict[str, Any]
    cluster: np.ndarray | None = None

    @property
    def flat(self) -> dict[str, np.ndarray]:
        v = self.valid
        return {"correct": self.correct[v], "score": self.score[v], "num_tokens": self.num_tokens[v],
                "answered": (self.cluster[v] >= 0) if self.cluster is not None else None}


def _columns(table: Any, where: str) -> dict[str, list]:
    if hasattr(table, "column_names") and hasattr(table, "to_pydict"):  # pyarrow.Table
        names = list(table.column_names)

        def get(name):
            return table.column(name).to_pylist()
    elif hasattr(table, "columns") and hasattr(table, "__getitem__"):  # pandas.DataFrame
        names = [str(c) for c in table.columns]

        def get(name):
            return table[name].tolist()
    else:
        raise TypeError(f"{where}: expected a pyarrow.Table or pandas.DataFrame, got {type(table).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{where}: rollout table lacks column(s) {missing}; has {names}")
    wanted = [*REQUIRED_COLUMNS, *(c for c in ("finish_reason", "verify_status") if c in names)]
    return {name: get(name) for name in wanted}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _prepare(table: Any, where: str) -> _Data:
    cols = _columns(table, where)
    rows_of: dict[str, list[int]] = {}
    for row, pid in enumerate(cols["problem_id"]):
        rows_of.setdefault(str(pid), []).append(row)
    width = max((len(r) for r in rows_of.values()), default=0)
    num_problems = len(rows_of)
    correct = np.zeros((num_problems, width), dtype=bool)
    score = np.full((num_problems, width), np.nan)
    tokens = np.full((num_problems, width), np.nan)
    valid = np.zeros((num_problems, width), dtype=bool)
    answers: list[list[Any]] = []
    missing_reward = 0
    for p, (pid, rows) in enumerate(rows_of.items()):
        rows = sorted(rows, key=lambda r: cols["sample_idx"][r])
        seen = [cols["sample_idx"][r] for r in rows]
        if len(set(seen)) != len(seen):
            dup = sorted({s for s in seen if seen.count(s) > 1})
            raise ValueError(f"{where}: problem {pid!r} has duplicate sample_idx {dup}")
        answers.append([None if _is_missing(cols["pred_answer"][r]) else cols["pred_answer"][r] for r in rows])
        for i, r in enumerate(rows):
            reward = cols["reward"][r]
            missing_reward += _is_missing(reward)
            correct[p, i] = not _is_missing(reward) and float(reward) == 1.0
            score[p, i] = np.nan if _is_missing(cols["score"][r]) else float(cols["score"][r])
            tokens[p, i] = np.nan if _is_missing(cols["num_tokens"][r]) else float(cols["num_tokens"][r])
            valid[p, i] = True
    counts: dict[str, Any] = {
        "no_answer": int(sum(normalize_answer(a) is None for ans in answers for a in ans)),
        "no_score": int((np.isnan(score) & valid).sum()),
        "no_reward": int(missing_reward),
    }
    for name in ("finish_reason", "verify_status"):
        if name in cols:
            counts[name] = dict(sorted(Counter(str(v) for v in cols[name]).items()))
    return _Data(list(rows_of), answers, correct, score, tokens, valid, counts)


def _concat(parts: Sequence[_Data]) -> _Data:
    width = max((d.valid.shape[1] for d in parts), default=0)

    def pad(a: np.ndarray, fill: Any) -> np.ndarray:
        out = np.full((a.shape[0], width), fill, dtype=a.dtype)
        out[:, : a.shape[1]] = a
        return out

    def stack(name: str, fill: Any, dtype: Any) -> np.ndarray:
        arrays = [pad(getattr(d, name), fill) for d in parts]
        return np.concatenate(arrays) if arrays else np.zeros((0, width), dtype=dtype)

    counts: dict[str, Any] = {}
    for d in parts:
        for key, value in d.counts.items():
            if isinstance(value, dict):
                merged = Counter(counts.get(key, {}))
                merged.update(value)
                counts[key] = dict(sorted(merged.items()))
            else:
                counts[key] = counts.get(key, 0) + value
    return _Data([pid for d in parts for pid in d.problem_ids], [a for d in parts for a in d.answers],
                 stack("correct", False, bool), stack("score", np.nan, float), stack("num_tokens", np.nan, float),
                 stack("valid", False, bool), counts, stack("cluster", -1, np.int64))


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


def _block(d: _Data, params: EvaluateParams) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics of one sample set, extras for the plots)."""
    n = d.valid.sum(axis=1)
    flat = d.flat
    num_samples = int(d.valid.sum())
    k_max = int(n.min()) if len(n) else 0
    ks = M.scaling_ks(k_max)
    curves = M.scaling_curves(d.cluster, d.correct, d.score, ks, params.subset_seeds, seed=SCALING_SEED,
                              valid=d.valid)
    answered = flat["answered"]
    all_scores = np.where(answered, flat["score"], np.nan)  # no answer => score 0 (after clipping)
    sv_all = M.self_verification_report(all_scores, flat["correct"], params.threshold, params.ece_bins)
    sv_answered = M.self_verification_report(flat["score"][answered], flat["correct"][answered],
                                             params.threshold, params.ece_bins)
    scored = np.isfinite(flat["score"]) & np.isfinite(flat["num_tokens"])
    rho = M.spearman(flat["score"][scored], flat["num_tokens"][scored])
    spearman: dict[str, Any] = {"rho": rho, "n": int(scored.sum())}
    if rho is None:
        spearman["undefined"] = ("fewer than 2 samples with a score" if scored.sum() < 2
                                 else "score or length is constant")
    block: dict[str, Any] = {
        "num_problems": len(d.problem_ids),
        "num_samples": num_samples,
        "samples_per_problem": {"min": k_max, "max": int(n.max()) if len(n) else 0},
        "counts": d.counts,
        "avg@K": float(flat["correct"].mean()) if num_samples else None,
        "pass@k": curves["pass"],
        "maj@k": curves["maj"],
        "weighted_maj@k": curves["weighted_maj"],
        "best_of@k": curves["best_of"],
        "self_verification": {"all": sv_all, "answered": sv_answered},
        "spearman_score_length": spearman,
    }
    if not num_samples:
        block["undefined"] = {"avg@K": "no samples"}
    extras = {
        "reliability": M.calibration_bins(M.clip_scores(all_scores), flat["correct"], params.ece_bins),
        "scores": flat["score"],
        "correct": flat["correct"],
    }
    return block, extras


HEADLINE_KEYS = ("K", "avg@K", "pass@K", "maj@K", "weighted_maj@K", "best_of@K", "sv_acc_correct",
                 "sv_acc_incorrect", "sv_f1", "sv_auroc", "sv_ece", "spearman_score_length")


def headline(block: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one metrics block (K = the largest k of its scaling curves)."""
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


def evaluate(rollouts: dict[str, dict[str, Any]], params: EvaluateParams,
             equivalent: EquivalenceFn = math_verify_equivalent) -> EvalResult:
    """Evaluate rollouts: ``rollouts[model][eval_set]`` is a pyarrow.Table or pandas.DataFrame following the
    rollout parquet contract (DESIGN.md; columns used: problem_id, sample_idx, pred_answer, reward, score,
    num_tokens, and finish_reason / verify_status when present, for counts).

    ``metrics`` layout::

        settings: {threshold, ece_bins, subset_seeds, scaling_seed}
        models.<model>.eval_sets.<eval_set> and models.<model>.overall (all eval sets pooled), each:
          num_problems, num_samples, samples_per_problem {min, max}, counts {no_answer, no_score, no_reward,
          finish_reason {...}, verify_status {...}}, avg@K, pass@k / maj@k / weighted_maj@k / best_of@k
          {"1": acc, "2": acc, ...}, self_verification.{all, answered}: {n, n_correct, n_incorrect,
          n_predicted_correct, acc_correct, acc_incorrect, f1, precision, recall, f1_standard, auroc, ece,
          undefined {metric: reason}}, spearman_score_length {rho, n[, undefined]}
        models.<model>.headline.<eval_set | overall>: {K, avg@K, pass@K, maj@K, weighted_maj@K, best_of@K,
          sv_acc_correct, sv_acc_incorrect, sv_f1, sv_auroc, sv_ece, spearman_score_length}
        comparison (only with both base and trained): <eval_set | overall>.<headline key>: {base, trained, delta}
        equivalence: {pairs_checked}

    Conventions: k runs over 1, 2, 4, … up to the smallest sample count of a problem (plus that count when it is
    not a power of two); a problem's vote/best-of response is its earliest member (see laser.metrics); "all"
    self-verification reads a missing score or a missing answer as score 0, "answered" keeps only samples with
    an extractable answer (a missing score still reads 0). Spearman uses raw scores of samples that have one.
    """
    models = _model_order(list(rollouts))
    notes: list[str] = []
    data: dict[str, dict[str, _Data]] = {}
    for model in models:
        data[model] = {name: _prepare(table, f"{model}/{name}") for name, table in sorted(rollouts[model].items())}
        if not data[model]:
            notes.append(f"model {model!r} has no eval sets; skipped")
            del data[model]
    models = [m for m in models if m in data]

    everything = [d for model in models for d in data[model].values()]
    clusters, num_pairs = cluster_answers([a for d in everything for a in d.answers], equivalent)
    start = 0
    for d in everything:
        rows = clusters[start : start + len(d.answers)]
        start += len(d.answers)
        cluster = np.full(d.valid.shape, -1, dtype=np.int64)
        for p, row in enumerate(rows):
            cluster[p, : len(row)] = row
        d.cluster = cluster

    out_models: dict[str, Any] = {}
    extras: dict[str, dict[str, Any]] = {}
    for model in models:
        sets = {}
        for name, d in data[model].items():
            sets[name], _ = _block(d, params)
        overall, extras[model] = _block(_concat(list(data[model].values())), params)
        out_models[model] = {
            "eval_sets": sets,
            "overall": overall,
            "headline": {**{name: headline(b) for name, b in sets.items()}, "overall": headline(overall)},
        }
        for name, b in {**sets, "overall": overall}.items():
            c = b["counts"]
            bad = {k: v for k, v in c.get("verify_status", {}).items() if k in ("timeout", "error")}
            if bad:
                notes.append(f"{model}/{name}: verify_status {bad} (counted as incorrect)")
            if c["no_reward"]:
                notes.append(f"{model}/{name}: {c['no_reward']} samples without a reward (counted as incorrect)")
            if name != "overall" and b["samples_per_problem"]["min"] != b["samples_per_problem"]["max"]:
                notes.append(f"{model}/{name}: problems have {b['samples_per_problem']['min']}–"
                             f"{b['samples_per_problem']['max']} samples; scaling curves stop at the smallest")

    metrics: dict[str, Any] = {
        "settings": {"threshold": params.threshold, "ece_bins": params.ece_bins,
                     "subset_seeds": params.subset_seeds, "scaling_seed": SCALING_SEED},
        "models": out_models,
        "equivalence": {"pairs_checked": num_pairs},
    }
    if "base" in out_models and "trained" in out_models:
        metrics["comparison"] = _comparison(out_models["base"], out_models["trained"], notes)

    plots: dict[str, list[dict[str, Any]]] = {}
    eval_sets = sorted({name for model in models for name in data[model]})
    for name in eval_sets:
        plots[f"scaling_{name}"] = _scaling_rows(
            {m: out_models[m]["eval_sets"][name] for m in models if name in out_models[m]["eval_sets"]})
    plots["score_hist"] = _hist_rows(extras)
    plots["reliability"] = _reliability_rows(extras)
    return EvalResult(metrics=_clean(metrics), plots=_clean(plots), notes=notes)


def _comparison(base: dict[str, Any], trained: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    common = [name for name in base["eval_sets"] if name in trained["eval_sets"]]
    names = [*common]
    if set(base["eval_sets"]) == set(trained["eval_sets"]):
        names.append("overall")
    else:
        notes.append("base and trained have different eval sets: the comparison covers the common ones only "
                     f"({', '.join(common) or 'none'}), not 'overall'")
    out = {}
    for name in names:
        hb, ht = base["headline"][name], trained["headline"][name]
        out[name] = {key: {"base": hb[key], "trained": ht[key],
                           "delta": None if hb[key] is None or ht[key] is None else ht[key] - hb[key]}
                     for key in HEADLINE_KEYS}
    return out


# --------------------------------------------------------------------------------------------------- plot data


def _scaling_rows(blocks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    ks = sorted({int(k) for b in blocks.values() for k in b["pass@k"]})
    rows = []
    for k in ks:
        row: dict[str, Any] = {"k": k}
        for model, b in blocks.items():
            for curve in CURVES:
                row[f"{model}_{curve}"] = b[f"{curve}@k"].get(k)
        rows.append(row)
    return rows


def _hist_rows(extras: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    finite = [e["scores"][np.isfinite(e["scores"])] for e in extras.values()]
    values = np.concatenate(finite) if finite else np.zeros(0)
    lo = min(0.0, float(values.min())) if values.size else 0.0
    hi = max(1.0, float(values.max())) if values.size else 1.0
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    rows = [{"bin_lower": round(edges[i], 10), "bin_upper": round(edges[i + 1], 10),
             "bin_center": round((edges[i] + edges[i + 1]) / 2, 10)} for i in range(HIST_BINS)]
    for model, e in extras.items():
        has = np.isfinite(e["scores"])
        for label, mask in (("correct", e["correct"]), ("incorrect", ~e["correct"])):
            counts, _ = np.histogram(e["scores"][has & mask], bins=edges)
            for row, count in zip(rows, counts):
                row[f"{model}_{label}"] = int(count)
    return rows


def _reliability_rows(extras: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for model, e in extras.items():
        for i, b in enumerate(e["reliability"]):
            if i == len(rows):
                rows.append({"bin_lower": b["lower"], "bin_upper": b["upper"],
                             "bin_center": round((b["lower"] + b["upper"]) / 2, 10)})
            rows[i].update({f"{model}_confidence": b["confidence"], f"{model}_accuracy": b["accuracy"],
                            f"{model}_count": b["count"]})
    return rows


def _models_in(rows: list[dict[str, Any]], suffix: str) -> list[str]:
    return [key[: -len(suffix)] for key in (rows[0] if rows else {}) if key.endswith(suffix)]


# ------------------------------------------------------------------------------------------------------ output


def plots_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text of plot rows; None is an empty cell."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    return buf.getvalue()


def render_png(name: str, rows: list[dict[str, Any]], path: str | Path, threshold: float = 0.5) -> None:
    """Render plot ``name`` (``scaling_<set>``, ``score_hist`` or ``reliability``) from its rows to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def nums(key: str) -> list[float]:
        return [np.nan if r.get(key) is None else r[key] for r in rows]

    if name.startswith("scaling_"):
        models = _models_in(rows, "_pass")
        fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5 * max(1, len(models)), 4), squeeze=False,
                                 sharey=True)
        for ax, model in zip(axes[0], models):
            for curve in CURVES:
                ax.plot(nums("k"), nums(f"{model}_{curve}"), marker="o", label=CURVE_TITLES[curve])
            ax.set_xscale("log", base=2)
            ax.set_xticks(nums("k"), [str(r["k"]) for r in rows])
            ax.minorticks_off()
            ax.set_xlabel("k (samples per problem)")
            ax.set_title(f"{model}: {name[len('scaling_'):]}")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy")
        axes[0][0].legend(fontsize=8)
    elif name == "score_hist":
        models = _models_in(rows, "_correct")
        fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5 * max(1, len(models)), 4), squeeze=False)
        centers = nums("bin_center")
        width = (rows[0]["bin_upper"] - rows[0]["bin_lower"]) if rows else 0.04
        for ax, model in zip(axes[0], models):
            ax.bar(centers, nums(f"{model}_correct"), width=width, alpha=0.6, label="correct", color="tab:green")
            ax.bar(centers, nums(f"{model}_incorrect"), width=width, alpha=0.6, label="incorrect", color="tab:red")
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
            ax.set_xlabel("self-rewarding score (raw)")
            ax.set_ylabel("samples")
            ax.set_title(f"{model}: score by correctness")
            ax.legend(fontsize=8)
    elif name == "reliability":
        models = _models_in(rows, "_accuracy")
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect calibration")
        for model in models:
            ax.plot(nums(f"{model}_confidence"), nums(f"{model}_accuracy"), marker="o", label=model)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean clipped score (confidence)")
        ax.set_ylabel("accuracy")
        ax.set_title("reliability diagram (all samples)")
        ax.legend(fontsize=8)
    else:
        raise ValueError(f"unknown plot {name!r}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _fmt_delta(value: Any) -> str:
    return "—" if value is None else f"{value:+.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_report(result: EvalResult, plots_link: str) -> str:
    """The Markdown report; ``plots_link`` is the plots directory relative to the report's directory."""
    m = result.metrics
    s = m["settings"]
    link = plots_link.rstrip("/")
    lines = [
        "# LaSeR evaluation",
        "",
        f"Self-verification threshold {s['threshold']:g} on the clipped score; ECE with {s['ece_bins']} bins; "
        f"scaling curves averaged over {s['subset_seeds']} random subsets per k. '—' = undefined (the reason is "
        "under `undefined` in metrics.json).",
        "",
        "## Headline numbers",
        "",
    ]
    header = ["model", "eval set", *HEADLINE_KEYS]
    rows = []
    for model, mm in m["models"].items():
        for name, h in mm["headline"].items():
            rows.append([model, name, *(_fmt(h[k]) for k in HEADLINE_KEYS)])
    lines += _table(header, rows)
    if "comparison" in m:
        lines += ["", "## base vs trained", ""]
        rows = []
        for name, cmp in m["comparison"].items():
            for key, v in cmp.items():
                if key != "K":
                    rows.append([name, key, _fmt(v["base"]), _fmt(v["trained"]), _fmt_delta(v["delta"])])
        lines += _table(["eval set", "metric", "base", "trained", "Δ (trained − base)"], rows)

    lines += ["", "## Inference-time scaling", ""]
    for name, rows_ in result.plots.items():
        if not name.startswith("scaling_"):
            continue
        eval_set = name[len("scaling_"):]
        lines += [f"### {eval_set}", "", f"![scaling curves: {eval_set}]({link}/{name}.png)", ""]
        columns = [c for c in (rows_[0] if rows_ else {}) if c != "k"]
        lines += _table(["k", *columns], [[r["k"], *(_fmt(r[c]) for c in columns)] for r in rows_])
        lines.append("")

    lines += ["## Self-verification", ""]
    sv_keys = ("n", "n_correct", "n_incorrect", "acc_correct", "acc_incorrect", "f1", "precision", "recall",
               "f1_standard", "auroc", "ece")
    rows = []
    for model, mm in m["models"].items():
        for name, block in {**mm["eval_sets"], "overall": mm["overall"]}.items():
            for view, sv in block["self_verification"].items():
                rows.append([model, name, view, *(_fmt(sv[k]) for k in sv_keys)])
    lines += _table(["model", "eval set", "view", *sv_keys], rows)
    lines += ["", "`all`: every sample (no answer or no score ⇒ score 0); `answered`: samples with an extractable "
              "answer. `f1` is the paper's (harmonic mean of acc_correct and acc_incorrect); `f1_standard` is "
              "precision/recall F1 with positive = correct.", "",
              f"![score histograms]({link}/score_hist.png)", "", f"![reliability diagram]({link}/reliability.png)",
              "", "## Counts", ""]
    rows = []
    for model, mm in m["models"].items():
        for name, block in {**mm["eval_sets"], "overall": mm["overall"]}.items():
            c = block["counts"]
            rows.append([model, name, block["num_problems"], block["num_samples"], c["no_answer"], c["no_score"],
                         ", ".join(f"{k}: {v}" for k, v in c.get("finish_reason", {}).items()) or "—",
                         ", ".join(f"{k}: {v}" for k, v in c.get("verify_status", {}).items()) or "—"])
    lines += _table(["model", "eval set", "problems", "samples", "no answer", "no score", "finish_reason",
                     "verify_status"], rows)
    lines += ["", f"Answer pairs checked for equivalence: {m['equivalence']['pairs_checked']}."]
    if result.notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in result.notes)]
    return "\n".join(lines) + "\n"


def write_outputs(result: EvalResult, paths: PathsParams, threshold: float = 0.5) -> None:
    """Write the plots directory (CSV + PNG), the report and the metrics JSON, each atomically."""
    with atomic_path(paths.eval_plots, is_dir=True) as tmp:
        for name, rows in result.plots.items():
            (tmp / f"{name}.csv").write_text(plots_csv(rows))
            render_png(name, rows, tmp / f"{name}.png", threshold)
    link = Path(os.path.relpath(paths.eval_plots, Path(paths.eval_report).parent)).as_posix()
    atomic_write_text(paths.eval_report, render_report(result, link))
    atomic_write_json(paths.eval_metrics, result.metrics)


def read_rollouts(rollouts_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{model: {eval_set: pyarrow.Table}}`` from ``<rollouts_dir>/<model>/<eval_set>.parquet``."""
    import pyarrow.parquet as pq

    root = Path(rollouts_dir)
    out: dict[str, dict[str, Any]] = {}
    if root.is_dir():
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(f for f in model_dir.glob("*.parquet") if not f.name.startswith("."))
            if files:
                out[model_dir.name] = {f.stem: pq.read_table(f) for f in files}
            else:
                log.warning("%s has no .parquet files; model %r skipped", model_dir, model_dir.name)
    if not out:
        raise FileNotFoundError(f"no rollout files found: expected {root}/<model>/<eval_set>.parquet")
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params("params.yaml")
    rollouts = read_rollouts(params.paths.rollouts_dir)
    log.info("evaluating %s", {m: sorted(s) for m, s in rollouts.items()})
    equivalent = verifier_equivalent(params.verifier.timeout_s, params.verifier.num_workers)
    result = evaluate(rollouts, params.evaluate, equivalent=equivalent)
    write_outputs(result, params.paths, params.evaluate.threshold)
    for model, mm in result.metrics["models"].items():
        log.info("%s overall: %s", model, mm["headline"]["overall"])
    for note in result.notes:
        log.warning("%s", note)
    log.info("wrote %s, %s/, %s", params.paths.eval_metrics, params.paths.eval_plots, params.paths.eval_report)


if __name__ == "__main__":
    main()
