"""Zero-shot evaluation of SigVLP models (open_clip's ``zero_shot.py``; the CT-RATE protocol of CT-CLIP):
embeddings of volumes, chunks and prompts; prompt files; P(present) from the pair softmax at the model's
temperature; organ classification of chunks and findings in organ chunks; the predictions CSV, the
Markdown report and the ROC figure. Metrics with their operating-point rule are ``voxseq.eval.metrics``;
``voxseq.tasks.eval_vlp`` wires checkpoints, caches and files to these."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxseq import VoxseqError
from voxseq.config import load_yaml
from voxseq.models.vlp import SigVLP, tokenize
from voxseq.sequence.chunks import volume_chunks

PROMPT_TEMPLATE = ("{}.", "not {}.")  # CT-CLIP's zero-shot prompts, with the label as the data spells it
PREDICTIONS_CSV = "zero_shot_predictions.csv"
TRUTH_COLUMN = "{} (truth)"  # the predictions CSV's ground-truth column of a label
ORGAN_TEMPLATE = "The {}."
RULE_WORDS = {"youden": "Youden's J (maximum sensitivity + specificity - 1)",
              "corner": "the ROC point closest to (0, 1)", "fixed": "a fixed threshold"}


# ---------------------------------------------------------------------------- embeddings


@torch.no_grad()
def embed_items(model: SigVLP, items: list[dict[str, Any]], batch_tokens: int = 16384) -> np.ndarray:
    """(n, D) embeddings of chunks, in input order. Chunks of one length go through together, one chunk a
    row (no padding, no mask), at most ``batch_tokens`` tokens a forward; a longer chunk goes alone."""
    out = np.zeros((len(items), model.cfg.embed_dim), np.float32)
    by_length: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_length.setdefault(int(it["tokens"].shape[0]), []).append(i)
    for length, idx in by_length.items():
        step = max(1, batch_tokens // max(1, length))
        for a in range(0, len(idx), step):
            rows = idx[a:a + step]
            tokens = torch.stack([items[i]["tokens"] for i in rows])
            pos = torch.stack([items[i]["pos"] for i in rows])
            out[rows] = model.encode_rows(tokens, pos).numpy()
    return out


@torch.no_grad()
def embed_volume(model: SigVLP, image: np.ndarray, pad_value: float, chunk_slices: int | None = None,
                 tile_yx: list[int] | None = None) -> np.ndarray:
    """(n, D) embeddings of a (C, Z, Y, X) volume: one for the whole volume (``chunk_slices`` None, any
    number of slices) or one per z-chunk of ``chunk_slices`` slices (and per in-plane tile of ``tile_yx``)."""
    # one chunk per forward: long volumes never build one huge packed row
    return embed_items(model, volume_chunks(np.asarray(image, dtype=np.float32), model.cfg.vision.patch_size,
                                            chunk_slices, pad_value, tile_yx))


@torch.no_grad()
def embed_texts(model: SigVLP, tokenizer, texts: list[str], max_len: int, batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch):
        t = tokenize(tokenizer, texts[i:i + batch], max_len)
        out.append(model.encode_text(t["input_ids"], t["attention_mask"]).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


# ---------------------------------------------------------------------------- zero-shot


def _side(v: Any) -> str | tuple[str, ...] | None:
    """A prompt side from YAML: a string, or a non-empty list of strings (a tuple); None if neither."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(t, str) for t in v):
        return v[0] if len(v) == 1 else tuple(v)
    return None


