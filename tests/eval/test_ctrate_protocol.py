"""The CT-RATE evaluation protocol against answers worked out by hand: the Youden operating point, bootstrap
intervals, recall@k in both directions of a similarity matrix, and volume -> volume MAP@k."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score

from voxseq.eval.metrics import (
    binary_report,
    bootstrap_draws,
    bootstrap_indices,
    map_at_k,
    map_at_k_chance,
    multilabel_report,
    operating_threshold,
    paired_retrieval,
    percentile_interval,
    shared_label_relevance,
    threshold_closest_to_corner,
    threshold_youden,
    volume_retrieval_report,
)

# five negatives, four positives; by score, highest first: P P N P N P N N N. ROC points (FPR, TPR), J = TPR - FPR
# and squared distance to (0, 1) by threshold:
#   0.9 (0, 1/4) J 1/4 | 0.8 (0, 1/2) J 1/2 | 0.7 (1/5, 1/2) J 3/10 | 0.6 (1/5, 3/4) J 11/20, d2 0.1025 <- corner
#   0.5 (2/5, 3/4) J 7/20 | 0.4 (2/5, 1) J 3/5, d2 0.16 <- Youden | 0.3 (3/5, 1) J 2/5 | 0.2, 0.1 ...
LABELS = np.array([1, 1, 0, 1, 0, 1, 0, 0, 0])
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])


def test_youden_threshold_by_hand_differs_from_the_corner():
    assert threshold_youden(LABELS, SCORES) == 0.4
    assert threshold_closest_to_corner(LABELS, SCORES) == 0.6
    # a tie in J (0.8 and 0.4 both reach 1/2) goes to the higher threshold; +inf (J = 0) is never chosen
    assert threshold_youden([0, 1, 0, 1], [0.2, 0.4, 0.6, 0.8]) == 0.8
    assert threshold_youden([1, 0], [0.2, 0.7]) == 0.2  # inverted scores: every point has J <= 0
    assert operating_threshold(LABELS, SCORES, "fixed", 0.55) == 0.55
    with pytest.raises(ValueError, match="needs a threshold"):
        operating_threshold(LABELS, SCORES, "fixed")
    with pytest.raises(ValueError, match="goes with rule='fixed'"):
        binary_report(LABELS, SCORES, "youden", 0.5)
    with pytest.raises(ValueError, match="rule must be one of"):
        binary_report(LABELS, SCORES, "median")


def test_binary_report_at_the_youden_point_by_hand():
    r = binary_report(LABELS, SCORES)  # Youden's J is the default rule
    # >= 0.4: the 4 positives and the negatives 0.7, 0.5 -> TP 4, FP 2, TN 3, FN 0
    assert (r["rule"], r["threshold"], r["n"], r["positives"]) == ("youden", 0.4, 9, 4)
    assert r["auc"] == pytest.approx(17 / 20)  # positives beat 5, 5, 4 and 3 of the 5 negatives
    assert r["acc"] == pytest.approx(7 / 9) and r["precision"] == pytest.approx(4 / 6)
    assert r["sensitivity"] == 1.0 and r["specificity"] == pytest.approx(3 / 5)
    f1_pos, f1_neg = 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * (3 / 5) / (1 + 3 / 5)  # 4/5 and 3/4, supports 4 and 5
    assert r["weighted_f1"] == pytest.approx((4 * f1_pos + 5 * f1_neg) / 9)
    pred = SCORES >= 0.4  # the same numbers as scikit-learn's
    assert r["weighted_f1"] == pytest.approx(f1_score(LABELS, pred, average="weighted"))
    assert r["precision"] == pytest.approx(precision_score(LABELS, pred))
    assert "auc_ci" not in r  # no resamples asked for

    c = binary_report(LABELS, SCORES, "corner")  # >= 0.6: TP 3, FP 1, TN 4, FN 1
    assert c["threshold"] == 0.6 and c["precision"] == pytest.approx(3 / 4) and c["sensitivity"] == pytest.approx(3 / 4)
    f = binary_report(LABELS, SCORES, "fixed", 0.5)  # >= 0.5: TP 3, FP 2, TN 3, FN 1
    assert (f["rule"], f["threshold"]) == ("fixed", 0.5)
    assert f["acc"] == pytest.approx(6 / 9) and f["precision"] == pytest.approx(3 / 5)
    assert f["sensitivity"] == pytest.approx(3 / 4) and f["specificity"] == pytest.approx(3 / 5)
    assert f["auc"] == r["auc"]  # the rule never changes the AUROC
    single = binary_report([0, 0, 0], [0.2, 0.6, 0.9], "fixed", 0.7, resamples=50)
    assert math.isnan(single["auc"]) and math.isnan(single["sensitivity"]) and "note" in single
    assert single["threshold"] == 0.7 and single["acc"] == pytest.approx(2 / 3) and "auc_ci" not in single
    assert single["precision"] == 0.0  # 0.9 predicted positive, wrongly
    assert math.isnan(binary_report([0, 0, 0], [0.2, 0.6, 0.9], "fixed", 0.95)["precision"])  # nothing predicted


def test_bootstrap_indices_are_fixed_by_the_seed():
    a, b = bootstrap_indices(7, 1000, seed=3), bootstrap_indices(7, 1000, seed=3)
    assert a.shape == (1000, 7) and a.min() >= 0 and a.max() == 6
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, bootstrap_indices(7, 1000, seed=4))


def test_perfect_separation_has_the_interval_one_one():
    labels = np.array([0, 1] * 10)
    r = binary_report(labels, labels * 0.5 + np.linspace(0, 0.1, 20), resamples=1000)
    assert r["auc"] == 1.0 and r["auc_ci"] == [1.0, 1.0]  # every resample with both classes is separated
    assert r["acc_ci"] == [1.0, 1.0] and r["weighted_f1_ci"] == [1.0, 1.0] and r["precision_ci"] == [1.0, 1.0]
    assert 990 <= r["ci_resamples"] <= 1000  # P(a resample of 20 has one class) = 2 / 2**20
    assert r["bootstrap"]["resamples"] == 1000 and r["bootstrap"]["seed"] == 0 and r["bootstrap"]["level"] == 0.95
    constant = binary_report(labels, np.full(20, 0.3), resamples=100)  # every ranking ties: AUROC 0.5 on every resample
    assert constant["auc_ci"] == [0.5, 0.5]


def test_bootstrap_interval_holds_the_estimate_and_the_seed_reproduces_it():
    rng = np.random.default_rng(0)
    labels = (rng.random(120) < 0.3).astype(int)
    scores = np.clip(0.25 * labels + rng.random(120), 0, 1)
    r = binary_report(labels, scores, resamples=1000, seed=7)
    for m in ("auc", "acc", "weighted_f1", "precision", "sensitivity", "specificity"):
        low, high = r[f"{m}_ci"]
        assert low <= r[m] <= high and high - low < 0.5, m
    assert 0.0 < r["auc_ci"][1] - r["auc_ci"][0] < 0.3  # a real interval at n = 120
    again = binary_report(labels, scores, resamples=100, seed=7)
    assert binary_report(labels, scores, resamples=100, seed=7) == again
    assert binary_report(labels, scores, resamples=100, seed=8)["auc_ci"] != again["auc_ci"]
    # the interval is the 2.5th and 97.5th percentiles of the resampled AUROCs
    draws = bootstrap_draws(labels, scores, [r["threshold"]], bootstrap_indices(120, 1000, 7))
    np.testing.assert_allclose(r["auc_ci"], np.percentile(draws["auc"][:, 0], [2.5, 97.5]))
    assert all(math.isnan(v) for v in percentile_interval([np.nan, np.nan]))  # nothing defined: no interval


def test_resampling_nothing_reproduces_the_point_estimates():
    rng = np.random.default_rng(1)
    labels = (rng.random((40, 3)) < 0.4).astype(int)
    scores = rng.random((40, 3)) + 0.3 * labels
    r = multilabel_report(labels, scores, ["a", "b", "c"])
    identity = np.arange(40)[None]  # one "resample": every item once
    draws = bootstrap_draws(labels, scores, [r["per_label"][n]["threshold"] for n in "abc"], identity)
    for m in ("auc", "acc", "weighted_f1", "precision", "sensitivity", "specificity"):
        np.testing.assert_allclose(draws[m][0], [r["per_label"][n][m] for n in "abc"], err_msg=m)


def test_multilabel_intervals_share_resamples_and_skip_single_class_labels():
    rng = np.random.default_rng(2)
    labels = np.stack([(rng.random(60) < 0.3), (rng.random(60) < 0.5), np.zeros(60, bool)], axis=1).astype(int)
    scores = rng.random((60, 3)) + 0.4 * labels
    r = multilabel_report(labels, scores, ["x", "y", "none"], resamples=300, seed=5)
    assert r["skipped"] == ["none"] and "auc_ci" not in r["per_label"]["none"]
    assert r["rule"] == "youden" and r["bootstrap"]["resamples"] == 300
    for m in ("auc", "acc", "weighted_f1", "precision"):
        low, high = r[f"mean_{m}_ci"]
        assert low <= r[f"mean_{m}"] <= high, m
    assert r["mean_precision"] == pytest.approx((r["per_label"]["x"]["precision"] + r["per_label"]["y"]["precision"]) / 2)
    # one label alone, with the same seed, draws the same resamples: the same interval
    alone = binary_report(labels[:, 0], scores[:, 0], resamples=300, seed=5)
    assert alone["auc_ci"] == r["per_label"]["x"]["auc_ci"]
    assert r["mean_ci_resamples"] <= min(r["per_label"]["x"]["ci_resamples"], r["per_label"]["y"]["ci_resamples"])


def test_recall_at_k_both_directions_of_a_hand_made_similarity():
    # sim[i, j]: volume i against report j. Rows: volume 1's report (0.5) is 2nd behind report 0 (0.8).
    # Columns: every report's own volume is its most similar one.
    sim = np.array([[0.9, 0.1, 0.3],
                    [0.8, 0.5, 0.2],
                    [0.1, 0.4, 0.7]])
    r = paired_retrieval(sim, ks=(1, 2, 5))
    assert r["volume_to_report"] == {"R@1": pytest.approx(2 / 3), "R@2": 1.0, "R@5": 1.0}
    assert r["report_to_volume"] == {"R@1": 1.0, "R@2": 1.0, "R@5": 1.0}
    swapped = paired_retrieval(sim.T, ks=(1, 2, 5))  # transposing swaps the directions
    assert swapped["report_to_volume"] == r["volume_to_report"] and swapped["volume_to_report"] == r["report_to_volume"]
    with pytest.raises(ValueError, match="square"):
        paired_retrieval(sim[:2])


def test_map_at_k_by_hand():
    sim = np.array([[0.9, 0.8, 0.7, 0.1],    # relevant at ranks 2 and 4: AP@2 = (1/2) / 2, AP@4 = (1/2 + 2/4) / 2
                    [0.2, 0.6, 0.6, 0.4],    # item 2 ties irrelevant item 1: ranked after it, 2nd; AP@k>=2 = 1/2
                    [0.5, 0.4, 0.3, 0.2]])   # nothing relevant: not a query
    relevant = np.array([[0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=bool)
    r = map_at_k(sim, relevant, ks=(1, 2, 3, 4, 10))
    assert r == {"MAP@1": 0.0, "MAP@2": pytest.approx(3 / 8), "MAP@3": pytest.approx(3 / 8),
                 "MAP@4": pytest.approx(1 / 2), "MAP@10": pytest.approx(1 / 2)}  # k clipped to the 4 items
    # the best ranking reaches 1 at every k: the top min(k, R) are all relevant
    assert map_at_k(relevant.astype(float), relevant, ks=(1, 2, 4)) == {"MAP@1": 1.0, "MAP@2": 1.0, "MAP@4": 1.0}
    # chance: query 0 has R = 2 of G = 4 (p = 1/2), query 1 R = 1 (p = 1/4); at k = 1 AP is P(top is relevant)
    assert map_at_k_chance(relevant, ks=(1,))["MAP@1"] == pytest.approx((1 / 2 + 1 / 4) / 2)


def test_map_at_k_chance_is_the_mean_over_every_ranking():
    relevant = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=bool)
    for k in (1, 2, 3, 5):
        every = [map_at_k(np.array([perm, perm], dtype=float), relevant, ks=(k,))[f"MAP@{k}"]
                 for perm in itertools.permutations(range(5))]
        assert map_at_k_chance(relevant, ks=(k,))[f"MAP@{k}"] == pytest.approx(np.mean(every)), k


def test_volume_to_volume_map_over_shared_labels():
    labels = np.array([[1, 0, 0],   # v0 shares label 0 with v1
                       [1, 1, 0],   # v1 shares with v0 and v2
                       [0, 1, 0],   # v2 shares label 1 with v1
                       [0, 0, 1],   # v3: a positive no one shares -> not a query
                       [0, 0, 0]])  # v4: no positive -> not a query, and relevant to no one
    expected = np.zeros((5, 5), bool)
    expected[0, 1] = expected[1, 0] = expected[1, 2] = expected[2, 1] = True
    np.testing.assert_array_equal(shared_label_relevance(labels), expected)
    # embeddings: v1 between v0 and v2 (45 degrees from each), v3 and v4 far off
    emb = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, -1.0, 0.2]])
    r = volume_retrieval_report(emb, labels, ks=(1, 2, 4))
    assert r["queries"] == 3 and r["relevant_fraction"] == pytest.approx(4 / 20)
    # v0: v1 first (AP 1). v1: v0 and v2 tie at cos 0.707, both relevant, first and second (AP 1). v2: v1 first.
    assert r["volume_to_volume"] == {"MAP@1": 1.0, "MAP@2": 1.0, "MAP@4": 1.0}
    # v1 pointed away from its neighbours: v0 and v2 rank it last (4th), v1 finds them 3rd and 4th behind v4, v3
    emb[1] = [-1.0, -1.0, 0.0]
    far = volume_retrieval_report(emb, labels, ks=(1, 2, 4))["volume_to_volume"]
    assert far["MAP@1"] == 0.0 and far["MAP@4"] == pytest.approx((1 / 4 + (1 / 3 + 2 / 4) / 2 + 1 / 4) / 3)
    assert volume_retrieval_report(emb, labels, ks=(1,))["chance"]["MAP@1"] == pytest.approx((1 / 4 + 2 / 4 + 1 / 4) / 3)
