"""Vision-language evaluation in the CT-RATE / CT-CLIP convention.

* Zero-shot abnormality classification from a pair of prompts ("<finding>." / "not <finding>."), softmax over
  the pair, AUROC per label, and ACC / weighted F1 / precision (plus sensitivity and specificity) at an
  operating point chosen by an explicit rule: Youden's J (the default), the ROC point closest to (0, 1), or a
  fixed threshold. 95% bootstrap intervals resample the volumes (1000 times, a fixed seed) with the operating
  point held where it was chosen on all of them.
* Retrieval: volume -> report and report -> volume recall@k, and volume -> volume MAP@k where two volumes are
  relevant to each other when they share at least one positive label.

numpy + scikit-learn only: embeddings and scores come in as arrays, so every report can be recomputed from
saved embeddings or predictions without a model. scikit-learn computes ROC AUC, F1 and precision; numpy draws
the bootstrap resamples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

SINGLE_CLASS_THRESHOLD = 0.5  # where a label without both classes is cut: no ROC exists to pick one
RULES = ("youden", "corner", "fixed")  # how binary_report picks its operating point
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
THRESHOLD_METRICS = ("acc", "weighted_f1", "precision", "sensitivity", "specificity")  # measured at the threshold


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


def _roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, TPR, threshold) at every distinct score, highest threshold first, without sklearn's +inf point.

    Every threshold is kept (``drop_intermediate=False``): points sklearn drops as collinear can be the best
    operating point. The "predict nothing" point at +inf is never an operating point.
    """
    fpr, tpr, thresholds = roc_curve(np.asarray(labels), np.asarray(scores), drop_intermediate=False)
    finite = np.isfinite(thresholds)
    return fpr[finite], tpr[finite], thresholds[finite]