def _prompt_entries(path: str | Path) -> dict[str, dict[str, Any]]:
    """label -> {"present", "absent"[, "organ"]} from a prompts YAML: ``label: [present, absent]``,
    ``label: [present, absent, organ]`` or ``label: {present: .., absent: .., organ: ..}``; a side may be a
    list of prompts (``label: [[p1, p2], [a1, a2]]``, ``present: [p1, p2]``), averaged."""
    data = load_yaml(path)
    out: dict[str, dict[str, Any]] = {}
    bad = []
    for k, v in (data or {}).items():
        entry = None
        if isinstance(v, list) and len(v) in (2, 3) and (len(v) == 2 or isinstance(v[2], str)):
            entry = dict(zip(("present", "absent"), map(_side, v[:2])), **({"organ": v[2]} if len(v) == 3 else {}))
        elif isinstance(v, dict) and {"present", "absent"} <= set(v) <= {"present", "absent", "organ"} \
                and isinstance(v.get("organ", ""), str):
            entry = {key: (str(t) if key == "organ" else _side(t)) for key, t in v.items()}
        if entry is None or entry["present"] is None or entry["absent"] is None:
            bad.append(k)
        else:
            out[str(k)] = entry
    if bad or not out:
        raise VoxseqError(f"{path}: each label needs [present prompt, absent prompt] (optionally a third item, "
                          "or an 'organ' key, naming the organ it is found in; a side may be a list of prompts, "
                          f"averaged); check {', '.join(map(str, bad)) or 'the file'}")
    return out


def load_prompts(path: str | Path | None, labels: list[str]) -> dict[str, tuple[Any, Any]]:
    """label -> (present, absent) prompts: a YAML mapping of label -> [present, absent] (a side is a prompt,
    or a tuple of prompts to average), else CT-CLIP's "<label>." / "not <label>." for every label."""
    if path is None:
        return {lab: (PROMPT_TEMPLATE[0].format(lab), PROMPT_TEMPLATE[1].format(lab)) for lab in labels}
    return {k: (v["present"], v["absent"]) for k, v in _prompt_entries(path).items()}


def prompt_texts(side: str | tuple[str, ...]) -> list[str]:
    """The prompts of one side of a pair."""
    return [side] if isinstance(side, str) else list(side)


def prompt_organs(path: str | Path | None) -> dict[str, str]:
    """label -> the organ (sentence name) it is found in, for the labels of a prompts YAML that name one."""
    return {k: v["organ"] for k, v in _prompt_entries(path).items() if "organ" in v} if path else {}


def embed_prompts(model: SigVLP, tokenizer, sides: list[Any], max_len: int) -> np.ndarray:
    """(len(sides), D): each side's prompt embedding, the normalised mean of its prompts' unit embeddings
    when it has several (CLIP's prompt ensembling); one text-tower pass for all of them."""
    from voxseq.eval.metrics import l2_normalise

    texts = [prompt_texts(s) for s in sides]
    emb = l2_normalise(embed_texts(model, tokenizer, [t for ts in texts for t in ts], max_len))
    cut = np.cumsum([0] + [len(ts) for ts in texts])
    return l2_normalise(np.stack([emb[a:b].mean(axis=0) for a, b in zip(cut[:-1], cut[1:])])) if sides \
        else np.zeros((0, emb.shape[1]), np.float64)


def pair_temperature(model: SigVLP) -> float:
    """The temperature of the pair softmax: the model's own (1 / exp(logit_scale)), as CT-CLIP scores with its
    learned temperature. It sets how sharp the probabilities are, never their order (AUROC and the operating
    point metrics do not depend on it); SigLIP's bias cancels between the two sides of a pair."""
    return float(1.0 / math.exp(float(model.logit_scale.detach()))) if hasattr(model, "logit_scale") else 1.0


def parse_operating_point(value: str | float | None) -> tuple[str, float | None]:
    """(rule, threshold) of ``--operating-point``: youden, corner, or a number (a fixed threshold)."""
    if value is None or value in ("youden", "corner"):
        return (value or "youden"), None
    try:
        return "fixed", float(value)
    except (TypeError, ValueError):
        raise VoxseqError(f"operating point must be youden, corner or a threshold (a number), not {value!r}") from None


def abnormality_scores(vol_chunks: list[np.ndarray], pos: np.ndarray, neg: np.ndarray,
                       temperature: float = 1.0) -> np.ndarray:
    """(N, K) P(present) per volume: the pair softmax of each embedding, highest over a volume's chunks."""
    from voxseq.eval.metrics import pair_softmax_scores

    return np.stack([pair_softmax_scores(e, pos, neg, temperature).max(axis=0) for e in vol_chunks])


POOLS = ("topk", "max", "noisy-or", "mean")  # how a volume's tile probabilities become one score
LOCALISERS = ("masks", "prompts", "none")  # which tiles score a label: those showing its organ, or every tile


