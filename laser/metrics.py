"""Evaluation metrics: accuracy, pass@k, (self-reward-weighted) voting, best-of-k, self-verification, calibration.

Pure functions: numpy arrays, torch tensors or lists in; floats, arrays and dicts out. No config, logging or I/O.
The core imports only numpy (torch tensors are converted by duck typing, see :func:`to_numpy`).

Conventions (shared by every function here):
- A *score* is the raw last-token self-rewarding score r_s (unclipped; NaN/None when missing, e.g. truncated).
  The test-time score is ``clip(score, 0, 1)`` with a missing score read as 0 (:func:`clip_scores`); it is the
  vote weight, the "confidence" of calibration and the input of every self-verification metric.
- *correct* is the verifier reward as bool (or 0/1).
- A metric that is undefined on its input (a class is empty, no samples, a constant input) is ``None``, never NaN;
  the ``undefined`` entry of :func:`self_verification_report` says why.
- Voting works on answer *cluster ids*: ints >= 0 name equivalent answers within one problem (row); -1 means "no
  extractable answer": such a sample casts no vote and never wins. A row where no sample has an answer has no
  winner (column -1), which counts as incorrect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

WEIGHT_DECIMALS = 9  # vote totals are compared after rounding, so float summation order cannot flip a tie


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """``x`` (numpy array, torch tensor on any device/dtype, list possibly holding None) as a numpy array.

    None entries become NaN when ``dtype`` is float.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor; torch itself is not imported here
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()  # bfloat16/float16 have no (or a lossy) numpy equivalent
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def clip_scores(scores: Any) -> np.ndarray:
    """The test-time score: ``clip(score, 0, 1)`` with missing (None/NaN) read as 0. Same shape as ``scores``."""
    s = to_numpy(scores, float)
    return np.clip(np.where(np.isnan(s), 0.0, s), 0.0, 1.0)


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    """2ab/(a+b); 0.0 when a + b = 0; None when either is None."""
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