def threshold_closest_to_corner(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold whose ROC point (FPR, TPR) is nearest to the perfect corner (0, 1).

    Ties go to the higher threshold; the "predict nothing" point sklearn adds at +inf is never returned.
    """
    fpr, tpr, thresholds = _roc_points(labels, scores)
    return float(thresholds[np.argmin(np.hypot(fpr, 1.0 - tpr))])


def threshold_youden(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximises Youden's J = TPR - FPR (sensitivity + specificity - 1).

    Ties go to the higher threshold (the first maximum: thresholds run from the highest); the +inf
    "predict nothing" point (J = 0) is never returned.
    """
    fpr, tpr, thresholds = _roc_points(labels, scores)
    return float(thresholds[np.argmax(tpr - fpr)])


def _check_rule(rule: str, threshold: float | None) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    if rule == "fixed" and threshold is None:
        raise ValueError("rule='fixed' needs a threshold")
    if rule != "fixed" and threshold is not None:
        raise ValueError(f"a threshold goes with rule='fixed', not rule={rule!r}")


def operating_threshold(labels: np.ndarray, scores: np.ndarray, rule: str = "youden",
                        threshold: float | None = None) -> float:
    """The threshold of ``rule``: "youden" (maximum TPR - FPR), "corner" (the ROC point closest to (0, 1)) or
    "fixed" (``threshold`` itself, which only that rule takes). Predictions are ``score >= threshold``."""
    _check_rule(rule, threshold)
    if rule == "fixed":
        return float(threshold)
    return threshold_youden(labels, scores) if rule == "youden" else threshold_closest_to_corner(labels, scores)


def threshold_metrics(labels: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy, weighted F1, precision (of the positive class), sensitivity and specificity of 0/1
    predictions; precision is NaN when nothing is predicted positive, sensitivity (specificity) when there
    is no positive (negative) to find."""
    labels, pred = np.asarray(labels).astype(int).ravel(), np.asarray(pred).astype(int).ravel()
    positives = int(labels.sum())
    return {"acc": float((pred == labels).mean()),
            "weighted_f1": float(f1_score(labels, pred, average="weighted", zero_division=0)),
            "precision": float(precision_score(labels, pred, zero_division=np.nan)),
            "sensitivity": float(recall_score(labels, pred)) if positives else float("nan"),
            "specificity": float(recall_score(labels, pred, pos_label=0)) if positives < labels.size else float("nan")}


def bootstrap_indices(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(resamples, n) item indices drawn with replacement by numpy's default generator seeded with ``seed``:
    the same seed gives the same resamples."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _per_label_prfs(labels: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """(precision, recall, F1) of the positive class and (recall, F1) of the negative class of each column of
    (N, K) 0/1 arrays, from scikit-learn (one call per class for every column at once)."""
    if labels.shape[1] == 1:
        p, r, f, _ = precision_recall_fscore_support(labels[:, 0], pred[:, 0], labels=[0, 1], average=None,
                                                     zero_division=0)
        return p[1:], r[1:], f[1:], r[:1], f[:1]
    p, r, f, _ = precision_recall_fscore_support(labels, pred, average=None, zero_division=0)
    _, r0, f0, _ = precision_recall_fscore_support(1 - labels, 1 - pred, average=None, zero_division=0)
    return p, r, f, r0, f0


def bootstrap_draws(labels: np.ndarray, scores: np.ndarray, thresholds: Sequence[float],
                    indices: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC and the :data:`THRESHOLD_METRICS` of each label on each resample: (B, K) arrays for (N, K) labels
    and scores, (K,) thresholds held fixed and (B, N) resample ``indices`` (:func:`bootstrap_indices`).

    Every label is measured on the same resampled items, so means over labels have intervals too. A value
    is NaN where a resample leaves it undefined (AUROC or sensitivity without a positive, ...).
    """
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    if labels.ndim == 1:
        labels, scores = labels[:, None], scores[:, None]
    pred = (scores >= np.asarray(thresholds, dtype=np.float64)[None]).astype(int)
    n_draws, n = indices.shape
    out = {m: np.full((n_draws, labels.shape[1]), np.nan) for m in ("auc", *THRESHOLD_METRICS)}
    for b, idx in enumerate(indices):
        y, s, p = labels[idx], scores[idx], pred[idx]
        pos = y.sum(axis=0)
        both = np.flatnonzero((pos > 0) & (pos < n))
        if both.size > 1:
            out["auc"][b, both] = roc_auc_score(y[:, both], s[:, both], average=None)
        elif both.size == 1:
            out["auc"][b, both[0]] = roc_auc_score(y[:, both[0]], s[:, both[0]])
        precision, sens, f1_pos, spec, f1_neg = _per_label_prfs(y, p)
        out["acc"][b] = (p == y).mean(axis=0)
        out["weighted_f1"][b] = (f1_pos * pos + f1_neg * (n - pos)) / n  # scikit-learn's average="weighted"
        out["precision"][b] = np.where(p.sum(axis=0) > 0, precision, np.nan)
        out["sensitivity"][b] = np.where(pos > 0, sens, np.nan)
        out["specificity"][b] = np.where(pos < n, spec, np.nan)
    return out


def percentile_interval(draws: np.ndarray, level: float = BOOTSTRAP_LEVEL) -> list[float]:
    """[low, high]: the central ``level`` percentile interval of the finite draws ([NaN, NaN] if none is),
    rounded to 12 decimals so that float noise in the resampled metrics (an AUROC of 1 - 1e-16) does not show."""
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if not draws.size:
        return [float("nan"), float("nan")]
    low, high = np.percentile(draws, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return [round(float(low), 12), round(float(high), 12)]


def _intervals(draws: dict[str, np.ndarray], level: float) -> dict:
    """``<metric>_ci`` of each metric's 1-D draws and ``ci_resamples``, the resamples with a defined AUROC."""
    return {**{f"{m}_ci": percentile_interval(d, level) for m, d in draws.items()},
            "ci_resamples": int(np.isfinite(draws["auc"]).sum())}


def _bootstrap_settings(resamples: int, seed: int, level: float) -> dict:
    return {"resamples": int(resamples), "seed": int(seed), "level": float(level), "interval": "percentile",
            "threshold": "held at the operating point chosen on all items"}


def binary_report(labels: np.ndarray, scores: np.ndarray, rule: str = "youden", threshold: float | None = None, *,
                  resamples: int = 0, seed: int = BOOTSTRAP_SEED, level: float = BOOTSTRAP_LEVEL) -> dict:
    """AUROC, then ACC, weighted F1, precision, sensitivity and specificity with ``score >= threshold`` at the
    operating point of ``rule`` (:func:`operating_threshold`: "youden", "corner", or "fixed" with
    ``threshold``).

    ``resamples`` > 0 adds 95% (``level``) percentile bootstrap intervals ``<metric>_ci`` over that many
    resamples of the items (``seed`` fixes them), the threshold held where it was chosen on all items, and
    ``ci_resamples``, how many resamples had both classes (AUROC is undefined in the others).

    A label with one class only has no ROC: AUC is NaN, a ``note`` says why, no interval is drawn, and the
    threshold metrics are taken at a fixed 0.5 (at ``threshold`` with rule "fixed") so that the row is
    still complete.
    """
    labels, scores = np.asarray(labels).astype(int).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    positives = int(labels.sum())
    report: dict = {"n": int(labels.size), "positives": positives, "rule": rule}
    _check_rule(rule, threshold)
    if positives in (0, labels.size):
        cut, report["auc"] = (float(threshold) if rule == "fixed" else SINGLE_CLASS_THRESHOLD), float("nan")
        report["note"] = f"only one class present ({'all positive' if positives else 'no positive'}): AUC undefined"
    else:
        cut, report["auc"] = operating_threshold(labels, scores, rule, threshold), float(roc_auc_score(labels, scores))
    report["threshold"] = cut
    report.update(threshold_metrics(labels, scores >= cut))
    if resamples and "note" not in report:
        draws = bootstrap_draws(labels, scores, [cut], bootstrap_indices(labels.size, resamples, seed))
        report.update(_intervals({m: d[:, 0] for m, d in draws.items()}, level))
        report["bootstrap"] = _bootstrap_settings(resamples, seed, level)
    return report


def multilabel_report(labels: np.ndarray, scores: np.ndarray, names: Sequence[str], rule: str = "youden",
                      threshold: float | None = None, *, resamples: int = 0, seed: int = BOOTSTRAP_SEED,
                      level: float = BOOTSTRAP_LEVEL) -> dict:
    """:func:`binary_report` per label (columns of (N, K) arrays) and their means, as papers report them.

    Labels with one class only are listed under ``skipped`` and kept out of the means (their AUC is
    undefined, and an accuracy at a fixed cut would bias the mean); the means are NaN if none is left.
    ``resamples`` > 0 draws the same resamples of the items for every label: each label gets its intervals
    and each mean ``mean_<metric>_ci`` (over the resamples where every counted label has both classes,
    ``mean_ci_resamples`` of them); ``bootstrap`` records the settings.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.ndim != 2 or labels.shape != scores.shape or labels.shape[1] != len(names):
        raise ValueError(f"labels {labels.shape}, scores {scores.shape} and {len(names)} names do not agree")
    per_label = {name: binary_report(labels[:, k], scores[:, k], rule, threshold) for k, name in enumerate(names)}
    result = {**summarise_labels(per_label), "rule": rule}
    counted = [k for k, name in enumerate(names) if "note" not in per_label[name]]
    if resamples and counted:
        draws = bootstrap_draws(labels[:, counted], scores[:, counted], [per_label[names[k]]["threshold"] for k in counted],
                                bootstrap_indices(labels.shape[0], resamples, seed))
        for j, k in enumerate(counted):
            per_label[names[k]].update(_intervals({m: d[:, j] for m, d in draws.items()}, level))
        complete = np.isfinite(draws["auc"]).all(axis=1)
        for m in ("auc", "acc", "weighted_f1", "precision"):
            result[f"mean_{m}_ci"] = percentile_interval(draws[m][complete].mean(axis=1), level)
        result["mean_ci_resamples"] = int(complete.sum())
        result["bootstrap"] = _bootstrap_settings(resamples, seed, level)
    return result


def summarise_labels(per_label: dict[str, dict]) -> dict:
    """``per_label`` (:func:`binary_report` of each label, on the same items or not) with the means of AUC,
    ACC, weighted F1 and precision over the labels that have both classes; the others are listed under
    ``skipped``."""
    counted = [r for r in per_label.values() if "note" not in r]

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in counted])) if counted else float("nan")

    return {"per_label": per_label, "mean_auc": mean("auc"), "mean_acc": mean("acc"),
            "mean_weighted_f1": mean("weighted_f1"), "mean_precision": mean("precision"),
            "skipped": [n for n, r in per_label.items() if "note" in r]}


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


def paired_retrieval(sim: np.ndarray, ks: Sequence[int] = (1, 5, 10, 50, 100)) -> dict[str, dict[str, float]]:
    """Volume -> report (rows) and report -> volume (columns) recall@k of an (N, N) similarity of volume i to
    report j, volume i matching report i."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"a similarity of {sim.shape}: retrieval pairs item i with text i, so it must be square")
    relevant = np.eye(sim.shape[0], dtype=bool)
    return {"volume_to_report": recall_at_k(sim, relevant, ks), "report_to_volume": recall_at_k(sim.T, relevant, ks)}


def retrieval_report(image_emb: np.ndarray, text_emb: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10, 50, 100)) -> dict[str, dict[str, float]]:
    """Volume -> report and report -> volume recall@k by cosine similarity, volume i matching report i."""
    if len(image_emb) != len(text_emb):
        raise ValueError(f"{len(image_emb)} volumes but {len(text_emb)} reports: retrieval pairs item i with text i")
    return paired_retrieval(l2_normalise(image_emb) @ l2_normalise(text_emb).T, ks)


def map_at_k(sim: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10, 50, 100)) -> dict[str, float]:
    """Mean average precision at k of the rows of (Q, G) ``sim`` against a (Q, G) ``relevant`` mask.

    AP@k of a query = sum over ranks i <= k of precision@i at each relevant item, divided by min(k, R)
    (R: the query's relevant items), so that 1.0 means the top k hold as many relevant items as there are.
    MAP@k averages it over the queries with at least one relevant item (the others have nothing to find);
    k is clipped to G. Ties rank irrelevant items first, as in :func:`recall_at_k`, so that constant
    similarities cannot score above chance.
    """
    sim, relevant = np.asarray(sim, dtype=np.float64), np.asarray(relevant, dtype=bool)
    order = np.lexsort((relevant, -sim), axis=-1)  # by similarity, then irrelevant before relevant
    hits = np.take_along_axis(relevant, order, axis=1).astype(np.float64)  # (Q, G) relevance by rank
    precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)  # precision@i
    n_relevant = relevant.sum(axis=1)
    queries = n_relevant > 0
    out = {}
    for k in ks:
        kk = min(k, hits.shape[1])
        ap = (precision[:, :kk] * hits[:, :kk]).sum(axis=1)[queries] / np.minimum(k, n_relevant[queries])
        out[f"MAP@{k}"] = float(ap.mean()) if ap.size else float("nan")
    return out