def pool_probabilities(p: np.ndarray, pool: str = "topk", k: int = 3) -> float:
    """One volume-level P(present) from its tiles' P(present) ``p``: ``topk`` the mean of the ``k`` highest
    (a finding seen in a few tiles, not one tile's noise), ``max``, ``mean``, or ``noisy-or``
    1 - prod(1 - p) (the finding is somewhere if any tile shows it, tiles independent). NaN for no tiles."""
    p = np.asarray(p, dtype=np.float64).ravel()
    if pool not in POOLS:
        raise VoxseqError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
    if k < 1:
        raise VoxseqError(f"top-k needs k >= 1, not {k}")
    if p.size == 0:
        return float("nan")
    if pool == "max":
        return float(p.max())
    if pool == "mean":
        return float(p.mean())
    if pool == "topk":
        return float(np.sort(p)[-k:].mean())
    return float(-np.expm1(np.log1p(-np.clip(p, 0.0, 1.0 - 1e-12)).sum()))


def prompt_localised_organs(tile_emb: np.ndarray, organ_emb: np.ndarray, organs: list[str], top: int = 2
                            ) -> list[list[str]]:
    """Organs each tile shows by the model's own reading, for data without organ masks: the ``top`` organs
    whose "The <organ>." prompt is most similar to the tile."""
    from voxseq.eval.metrics import l2_normalise

    sim = l2_normalise(tile_emb) @ l2_normalise(organ_emb).T  # (n, K)
    order = np.argsort(-sim, axis=1)[:, :top]
    return [[organs[j] for j in row] for row in order]


def organ_tiles(shown: list[list[str]] | None, organ: str | None) -> list[int]:
    """Rows of the tiles that show ``organ`` (``shown[t]``: the organs tile t shows); [] when the organ or the
    tiles' organs are unknown - the callers then take every tile."""
    return [t for t, organs in enumerate(shown) if organ in organs] if shown is not None and organ else []


def localised_scores(tile_p: list[np.ndarray], tile_organs: list[list[list[str]]] | None,
                     label_organs: list[str | None], pool: str = "topk", k: int = 3) -> np.ndarray:
    """(N, K) volume scores from each volume's (n_tiles, K) tile probabilities: label k pools the tiles that
    show its organ ``label_organs[k]`` (``tile_organs[v][t]``: the organs tile t of volume v shows), or every
    tile when the label has no organ, the organs are unknown (None) or no tile of the volume shows it."""
    out = np.zeros((len(tile_p), len(label_organs)))
    for v, p in enumerate(tile_p):
        shown = tile_organs[v] if tile_organs is not None else None
        for j, organ in enumerate(label_organs):
            rows = organ_tiles(shown, organ)
            out[v, j] = pool_probabilities(p[rows, j] if rows else p[:, j], pool, k)
    return out


def organ_classification(model: SigVLP, tokenizer, items: list[dict[str, Any]], img: np.ndarray,
                         template: str, max_len: int) -> dict[str, Any] | None:
    """Zero-shot: which organs a chunk shows, from "The <organ>." prompts, against the organ masks."""
    from voxseq.eval.metrics import multilabel_report

    organs = sorted({o for it in items for o in it["organs"]})
    if len(organs) < 2 or not items:
        return None
    prompts = embed_texts(model, tokenizer, [template.format(o) for o in organs], max_len)
    sim = img @ prompts.T  # (n, K)
    shown = np.array([[o in it["organs"] for o in organs] for it in items], dtype=int)
    top1 = float(np.mean([shown[i, sim[i].argmax()] for i in range(len(items))]))
    chance = float(shown.mean())  # a random organ is shown this often
    majority = float(shown.mean(axis=0).max())  # always naming the organ shown most often (a constant answer)
    report = multilabel_report(shown, sim, organs)
    return {"organs": organs, "n_chunks": len(items), "top1_accuracy": top1, "top1_chance": chance,
            "top1_majority": majority,
            "prompts": {o: template.format(o) for o in organs}, **report}


