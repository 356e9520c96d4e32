"""Zero-shot classification and retrieval metrics against answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from voxseq.eval.metrics import (
    binary_report,
    multilabel_report,
    pair_softmax_scores,
    recall_at_k,
    retrieval_report,
    threshold_closest_to_corner,
)

# four negatives, three positives. ROC points (FPR, TPR) by threshold: 0.9 (0, 1/3), 0.7 (0, 2/3),
# 0.6 (1/4, 2/3), 0.4 (1/4, 1), 0.3 (1/2, 1)...; squared distances to (0, 1): 4/9, 1/9, 1/9 + 1/16, 1/16, 1/4
LABELS = np.array([0, 0, 0, 0, 1, 1, 1])
SCORES = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.9])


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_pair_softmax_scores():
    image = np.array([[1.0, 0.0], [0.0, 3.0]])  # the second is not unit length: cosine similarities are used
    pos = np.array([[1.0, 0.0], [1.0, 1.0]])  # label 0 present <-> x axis; label 1 present <-> the diagonal
    neg = np.array([[0.0, 1.0], [-1.0, -1.0]])
    s = pair_softmax_scores(image, pos, neg)
    r = 1 / math.sqrt(2)
    assert s.shape == (2, 2)
    np.testing.assert_allclose(s, [[sigmoid(1), sigmoid(2 * r)], [sigmoid(-1), sigmoid(2 * r)]], rtol=1e-12)
    np.testing.assert_allclose(pair_softmax_scores(image, pos, neg, temperature=0.5)[0, 0], sigmoid(2), rtol=1e-12)
    np.testing.assert_allclose(pair_softmax_scores(image, neg, pos), 1 - s, rtol=1e-12)  # the pair's two sides sum to 1


def test_threshold_closest_to_corner():
    assert threshold_closest_to_corner(LABELS, SCORES) == 0.4
    assert threshold_closest_to_corner([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.9]) == 0.8  # separable: (0, 1) itself
    # inverted scores: (0, 0) at +inf and (1, 1) tie at distance 1; the +inf "predict nothing" is never chosen
    assert threshold_closest_to_corner([1, 0], [0.2, 0.7]) == 0.2


def test_binary_report_by_hand():
    r = binary_report(LABELS, SCORES)
    # at >= 0.4: negatives predicted [0, 0, 0, 1], positives [1, 1, 1] -> 6 of 7 right
    # class 0: precision 3/3, recall 3/4 -> F1 6/7; class 1: precision 3/4, recall 3/3 -> F1 6/7; weights 4/7, 3/7
    assert r["threshold"] == 0.4 and r["n"] == 7 and r["positives"] == 3
    assert r["auc"] == pytest.approx(11 / 12)  # 0.4 beats 3 of the 4 negatives, 0.7 and 0.9 beat all
    assert r["acc"] == pytest.approx(6 / 7) and r["weighted_f1"] == pytest.approx(6 / 7)
    assert "note" not in r
    # an asymmetric case: labels [1, 1, 0, 0, 0], scores [0.9, 0.3, 0.5, 0.2, 0.1]; ROC points by threshold
    # 0.9 (0, 1/2) d2 1/4, 0.5 (1/3, 1/2) d2 13/36, 0.3 (1/3, 1) d2 1/9 <- best, 0.2 (2/3, 1)
    r = binary_report([1, 1, 0, 0, 0], [0.9, 0.3, 0.5, 0.2, 0.1])
    assert r["threshold"] == 0.3 and r["acc"] == pytest.approx(4 / 5)  # predictions [1, 1, 1, 0, 0]
    f1_neg, f1_pos = 2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * (2 / 3) * 1 / (2 / 3 + 1)  # 4/5 both
    assert r["weighted_f1"] == pytest.approx(0.6 * f1_neg + 0.4 * f1_pos)
    assert r["auc"] == pytest.approx(5 / 6)  # 0.9 beats 3 negatives, 0.3 beats 2 of 3


def test_single_class_label_has_nan_auc_and_a_note():
    r = binary_report([0, 0, 0], [0.2, 0.6, 0.9])
    assert math.isnan(r["auc"]) and "one class" in r["note"]
    assert r["threshold"] == 0.5 and r["acc"] == pytest.approx(1 / 3) and r["positives"] == 0


def test_multilabel_report_means_skip_single_class_labels():
    labels = np.stack([LABELS, LABELS, np.ones(7, dtype=int)], axis=1)  # (7, 3)
    scores = np.stack([SCORES, LABELS * 0.8 + 0.1, SCORES], axis=1)  # second label perfectly separated
    r = multilabel_report(labels, scores, ["Emphysema", "Cardiomegaly", "Lung nodule"])
    assert r["per_label"]["Cardiomegaly"]["auc"] == 1.0 and r["per_label"]["Cardiomegaly"]["acc"] == 1.0
    assert r["skipped"] == ["Lung nodule"] and math.isnan(r["per_label"]["Lung nodule"]["auc"])
    assert r["mean_auc"] == pytest.approx((11 / 12 + 1) / 2)
    assert r["mean_acc"] == pytest.approx((6 / 7 + 1) / 2) and r["mean_weighted_f1"] == pytest.approx((6 / 7 + 1) / 2)
    with pytest.raises(ValueError, match="do not agree"):
        multilabel_report(labels, scores, ["one", "two"])


def test_recall_at_k_by_hand():
    sim = np.array([[0.9, 0.1, 0.5, 0.3],   # relevant item 2 ranks 2nd
                    [0.1, 0.2, 0.3, 0.4],   # relevant items 0 and 1: the best ranks 3rd
                    [0.5, 0.5, 0.5, 0.5]])  # all tied with relevant item 0: counted below the 3 others
    relevant = np.zeros((3, 4), dtype=bool)
    relevant[0, 2] = relevant[1, 0] = relevant[1, 1] = relevant[2, 0] = True
    r = recall_at_k(sim, relevant, ks=(1, 2, 3, 4, 10))
    assert r == {"R@1": 0.0, "R@2": pytest.approx(1 / 3), "R@3": pytest.approx(2 / 3), "R@4": 1.0, "R@10": 1.0}
    relevant[2] = False  # a query with no relevant item is a miss at every k
    assert recall_at_k(sim, relevant, ks=(10,)) == {"R@10": pytest.approx(2 / 3)}


def test_retrieval_perfect_inverted_and_random():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, 16))
    perfect = retrieval_report(emb, emb * 2.0, ks=(1, 5, 100))
    assert perfect == {"volume_to_report": {"R@1": 1.0, "R@5": 1.0, "R@100": 1.0},
                       "report_to_volume": {"R@1": 1.0, "R@5": 1.0, "R@100": 1.0}}  # k=100 clipped to 20
    # reports pointing the opposite way: each volume's own report is its least similar one (rank 20 of 20)
    inverted = retrieval_report(emb, -emb, ks=(1, 5, 19, 20))
    for direction in inverted.values():
        assert direction == {"R@1": 0.0, "R@5": 0.0, "R@19": 0.0, "R@20": 1.0}
    # unrelated embeddings: chance level k / N within 4 binomial standard deviations
    n = 400
    chance = retrieval_report(rng.normal(size=(n, 32)), rng.normal(size=(n, 32)), ks=(5, 50, 100))
    for direction in chance.values():
        for k in (5, 50, 100):
            p = k / n
            assert abs(direction[f"R@{k}"] - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (k, direction)
    with pytest.raises(ValueError, match="item i with text i"):
        retrieval_report(emb, emb[:3])