def map_at_k_chance(relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10, 50, 100)) -> dict[str, float]:
    """The expected :func:`map_at_k` of a uniformly random ranking of each row, exactly.

    With R relevant among G items, rank i is relevant with probability p = R / G and ranks i, j both with
    q = R (R - 1) / (G (G - 1)), so E[precision@i x hit_i] = (p + (i - 1) q) / i.
    """
    relevant = np.asarray(relevant, dtype=bool)
    g = relevant.shape[1]
    r = relevant.sum(axis=1)[relevant.any(axis=1)].astype(np.float64)
    p, q = r / g, r * (r - 1) / (g * (g - 1)) if g > 1 else np.zeros_like(r)
    out = {}
    for k in ks:
        i = np.arange(1, min(k, g) + 1, dtype=np.float64)
        expected = ((p[:, None] + (i[None] - 1) * q[:, None]) / i[None]).sum(axis=1) / np.minimum(k, r)
        out[f"MAP@{k}"] = float(expected.mean()) if expected.size else float("nan")
    return out


def shared_label_relevance(labels: np.ndarray) -> np.ndarray:
    """(N, N) mask: volumes i != j share at least one positive label of the (N, L) 0/1 ``labels``."""
    labels = np.asarray(labels).astype(bool)
    shared = (labels.astype(np.int64) @ labels.T.astype(np.int64)) > 0
    np.fill_diagonal(shared, False)
    return shared