def finding_classification(model: SigVLP, tokenizer, items: list[dict[str, Any]], img: np.ndarray,
                           entries: list[dict[str, Any]], pairs: dict[str, tuple[Any, Any]],
                           organs: dict[str, str], max_len: int, rule: str = "youden", threshold: float | None = None,
                           temperature: float = 1.0) -> dict[str, Any] | None:
    """Zero-shot "<finding> present in <organ>" on chunks: for each label with an organ, the chunks showing
    that organ, P(present) from the label's prompt pair against the chunk's volume label (AUROC, ACC,
    weighted F1, precision per label at the operating point of ``rule``, as for volumes; no bootstrap
    intervals: a volume's chunks are not independent draws)."""
    from voxseq.eval.metrics import binary_report, pair_softmax_scores, summarise_labels

    per_label: dict[str, Any] = {}
    for name, organ in organs.items():
        rows = [i for i, it in enumerate(items) if organ in it["organs"]
                and name in entries[it["volume_index"]].get("classes", {})]
        if not rows:
            continue
        pos, neg = embed_prompts(model, tokenizer, list(pairs[name]), max_len)
        truth = np.array([int(entries[items[i]["volume_index"]]["classes"][name]) for i in rows])
        scores = pair_softmax_scores(img[rows], pos[None], neg[None], temperature)[:, 0]
        per_label[name] = {"organ": organ, "volumes": len({items[i]["volume_index"] for i in rows}),
                           **binary_report(truth, scores, rule, threshold)}
    return {"n_chunks": len(items), **summarise_labels(per_label)} if per_label else None


def shared_binary_labels(entries: list[dict[str, Any]]) -> list[str]:
    """The class labels every entry carries with a 0/1 value, sorted (the labels of volume -> volume MAP@k)."""
    if not entries:
        return []
    names = set.intersection(*(set(e.get("classes", {})) for e in entries))
    return sorted(n for n in names if all(float(e["classes"][n]) in (0.0, 1.0) for e in entries))


def write_predictions(path: Path, ids: list[str], names: list[str], scores: np.ndarray, truth: np.ndarray) -> Path:
    """The per-volume predictions CSV: ``id`` (the record id: CT-RATE's accession / volume name), one
    column per label with P(present), then one ``<label> (truth)`` column per label with its 0/1 label."""
    scores, truth = np.asarray(scores), np.asarray(truth)
    if scores.shape != (len(ids), len(names)) or truth.shape != scores.shape:
        raise ValueError(f"{len(ids)} ids, {len(names)} labels, scores {scores.shape}, truth {truth.shape} do not agree")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", *names, *(TRUTH_COLUMN.format(n) for n in names)])
        for i, rid in enumerate(ids):
            w.writerow([rid, *(repr(float(p)) for p in scores[i]), *(int(t) for t in truth[i])])
    return path


def _ci(m: dict[str, Any], key: str) -> str:
    """`` [low, high]`` of ``key``'s bootstrap interval in ``m``, or nothing without one."""
    ci = m.get(f"{key}_ci")
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _sides(pair) -> str:
    return " / ".join(p if isinstance(p, str) else "; ".join(p) for p in pair)


