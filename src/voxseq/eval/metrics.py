"""Vision-language evaluation in the CT-CLIP convention: zero-shot abnormality classification from a pair of
prompts ("X is present." / "X is not present."), AUROC with accuracy and weighted F1 at the ROC point
closest to (0, 1), and volume <-> report retrieval recall@k. numpy + scikit-learn only: embeddings come in
as arrays, so reports can be recomputed from saved embeddings without a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

SINGLE_CLASS_THRESHOLD = 0.5  # where a label without both classes is cut: no ROC exists to pick one


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length, so that dot products are cosine similarities."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def pair_softmax_scores(image_emb: np.ndarray, pos_text_emb: np.ndarray, neg_text_emb: np.ndarray,
                        temperature: float = 1.0) -> np.ndarray:
    """(N, K) P(present): for each label k, softmax over the cosine similarities of an image (N, D) to
    "k is present." (K, D) and "k is not present." (K, D), divided by ``temperature``.

    Comparing each image with both phrasings of one label cancels how "text-like" the image is overall,
    which a single prompt's similarity would mix into every label.
    """
    img = l2_normalise(image_emb)
    pos = img @ l2_normalise(pos_text_emb).T / temperature  # (N, K)
    neg = img @ l2_normalise(neg_text_emb).T / temperature  # (N, K)
    return 1.0 / (1.0 + np.exp(neg - pos))  # = exp(pos) / (exp(pos) + exp(neg)), without overflow


def threshold_closest_to_corner(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold whose ROC point (FPR, TPR) is nearest to the perfect corner (0, 1).

    Every threshold is considered (``drop_intermediate=False``): points sklearn drops as collinear can be
    nearer to the corner than the ones it keeps. Ties go to the higher threshold; the "predict nothing"
    point sklearn adds at +inf is never returned.
    """
    fpr, tpr, thresholds = roc_curve(np.asarray(labels), np.asarray(scores), drop_intermediate=False)
    finite = np.isfinite(thresholds)
    distance = np.hypot(fpr[finite], 1.0 - tpr[finite])
    return float(thresholds[finite][np.argmin(distance)])


def binary_report(labels: np.ndarray, scores: np.ndarray) -> dict:
    """AUROC, then accuracy and weighted F1 with ``score >= threshold`` at the ROC point closest to (0, 1).

    A label with one class only has no ROC: AUC is NaN, a ``note`` says why, and accuracy/F1 are taken at
    a fixed 0.5 so that the row is still complete.
    """
    labels, scores = np.asarray(labels).astype(int).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    positives = int(labels.sum())
    single_class = positives in (0, labels.size)
    report = {"n": int(labels.size), "positives": positives}
    if single_class:
        threshold, report["auc"] = SINGLE_CLASS_THRESHOLD, float("nan")
        report["note"] = f"only one class present ({'all positive' if positives else 'no positive'}): AUC undefined"
    else:
        threshold, report["auc"] = threshold_closest_to_corner(labels, scores), float(roc_auc_score(labels, scores))
    pred = (scores >= threshold).astype(int)
    report["threshold"] = threshold
    report["acc"] = float((pred == labels).mean())
    report["weighted_f1"] = float(f1_score(labels, pred, average="weighted", zero_division=0))
    return report


def multilabel_report(labels: np.ndarray, scores: np.ndarray, names: Sequence[str]) -> dict:
    """:func:`binary_report` per label (columns of (N, K) arrays) and their means, as papers report them.

    Labels with one class only are listed under ``skipped`` and kept out of the means (their AUC is
    undefined, and an accuracy at a fixed cut would bias the mean); the means are NaN if none is left.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.shape != scores.shape or labels.shape[1] != len(names):
        raise ValueError(f"labels {labels.shape}, scores {scores.shape} and {len(names)} names do not agree")
    return summarise_labels({name: binary_report(labels[:, k], scores[:, k]) for k, name in enumerate(names)})


def summarise_labels(per_label: dict[str, dict]) -> dict:
    """``per_label`` (:func:`binary_report` of each label, on the same items or not) with the means of AUC,
    ACC and weighted F1 over the labels that have both classes; the others are listed under ``skipped``."""
    counted = [r for r in per_label.values() if "note" not in r]

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in counted])) if counted else float("nan")

    return {"per_label": per_label, "mean_auc": mean("auc"), "mean_acc": mean("acc"),
            "mean_weighted_f1": mean("weighted_f1"), "skipped": [n for n, r in per_label.items() if "note" in r]}


def recall_at_k(sim: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10, 50, 100)) -> dict[str, float]:
    """Fraction of queries (rows of (Q, G) ``sim``) with at least one relevant gallery item in their top k.

    k is clipped to G, but keys keep the requested k ("R@100" on a gallery of 50 is 1.0 when every query
    has a relevant item). Ties are broken against the query: an irrelevant item scored the same as the
    best relevant one counts as ranked above it, so a collapsed model with constant similarities scores
    no better than chance instead of perfectly. Queries without a relevant item count as misses.
    """
    sim, relevant = np.asarray(sim, dtype=np.float64), np.asarray(relevant, dtype=bool)
    best_relevant = np.where(relevant, sim, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    above = ((sim >= best_relevant) & ~relevant).sum(axis=1)  # (Q,) irrelevant items ranked above it
    found = relevant.any(axis=1)
    g = sim.shape[1]
    return {f"R@{k}": float((found & (above < min(k, g))).mean()) for k in ks}


def retrieval_report(image_emb: np.ndarray, text_emb: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10, 50, 100)) -> dict[str, dict[str, float]]:
    """Volume -> report and report -> volume recall@k by cosine similarity, volume i matching report i."""
    if len(image_emb) != len(text_emb):
        raise ValueError(f"{len(image_emb)} volumes but {len(text_emb)} reports: retrieval pairs item i with text i")
    sim = l2_normalise(image_emb) @ l2_normalise(text_emb).T  # (N, N)
    relevant = np.eye(sim.shape[0], dtype=bool)
    return {"volume_to_report": recall_at_k(sim, relevant, ks), "report_to_volume": recall_at_k(sim.T, relevant, ks)}