# -------------------------------------------------------------------------------------------------------- accuracy


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one problem (Chen et al. 2021): 1 − C(n−c, k) / C(n, k), in the stable product form.

    Raises ValueError when k is not in [1, n] or c is not in [0, n] (a caller bug, not a data edge case).
    """
    n, c = int(num_samples), int(num_correct)
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=float)))


def mean_pass_at_k(num_samples: Any, num_correct: Any, k: int) -> float | None:
    """Mean of :func:`pass_at_k` over problems. num_samples, num_correct: (P,) ints. None when P = 0."""
    n = to_numpy(num_samples, np.int64).ravel()
    c = to_numpy(num_correct, np.int64).ravel()
    if n.size == 0:
        return None
    return float(np.mean([pass_at_k(ni, ci, k) for ni, ci in zip(n, c)]))


def scaling_ks(max_k: int) -> list[int]:
    """k = 1, 2, 4, … <= max_k, plus max_k itself when it is not a power of two (the "all samples" point)."""
    ks = []
    k = 1
    while k <= max_k:
        ks.append(k)
        k *= 2
    if max_k >= 1 and ks[-1] != max_k:
        ks.append(max_k)
    return ks


# ---------------------------------------------------------------------------------------------------------- voting


def _default_order(shape: tuple[int, int], sample_order: Any) -> np.ndarray:
    if sample_order is None:
        return np.broadcast_to(np.arange(shape[1]), shape)
    order = to_numpy(sample_order, np.int64)
    if order.shape != shape:
        raise ValueError(f"sample_order has shape {order.shape}, expected {shape}")
    return order


def vote(cluster_ids: Any, weights: Any = None, sample_order: Any = None) -> np.ndarray:
    """Weighted vote over answer clusters, row by row (vectorised).

    cluster_ids: (P, k) int, >= 0 per distinct answer within a row, -1 = no answer (casts no vote, never wins).
    weights: (P, k) float >= 0 vote weights (None: 1 each = plain majority vote). Self-reward-weighted voting
        passes :func:`clip_scores` of the scores.
    sample_order: (P, k) int, the original sample index of each column, unique per row (None: the column index).
    The winner has the highest total weight (rounded to ``WEIGHT_DECIMALS``); ties go to more votes, then to the
    cluster whose earliest member has the smallest sample_order.
    Returns (P,) int: the column of the winning cluster's earliest member (the response the vote returns),
    -1 for a row without any answered sample.
    """
    cid = to_numpy(cluster_ids, np.int64)
    if cid.ndim != 2:
        raise ValueError(f"cluster_ids must be (P, k), got shape {cid.shape}")
    num_rows = cid.shape[0]
    out = np.full(num_rows, -1, dtype=np.int64)
    answered = cid >= 0
    if not answered.any():
        return out
    w = np.ones(cid.shape) if weights is None else to_numpy(weights, float)
    if w.shape != cid.shape:
        raise ValueError(f"weights has shape {w.shape}, expected {cid.shape}")
    order = _default_order(cid.shape, sample_order)

    rows = np.broadcast_to(np.arange(num_rows)[:, None], cid.shape)
    pairs = np.stack([rows[answered], cid[answered]], axis=1)
    groups, group_of = np.unique(pairs, axis=0, return_inverse=True)  # one group per (row, cluster)
    group_of = group_of.ravel()
    num_groups = len(groups)
    total = np.round(np.bincount(group_of, weights=w[answered], minlength=num_groups), WEIGHT_DECIMALS)
    count = np.bincount(group_of, minlength=num_groups)
    earliest = np.full(num_groups, np.iinfo(np.int64).max)
    np.minimum.at(earliest, group_of, order[answered])

    group_row = groups[:, 0]
    ranked = np.lexsort((earliest, -count, -total, group_row))  # last key is primary
    first = np.ones(num_groups, dtype=bool)
    first[1:] = group_row[ranked][1:] != group_row[ranked][:-1]
    best = ranked[first]  # the winning group of each row that has one
    win_rows = group_row[best]

    group_matrix = np.full(cid.shape, -1, dtype=np.int64)
    group_matrix[answered] = group_of
    member = (group_matrix[win_rows] == best[:, None]) & (order[win_rows] == earliest[best][:, None])
    out[win_rows] = np.argmax(member, axis=1)
    return out


def best_of(scores: Any, sample_order: Any = None, answered: Any = None) -> np.ndarray:
    """Best-of-k by score, row by row: the column with the highest raw score (ranking needs no clipping).

    scores: (P, k) float, NaN = missing (ranked below every score). answered: (P, k) bool, the samples with an
    extractable answer (None: all); an unanswered sample ranks below every answered one, whatever its score (it
    cannot be right). Ties (including all missing) go to the smallest sample_order ((P, k) int, None = column
    index). Returns (P,) int columns; -1 only when k = 0.
    """
    s = to_numpy(scores, float)
    if s.ndim != 2:
        raise ValueError(f"scores must be (P, k), got shape {s.shape}")
    if s.shape[1] == 0:
        return np.full(s.shape[0], -1, dtype=np.int64)
    order = _default_order(s.shape, sample_order)
    s = np.where(np.isnan(s), -np.inf, s)
    top = s == s.max(axis=1, keepdims=True)
    if answered is not None:
        ok = to_numpy(answered).astype(bool)
        if ok.shape != s.shape:
            raise ValueError(f"answered has shape {ok.shape}, expected {s.shape}")
        best_answered = np.where(ok, s, -np.inf).max(axis=1, keepdims=True)
        top = np.where(ok.any(axis=1, keepdims=True), ok & (s == best_answered), top)
    return np.argmin(np.where(top, order, np.iinfo(np.int64).max), axis=1)


def picked_correct(correct: Any, columns: Any) -> np.ndarray:
    """correct: (P, k) bool; columns: (P,) int from :func:`vote`/:func:`best_of` (-1 = no pick = incorrect)."""
    c = to_numpy(correct).astype(bool)
    cols = to_numpy(columns, np.int64)
    if c.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    got = c[np.arange(c.shape[0]), np.maximum(cols, 0)] if c.shape[1] else np.zeros(c.shape[0], dtype=bool)
    return np.where(cols >= 0, got, False)


def scaling_curves(cluster_ids: Any, correct: Any, scores: Any, ks: Sequence[int], num_seeds: int, *,
                   seed: int = 0, valid: Any = None) -> dict[str, dict[int, float | None]]:
    """Inference-time-scaling curves: accuracy of pass@k, maj@k, self-reward-weighted maj@k and best-of-k.

    cluster_ids: (P, K) int (-1 = no answer); correct: (P, K) bool; scores: (P, K) raw scores (NaN = missing);
    valid: (P, K) bool, False on padding when problems have fewer than K samples (None: all valid).
    For every k in ``ks`` (each <= the smallest number of valid samples of a problem) and each of ``num_seeds``
    seeds, every problem draws a random k-subset of its samples (the subsets of one seed are nested across k);
    the accuracies are averaged over problems and seeds. pass@k is the exact unbiased estimator (no subsets).
    Returns {"pass": {k: acc}, "maj": …, "weighted_maj": …, "best_of": …}; values are None when P = 0.
    """
    cid = to_numpy(cluster_ids, np.int64)
    corr = to_numpy(correct).astype(bool)
    s = to_numpy(scores, float)
    if cid.ndim != 2:
        raise ValueError(f"cluster_ids must be (P, K), got shape {cid.shape}")
    num_rows = cid.shape[0]
    ok = np.ones(cid.shape, dtype=bool) if valid is None else to_numpy(valid).astype(bool)
    for name, arr in (("correct", corr), ("scores", s), ("valid", ok)):
        if arr.shape != cid.shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {cid.shape}")
    names = ("pass", "maj", "weighted_maj", "best_of")
    if num_rows == 0:
        return {name: {int(k): None for k in ks} for name in names}
    n = ok.sum(axis=1)
    if ks and max(ks) > n.min():
        raise ValueError(f"k = {max(ks)} exceeds the smallest number of samples of a problem ({n.min()})")
    num_correct = (corr & ok).sum(axis=1)
    weights = clip_scores(s)
    rows = np.arange(num_rows)[:, None]
    sums = {name: dict.fromkeys((int(k) for k in ks), 0.0) for name in names[1:]}
    for j in range(num_seeds):
        keys = np.random.default_rng([seed, j]).random(cid.shape)
        keys[~ok] = 2.0  # padding sorts last, so the first k columns are k distinct valid samples
        perm = np.argsort(keys, axis=1, kind="stable")
        for k in ks:
            cols = perm[:, :k]
            sub_cid, sub_corr, sub_w, sub_s = cid[rows, cols], corr[rows, cols], weights[rows, cols], s[rows, cols]
            sums["maj"][k] += picked_correct(sub_corr, vote(sub_cid, None, cols)).mean()
            sums["weighted_maj"][k] += picked_correct(sub_corr, vote(sub_cid, sub_w, cols)).mean()
            sums["best_of"][k] += picked_correct(sub_corr, best_of(sub_s, cols, sub_cid >= 0)).mean()
    out = {"pass": {int(k): mean_pass_at_k(n, num_correct, k) for k in ks}}
    for name in names[1:]:
        out[name] = {k: float(v / num_seeds) for k, v in sums[name].items()}
    return out


# ------------------------------------------------------------------------------------------- self-verification


def self_verification(scores: Any, correct: Any, threshold: float = 0.5) -> dict[str, float | None]:
    """The paper's self-verification metrics (torch tensors or numpy arrays or lists, any shape, flattened).

    A sample is "self-verified correct" when clip(score, 0, 1) > threshold (missing score = 0).
    acc_correct: fraction of correct samples verified correct (None: no correct sample);
    acc_incorrect: fraction of incorrect samples verified incorrect (None: no incorrect sample);
    f1: their harmonic mean (None when either is None, 0.0 when both are 0).
    """
    s = clip_scores(scores).ravel()
    c = to_numpy(correct).astype(bool).ravel()
    if s.shape != c.shape:
        raise ValueError(f"scores has {s.size} entries, correct has {c.size}")
    pred = s > threshold
    acc_c = float(pred[c].mean()) if c.any() else None
    acc_i = float((~pred[~c]).mean()) if (~c).any() else None
    return {"acc_correct": acc_c, "acc_incorrect": acc_i, "f1": harmonic_mean(acc_c, acc_i)}


def classification_metrics(scores: Any, correct: Any, threshold: float = 0.5) -> dict[str, float | None]:
    """Standard precision / recall / F1 with positive = correct, predicted positive = clip(score) > threshold.

    precision = TP/(TP+FP) (None: nothing predicted correct); recall = TP/(TP+FN) (None: no correct sample);
    f1 = 2TP/(2TP+FP+FN) (= harmonic mean of precision and recall; 0.0 when TP = 0 but FP+FN > 0; None when
    TP = FP = FN = 0).
    """
    pred = clip_scores(scores).ravel() > threshold
    c = to_numpy(correct).astype(bool).ravel()
    tp, fp, fn = int((pred & c).sum()), int((pred & ~c).sum()), int((~pred & c).sum())
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
    }


def rankdata(values: Any) -> np.ndarray:
    """1-based ranks of a 1-D array, ties given their average rank (as scipy.stats.rankdata 'average').
    NaN has no rank: it raises (np.unique would sort it last, silently ranking a missing value highest)."""
    x = to_numpy(values, float).ravel()
    if np.isnan(x).any():
        raise ValueError(f"rankdata: {int(np.isnan(x).sum())} NaN value(s); fill or drop missing scores first")
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(float)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.ravel()]


def auroc(scores: Any, labels: Any) -> float | None:
    """Area under the ROC curve of ``scores`` (N,) for bool ``labels`` (N,), rank-based (Mann-Whitney U).

    Tied scores count one half. None when either class is empty.
    """
    y = to_numpy(labels).astype(bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def calibration_bins(confidences: Any, correct: Any, num_bins: int = 10) -> list[dict[str, float | int | None]]:
    """Reliability-diagram bins: ``num_bins`` equal-width bins on [0, 1], [lo, hi) and the last one closed.

    confidences: (N,) in [0, 1] (clip first); correct: (N,) bool. Each bin: lower, upper, count, confidence
    (mean confidence), accuracy (fraction correct); confidence and accuracy are None in an empty bin.
    """
    conf = to_numpy(confidences, float).ravel()
    c = to_numpy(correct).astype(bool).ravel()
    index = np.clip(np.floor(conf * num_bins).astype(np.int64), 0, num_bins - 1)
    bins = []
    for b in range(num_bins):
        inside = index == b
        n = int(inside.sum())
        bins.append({
            "lower": b / num_bins,
            "upper": (b + 1) / num_bins,
            "count": n,
            "confidence": float(conf[inside].mean()) if n else None,
            "accuracy": float(c[inside].mean()) if n else None,
        })
    return bins


def expected_calibration_error(confidences: Any, correct: Any, num_bins: int = 10) -> float | None:
    """ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b| over :func:`calibration_bins`. None when N = 0."""
    bins = calibration_bins(confidences, correct, num_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return None
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def spearman(x: Any, y: Any) -> float | None:
    """Spearman rank correlation of (N,) x and (N,) y (Pearson of average ranks). None when N < 2 or either
    input is constant."""
    a, b = to_numpy(x, float).ravel(), to_numpy(y, float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"x has {a.size} entries, y has {b.size}")
    if a.size < 2:
        return None
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    if denom == 0:
        return None
    return float(np.clip((ra * rb).sum() / denom, -1.0, 1.0))


def self_verification_report(scores: Any, correct: Any, threshold: float = 0.5,
                             num_bins: int = 10) -> dict[str, Any]:
    """Every self-verification metric of one sample set, as the official LaSeR evaluation prints them.

    scores: (N,) raw scores (missing = NaN/None, read as 0); correct: (N,) bool.
    Returns n, n_correct, n_incorrect, n_predicted_correct, acc_correct, acc_incorrect, f1 (the paper's:
    harmonic mean of the two class accuracies), precision, recall, f1_standard and ece on clip(score, 0, 1);
    auroc on the raw scores (clipping would tie every score above 1 or below 0 across the classes), a missing
    score ranking lowest; and ``undefined``: {metric: reason} for each metric that is None.
    """
    raw = to_numpy(scores, float).ravel()
    conf = clip_scores(raw)
    c = to_numpy(correct).astype(bool).ravel()
    sv = self_verification(conf, c, threshold)
    cls = classification_metrics(conf, c, threshold)
    report: dict[str, Any] = {
        "n": int(c.size),
        "n_correct": int(c.sum()),
        "n_incorrect": int((~c).sum()),
        "n_predicted_correct": int((conf > threshold).sum()),
        "acc_correct": sv["acc_correct"],
        "acc_incorrect": sv["acc_incorrect"],
        "f1": sv["f1"],
        "precision": cls["precision"],
        "recall": cls["recall"],
        "f1_standard": cls["f1"],
        "auroc": auroc(np.where(np.isnan(raw), -np.inf, raw), c),
        "ece": expected_calibration_error(conf, c, num_bins),
    }
    reasons = {
        "acc_correct": "no correct samples",
        "acc_incorrect": "no incorrect samples",
        "f1": "needs both correct and incorrect samples",
        "precision": "no sample self-verified correct (clipped score > threshold)",
        "recall": "no correct samples",
        "f1_standard": "no correct samples and none self-verified correct",
        "auroc": "needs both correct and incorrect samples",
        "ece": "no samples",
    }
    report["undefined"] = {key: why for key, why in reasons.items() if report[key] is None}
    return report


def bootstrap_ci(statistic, num_groups: int, num_resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of ``statistic(indices)`` over groups (problems) drawn with replacement:
    the samples of a problem are not independent, so problems, not samples, are resampled. ``statistic``
    takes an int array of group indices (with repeats) and returns a float or None (undefined on that draw:
    left out). Returns [low, high], or None when no draw is defined or there are no groups."""
    if num_groups == 0:
        return None
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, num_groups, num_groups)) for _ in range(num_resamples)]
    values = [v for v in values if v is not None]
    if not values:
        return None
    low, high = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(low), float(high)]


def self_verification_collapse(scores: Any, correct: Any, threshold: float = 0.5,
                               auroc_floor: float = 0.55) -> str | None:
    """Why self-verification says nothing, or None: every clipped score on one side of ``threshold`` (it calls
    everything correct, or everything incorrect), or AUROC <= ``auroc_floor`` (its ranking is near chance or
    inverted). Raw scores (N,) (missing: NaN, read as 0 as in :func:`self_verification_report`); correct (N,)."""
    raw = to_numpy(scores, float).ravel()
    if raw.size == 0:
        return None
    above = clip_scores(raw) > threshold
    if above.all() or not above.any():
        side = "above" if above.all() else "at or below"
        return f"every score is {side} the threshold {threshold:g}: it calls every sample " + \
            ("correct" if above.all() else "incorrect")
    value = auroc(np.where(np.isnan(raw), -np.inf, raw), correct)
    if value is not None and value <= auroc_floor:
        return f"AUROC {value:.3f} <= {auroc_floor:g}: the score does not rank correct above incorrect answers"
    return None