def zero_shot_markdown(r: dict[str, Any]) -> str:
    s = r["slices"]
    boot = r.get("bootstrap")
    lines = [f"# Zero-shot abnormality classification ({r['n_volumes']} volumes, {min(s)}-{max(s)} slices, "
             f"aggregate: {r['aggregate']})", "", f"checkpoint: `{r['checkpoint']}`", "",
             f"Operating point: {RULE_WORDS.get(r.get('rule', 'youden'), r.get('rule'))}, per label"
             + (f"; brackets: 95% bootstrap intervals ({boot['resamples']} resamples of the volumes, seed {boot['seed']})"
                if boot else "") + f". Per-volume probabilities: `{r.get('predictions', PREDICTIONS_CSV)}`.", "",
             "| label | positives | AUROC | ACC | weighted F1 | precision | threshold | prompts (present / absent) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in r["per_label"].items():
        lines.append(f"| {name} | {m['positives']}/{m['n']} | {m['auc']:.3f}{_ci(m, 'auc')} | {m['acc']:.3f}{_ci(m, 'acc')} | "
                     f"{m['weighted_f1']:.3f}{_ci(m, 'weighted_f1')} | {m['precision']:.3f}{_ci(m, 'precision')} | "
                     f"{m['threshold']:.4g} | {_sides(r['prompts'][name])} |")
    mean = {k[5:]: v for k, v in r.items() if k.startswith("mean_") and k.endswith("_ci")}
    lines += ["", f"mean AUROC **{r['mean_auc']:.3f}**{_ci(mean, 'auc')}, ACC {r['mean_acc']:.3f}{_ci(mean, 'acc')}, "
                  f"weighted F1 {r['mean_weighted_f1']:.3f}{_ci(mean, 'weighted_f1')}, "
                  f"precision {r['mean_precision']:.3f}{_ci(mean, 'precision')}"]
    if r.get("aggregation"):
        a = r["aggregation"]
        lines += ["", f"## Volume scores from tiles ({min(a['tiles_per_volume'])}-{max(a['tiles_per_volume'])} tiles a volume)",
                  "", f"Shown above: each label pooled by **{a['pool']}** (k = {a['top_k']}) over the tiles that show its "
                  f"organ, found by **{a['localise']}**. Mean AUROC of every choice, from the same tiles:", "",
                  "| tiles scored | " + " | ".join(POOLS) + " |", "|---|" + "---|" * len(POOLS)]
        words = {"masks": "showing the organ (masks)", "prompts": "showing the organ (organ prompts)", "none": "every tile"}
        lines += [f"| {words[loc]} | " + " | ".join(f"{row[pl]['mean_auc']:.3f}" for pl in POOLS) + " |"
                  for loc, row in a["comparison"].items()]
    thick = f", {r['organ_chunk_slices']} slices each" if r.get("organ_chunk_slices") else ""
    if "organ_classification" in r:
        o = r["organ_classification"]
        lines += ["", f"## Zero-shot organ classification ({o['n_chunks']} chunks{thick})", "",
                  f"top-1 accuracy **{o['top1_accuracy']:.3f}** (a random organ is shown {o['top1_chance']:.3f} of the time, "
                  f"the most frequent one {o['top1_majority']:.3f}); "
                  f"mean AUROC {o['mean_auc']:.3f}", "", "| organ | AUROC |", "|---|---|"]
        lines += [f"| {name} | {m['auc']:.3f} |" for name, m in o["per_label"].items()]
    if "finding_in_organ_chunks" in r:
        f = r["finding_in_organ_chunks"]
        lines += ["", f"## Zero-shot findings in organ chunks ({f['n_chunks']} chunks{thick})", "",
                  "Each chunk that shows the label's organ, scored with the label's prompt pair against its volume's label.",
                  "", "| label | organ | positive chunks | volumes | AUROC | ACC | weighted F1 | precision |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {m['organ']} | {m['positives']}/{m['n']} | {m['volumes']} | {m['auc']:.3f} | {m['acc']:.3f} | "
                  f"{m['weighted_f1']:.3f} | {m['precision']:.3f} |" for name, m in f["per_label"].items()]
        lines += ["", f"mean AUROC **{f['mean_auc']:.3f}**, ACC {f['mean_acc']:.3f}, weighted F1 {f['mean_weighted_f1']:.3f}"]
    return "\n".join(lines) + "\n"


def plot_roc(truth: np.ndarray, scores: np.ndarray, names: list[str], path: Path) -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    from voxseq.train.plots import _plt, save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
    for k, name in enumerate(names):
        if 0 < truth[:, k].sum() < len(truth):
            fpr, tpr, _ = roc_curve(truth[:, k], scores[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(truth[:, k], scores[:, k]):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Zero-shot abnormality classification")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["LOCALISERS", "POOLS", "localised_scores", "organ_tiles", "pool_probabilities", "prompt_localised_organs", "ORGAN_TEMPLATE", "PREDICTIONS_CSV", "PROMPT_TEMPLATE", "RULE_WORDS", "TRUTH_COLUMN",
           "abnormality_scores", "embed_items", "embed_prompts", "embed_texts", "embed_volume",
           "finding_classification", "load_prompts", "organ_classification", "pair_temperature",
           "parse_operating_point", "plot_roc", "prompt_organs", "prompt_texts", "shared_binary_labels",
           "write_predictions", "zero_shot_markdown"]
