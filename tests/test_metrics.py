"""laser.metrics: hand-computed values, loop references vs the vectorised code, and edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from laser import metrics as M

NAN = float("nan")

# -------------------------------------------------------------------------------------------------------- pass@k


def test_pass_at_k_hand_values():
    assert M.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert M.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert M.pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert M.pass_at_k(4, 3, 2) == 1.0  # n - c < k
    assert M.pass_at_k(4, 0, 4) == 0.0
    assert M.pass_at_k(1, 1, 1) == 1.0
    assert M.mean_pass_at_k([4, 4], [1, 2], 2) == pytest.approx((0.5 + 5 / 6) / 2)
    assert M.mean_pass_at_k([], [], 1) is None
    with pytest.raises(ValueError):
        M.pass_at_k(4, 1, 5)


def test_pass_at_k_matches_comb_reference():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                ref = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert M.pass_at_k(n, c, k) == pytest.approx(ref, abs=1e-12)


def test_scaling_ks():
    assert M.scaling_ks(8) == [1, 2, 4, 8]
    assert M.scaling_ks(6) == [1, 2, 4, 6]
    assert M.scaling_ks(1) == [1]
    assert M.scaling_ks(0) == []


# -------------------------------------------------------------------------------------------------------- voting


def vote_reference(cids, weights, order):
    """Slow reference of M.vote for one row."""
    totals, counts, first = {}, {}, {}
    for col, (c, w, o) in enumerate(zip(cids, weights, order)):
        if c < 0:
            continue
        totals[c] = totals.get(c, 0.0) + w
        counts[c] = counts.get(c, 0) + 1
        if c not in first or o < order[first[c]]:
            first[c] = col
    if not totals:
        return -1
    best = max(totals, key=lambda c: (round(totals[c], M.WEIGHT_DECIMALS), counts[c], -order[first[c]]))
    return first[best]


def test_majority_vote_hand_values():
    cids = [[0, 1, 1, 2],  # cluster 1 has two votes: its first member is column 1
            [0, 1, 0, 1],  # 2-2 tie: the earliest cluster wins
            [-1, -1, -1, 0],  # no-answer samples never win, however many
            [-1, -1, -1, -1]]  # no answer at all: no winner
    assert M.vote(cids).tolist() == [1, 0, 3, -1]
    # the tie goes to the cluster whose earliest member has the smallest original sample index
    assert M.vote([[0, 1, 0, 1]], sample_order=[[7, 2, 5, 9]]).tolist() == [1]


def test_weighted_vote_picks_a_different_answer_than_plain_vote():
    cids = [[0, 0, 0, 1, 1]]
    scores = [[0.1, 0.2, 0.1, 0.9, 0.8]]
    correct = [[False, False, False, True, True]]
    plain = M.vote(cids)
    weighted = M.vote(cids, M.clip_scores(scores))
    assert plain.tolist() == [0]  # three votes for the wrong answer
    assert weighted.tolist() == [3]  # 0.4 vs 1.7: the self-verified answer wins
    assert M.picked_correct(correct, plain).tolist() == [False]
    assert M.picked_correct(correct, weighted).tolist() == [True]


def test_weighted_vote_clips_and_breaks_ties():
    # raw scores would make cluster 0 win (5.0 > 1.4); clipped weights give 1.0 vs 1.4
    assert M.vote([[0, 1, 1]], M.clip_scores([[5.0, 0.7, 0.7]])).tolist() == [1]
    # missing scores weigh 0: all weights 0 => plain-majority tie-breaks (count, then earliest)
    assert M.vote([[0, 1, 1]], M.clip_scores([[None, None, None]])).tolist() == [1]
    # 0.1 + 0.2 != 0.3 in floats; after rounding it is a weight tie, so the count decides (cluster 0 has 2)
    assert M.vote([[1, 0, 0]], [[0.3, 0.1, 0.2]]).tolist() == [1]


def test_vote_vectorised_matches_loop_reference():
    rng = np.random.default_rng(0)
    rows, k = 300, 7
    cids = rng.integers(-1, 4, size=(rows, k))
    weights = rng.integers(0, 5, size=(rows, k)) / 4.0  # quarters: many exact ties
    order = np.argsort(rng.random((rows, k)), axis=1)
    for w in (None, weights):
        got = M.vote(cids, w, order)
        ww = np.ones((rows, k)) if w is None else w
        ref = [vote_reference(cids[r], ww[r], order[r]) for r in range(rows)]
        assert got.tolist() == ref


def test_best_of_hand_values_and_reference():
    scores = [[NAN, 0.3, 0.9, 0.9], [NAN, NAN, NAN, NAN], [-2.0, 3.0, 0.5, NAN]]
    assert M.best_of(scores).tolist() == [2, 0, 1]  # tie -> earliest; all missing -> first; raw scores rank
    assert M.best_of(scores, sample_order=[[0, 3, 2, 1], [3, 2, 1, 0], [0, 1, 2, 3]]).tolist() == [3, 3, 1]
    rng = np.random.default_rng(1)
    s = rng.integers(0, 4, size=(200, 5)).astype(float)
    s[rng.random(s.shape) < 0.2] = NAN
    order = np.argsort(rng.random(s.shape), axis=1)
    ref = []
    for r in range(len(s)):
        key = [(-np.inf if np.isnan(v) else v, -o) for v, o in zip(s[r], order[r])]
        ref.append(max(range(5), key=lambda j, key=key: key[j]))
    assert M.best_of(s, order).tolist() == ref


def test_best_of_ranks_unanswered_samples_last():
    """A sample with no extractable answer cannot be right: before, its high score won best-of."""
    scores = [[0.2, 5.0, NAN], [NAN, 0.9, 0.1], [0.3, 0.8, NAN]]
    answered = [[True, False, True], [True, False, False], [False, False, False]]
    assert M.best_of(scores, answered=answered).tolist() == [0, 0, 1]  # no answered one: plain best-of
    assert M.best_of(scores).tolist() == [1, 1, 1]


# -------------------------------------------------------------------------------------------------- scaling curves

# two problems, K = 4 (hand-worked in the comments)
CIDS = [[0, 0, 1, 1], [0, 1, 1, -1]]
CORRECT = [[False, False, True, True], [True, False, False, False]]
SCORES = [[0.1, 0.2, 0.9, 0.8], [0.6, 0.1, 0.2, 0.95]]


def test_scaling_curves_hand_values_at_full_k():
    out = M.scaling_curves(CIDS, CORRECT, SCORES, [1, 2, 4], num_seeds=3)
    # pass@1 = (2/4 + 1/4)/2; pass@2 = (5/6 + 1/2)/2; pass@4 = 1
    assert out["pass"] == pytest.approx({1: 0.375, 2: 2 / 3, 4: 1.0})
    # k = 4 (all samples, any seed): P0 maj 2-2 tie -> earliest (wrong), weighted 0.3 vs 1.7 (right),
    # best-of 0.9 (right); P1 maj cluster 1 (wrong), weighted 0.6 vs 0.3 (right), best-of: 0.95 has no answer,
    # so it ranks last and the best answered sample (0.6) is picked (right)
    assert out["maj"][4] == 0.0
    assert out["weighted_maj"][4] == 1.0
    assert out["best_of"][4] == 1.0
    # k = 1: one sample, all three pick it
    assert out["maj"][1] == out["weighted_maj"][1] == out["best_of"][1]


def test_scaling_curves_k1_averages_to_mean_accuracy():
    out = M.scaling_curves(CIDS, CORRECT, SCORES, [1], num_seeds=400)
    assert out["maj"][1] == pytest.approx(0.375, abs=0.05)


def scaling_reference(cids, correct, scores, ks, num_seeds, seed=0):
    """Slow reference: same subset draws, one problem at a time, dict-based voting."""
    cids, correct, scores = np.asarray(cids), np.asarray(correct), np.asarray(scores, float)
    rows, width = cids.shape
    out = {name: dict.fromkeys(ks, 0.0) for name in ("maj", "weighted_maj", "best_of")}
    for j in range(num_seeds):
        perm = np.argsort(np.random.default_rng([seed, j]).random((rows, width)), axis=1, kind="stable")
        for k in ks:
            for r in range(rows):
                cols = list(perm[r, :k])
                sc = [scores[r, c] for c in cols]
                w = [0.0 if np.isnan(v) else min(max(v, 0.0), 1.0) for v in sc]
                cid = [cids[r, c] for c in cols]
                for name, weights in (("maj", [1.0] * k), ("weighted_maj", w)):
                    pick = vote_reference(cid, weights, cols)
                    out[name][k] += (pick >= 0 and bool(correct[r, cols[pick]])) / rows / num_seeds
                # answered samples first (an unanswered one cannot be right), then the score, then sample order
                key = [(i >= 0, -np.inf if np.isnan(v) else v, -c) for v, c, i in zip(sc, cols, cid)]
                pick = max(range(k), key=lambda i, key=key: key[i])
                out["best_of"][k] += bool(correct[r, cols[pick]]) / rows / num_seeds
    return out


def test_scaling_curves_vectorised_matches_loop_reference():
    rng = np.random.default_rng(2)
    rows, width = 40, 8
    cids = rng.integers(-1, 3, size=(rows, width))
    correct = rng.random((rows, width)) < 0.4
    scores = rng.normal(0.5, 0.5, size=(rows, width))
    scores[rng.random(scores.shape) < 0.1] = NAN
    ks = [1, 2, 4, 8]
    got = M.scaling_curves(cids, correct, scores, ks, num_seeds=3, seed=5)
    ref = scaling_reference(cids, correct, scores, ks, num_seeds=3, seed=5)
    for name in ref:
        assert got[name] == pytest.approx(ref[name], abs=1e-12)


def test_scaling_curves_ragged_and_empty():
    # problem 1 has 2 samples (both wrong); its padding is "poisoned" (correct, top score): it must never be drawn
    cids = [[0, 0, 0, 0], [0, 1, 5, 5]]
    valid = [[True] * 4, [True, True, False, False]]
    correct = [[True] * 4, [False, False, True, True]]
    scores = [[0.9, 0.9, 0.1, 0.1], [0.1, 0.9, 1.0, 1.0]]
    out = M.scaling_curves(cids, correct, scores, [1, 2], num_seeds=4, valid=valid)
    for name in ("pass", "maj", "weighted_maj", "best_of"):
        assert out[name] == {1: 0.5, 2: 0.5}, name
    with pytest.raises(ValueError):
        M.scaling_curves(cids, correct, scores, [4], num_seeds=1, valid=valid)
    empty = M.scaling_curves(np.zeros((0, 3), int), np.zeros((0, 3), bool), np.zeros((0, 3)), [1], num_seeds=2)
    assert empty == {"pass": {1: None}, "maj": {1: None}, "weighted_maj": {1: None}, "best_of": {1: None}}


# ---------------------------------------------------------------------------------------------- self-verification

SV_SCORES = [0.9, 0.4, None, 0.7, 0.2, 1.5, -3.0]  # clipped: .9 .4 0 .7 .2 1 0
SV_CORRECT = [1, 1, 1, 0, 0, 0, 0]


def test_self_verification_hand_values():
    sv = M.self_verification(SV_SCORES, SV_CORRECT)
    assert sv["acc_correct"] == pytest.approx(1 / 3)  # only 0.9 of the correct is above 0.5
    assert sv["acc_incorrect"] == pytest.approx(0.5)  # 0.2 and -3 are at or below; 0.7 and 1.5 are above
    assert sv["f1"] == pytest.approx(0.4)  # 2 * (1/3) * (1/2) / (1/3 + 1/2)
    cls = M.classification_metrics(SV_SCORES, SV_CORRECT)
    assert cls == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})  # TP 1, FP 2, FN 2
    assert M.self_verification([0.5, 0.50001], [1, 1])["acc_correct"] == 0.5  # strictly above the threshold
    assert M.self_verification([0.3], [1], threshold=0.2)["acc_correct"] == 1.0


def test_self_verification_accepts_torch_and_numpy():
    ref = M.self_verification(SV_SCORES, SV_CORRECT)
    scores = torch.tensor([0.9, 0.4, float("nan"), 0.7, 0.2, 1.5, -3.0])
    assert M.self_verification(scores, torch.tensor(SV_CORRECT, dtype=torch.bool)) == pytest.approx(ref)
    assert M.self_verification(scores.to(torch.bfloat16), torch.tensor(SV_CORRECT).float()) == pytest.approx(ref)
    assert M.self_verification(np.array(scores), np.array(SV_CORRECT)) == pytest.approx(ref)
    assert set(ref) == {"acc_correct", "acc_incorrect", "f1"}


def test_paper_f1_is_the_harmonic_mean_of_class_accuracies():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.random(50)
        correct = rng.random(50) < 0.5
        sv = M.self_verification(scores, correct)
        a, b = sv["acc_correct"], sv["acc_incorrect"]
        assert sv["f1"] == pytest.approx(2 * a * b / (a + b))
    assert M.harmonic_mean(0.0, 0.0) == 0.0
    assert M.harmonic_mean(None, 1.0) is None


def auroc_reference(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_hand_value_ties_and_reference():
    clipped = M.clip_scores(SV_SCORES)
    # pos .9 beats .7 .2 0 (3); pos .4 beats .2 0 (2); pos 0 ties neg 0 (0.5): 5.5 / 12
    assert M.auroc(clipped, SV_CORRECT) == pytest.approx(5.5 / 12)
    assert M.auroc([0.5, 0.5], [1, 0]) == 0.5
    assert M.auroc([1.0, 0.0], [1, 0]) == 1.0
    rng = np.random.default_rng(4)
    for _ in range(10):
        s = rng.integers(0, 5, 30) / 4.0
        y = rng.random(30) < 0.5
        assert M.auroc(s, y) == pytest.approx(auroc_reference(s, y))
    assert M.auroc([0.1, 0.2], [1, 1]) is None


def test_self_verification_auroc_uses_raw_scores_and_ranks_missing_lowest():
    """Clipping ties every score above 1 (or below 0) across classes: toy raw AUROC 8/9, clipped 7/9."""
    scores = [1.5, 1.2, 0.3, 1.1, -0.2, -0.5]
    correct = [True, True, True, False, False, False]
    assert M.auroc(M.clip_scores(scores), correct) == pytest.approx(7 / 9)
    assert M.self_verification_report(scores, correct)["auroc"] == pytest.approx(8 / 9)
    missing = M.self_verification_report([0.4, NAN, -3.0], [True, False, False])
    assert missing["auroc"] == 1.0  # NaN ranks below -3.0: the correct 0.4 beats both
    assert M.self_verification_report([NAN, -3.0], [True, False])["auroc"] == 0.0


def test_rankdata_average_ties():
    assert M.rankdata([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([0.2, float("nan"), 0.9], [False, True, True])


def test_ece_and_bins_hand_values():
    conf = M.clip_scores(SV_SCORES)  # .9 .4 0 .7 .2 1 0
    # bin 0 {0, 0}: acc .5, conf 0 -> 1.0/7; bin 2: .2/7; bin 4: .6/7; bin 7: .7/7; bin 9 {.9, 1}: |.5-.95|*2/7
    assert M.expected_calibration_error(conf, SV_CORRECT, 10) == pytest.approx(3.4 / 7)
    bins = M.calibration_bins([0.0, 0.3, 0.99, 1.0], [1, 0, 1, 0], 10)
    assert [b["count"] for b in bins] == [1, 0, 0, 1, 0, 0, 0, 0, 0, 2]
    assert bins[9]["accuracy"] == 0.5 and bins[9]["confidence"] == pytest.approx(0.995)
    assert bins[1]["accuracy"] is None and bins[1]["confidence"] is None
    assert M.expected_calibration_error([1.0, 1.0], [1, 1], 10) == 0.0
    assert M.expected_calibration_error([], [], 10) is None


def test_spearman_hand_value():
    # ranks y: 1 2 3.5 5 3.5 -> rho = 8 / sqrt(10 * 9.5)
    assert M.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert M.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert M.spearman([1.0], [2.0]) is None
    assert M.spearman([1, 1, 1], [1, 2, 3]) is None
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 6, 40), rng.normal(size=40)
    assert M.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


# --------------------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize(("scores", "correct", "undefined"), [
    ([0.9, 0.1, 0.7], [1, 1, 1], {"acc_incorrect", "f1", "auroc"}),  # all correct
    ([0.9, 0.1, 0.7], [0, 0, 0], {"acc_correct", "f1", "recall", "auroc"}),  # all wrong (precision: TP 0, FP 2)
    ([0.1, 0.2], [0, 0], {"acc_correct", "f1", "precision", "recall", "f1_standard", "auroc"}),
    ([0.8], [1], {"acc_incorrect", "f1", "auroc"}),  # a single sample
    ([], [], {"acc_correct", "acc_incorrect", "f1", "precision", "recall", "f1_standard", "auroc", "ece"}),
    ([None, None], [0, 1], {"precision"}),  # no score at all: read as 0
])
def test_self_verification_report_edge_cases(scores, correct, undefined):
    report = M.self_verification_report(scores, correct)
    json.dumps(report, allow_nan=False)  # never NaN
    assert set(report["undefined"]) == undefined
    for key, value in report.items():
        if key != "undefined":
            assert (value is None) == (key in undefined), key


def test_all_wrong_values():
    report = M.self_verification_report([0.9, 0.1, 0.7], [0, 0, 0])
    assert report["acc_incorrect"] == pytest.approx(1 / 3)
    assert report["precision"] == 0.0 and report["f1_standard"] == 0.0


def test_voting_edge_cases():
    assert M.vote(np.zeros((0, 3), int)).tolist() == []
    assert M.vote([[0]]).tolist() == [0]  # a single sample
    assert M.picked_correct([[True]], [0]).tolist() == [True]
    assert M.picked_correct([[True, True]], [-1]).tolist() == [False]  # no answer, no pick
    out = M.scaling_curves([[-1, -1]], [[False, False]], [[0.9, 0.9]], [1, 2], num_seeds=2)
    assert out["maj"] == {1: 0.0, 2: 0.0} and out["pass"] == {1: 0.0, 2: 0.0}


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_more_problems():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 400):
        values = rng.random(n) < 0.4

        def mean(idx, values=values):
            return float(values[idx].mean())

        low, high = M.bootstrap_ci(mean, n, num_resamples=400, seed=1)
        assert low <= values.mean() <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(n): 20x the problems, ~4.5x narrower
    assert M.bootstrap_ci(lambda idx: None, 5) is None and M.bootstrap_ci(lambda idx: 1.0, 0) is None


def test_self_verification_collapse_names_why():
    correct = np.array([1, 0, 1, 0, 1, 0], bool)
    assert "correct" in M.self_verification_collapse([0.9, 0.8, 0.7, 0.6, 0.9, 0.95], correct)
    assert "incorrect" in M.self_verification_collapse([0.1, 0.2, np.nan, 0.0, 0.3, 0.4], correct)
    assert "AUROC" in M.self_verification_collapse([0.2, 0.9, 0.3, 0.8, 0.1, 0.7], correct)  # inverted
    assert M.self_verification_collapse([0.9, 0.1, 0.8, 0.2, 0.7, 0.3], correct) is None