def volume_retrieval_report(image_emb: np.ndarray, labels: np.ndarray,
                            ks: Sequence[int] = (1, 5, 10, 50, 100)) -> dict:
    """Volume -> volume retrieval by cosine similarity: MAP@k (:func:`map_at_k`), two volumes relevant to
    each other when they share at least one positive label of the (N, L) ``labels``; each volume queries
    all the others (never itself). ``chance`` is the exact MAP@k of a random ranking and ``queries`` the
    volumes with a positive label that another volume shares."""
    image_emb, labels = np.asarray(image_emb), np.asarray(labels)
    if len(image_emb) != len(labels):
        raise ValueError(f"{len(image_emb)} volumes but {len(labels)} label rows")
    n = len(image_emb)
    if n < 2:
        raise ValueError("volume -> volume retrieval needs at least two volumes")
    sim = l2_normalise(image_emb) @ l2_normalise(image_emb).T
    others = ~np.eye(n, dtype=bool)
    sim, relevant = sim[others].reshape(n, n - 1), shared_label_relevance(labels)[others].reshape(n, n - 1)
    return {"volume_to_volume": map_at_k(sim, relevant, ks), "chance": map_at_k_chance(relevant, ks),
            "queries": int(relevant.any(axis=1).sum()), "relevant_fraction": float(relevant.mean())}
