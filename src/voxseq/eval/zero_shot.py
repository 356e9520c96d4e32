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
from voxseq.sequence.chunks import collate_packed, volume_chunks

PROMPT_TEMPLATE = ("{}.", "not {}.")  # CT-CLIP's zero-shot prompts, with the label as the data spells it
PREDICTIONS_CSV = "zero_shot_predictions.csv"
TRUTH_COLUMN = "{} (truth)"  # the predictions CSV's ground-truth column of a label
ORGAN_TEMPLATE = "The {}."
RULE_WORDS = {"youden": "Youden's J (maximum sensitivity + specificity - 1)",
              "corner": "the ROC point closest to (0, 1)", "fixed": "a fixed threshold"}


# ---------------------------------------------------------------------------- embeddings


@torch.no_grad()
def embed_items(model: SigVLP, items: list[dict[str, Any]]) -> np.ndarray:
    """(n, D) embeddings of sampled chunks, one forward each."""
    if not items:
        return np.zeros((0, model.cfg.embed_dim), np.float32)
    return np.concatenate([model.encode_chunks(b["tokens"], b["pos"], b["segment"], 1).numpy()
                           for b in (collate_packed([it], max_tokens=it["tokens"].shape[0]) for it in items)])


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


__all__ = ["ORGAN_TEMPLATE", "PREDICTIONS_CSV", "PROMPT_TEMPLATE", "RULE_WORDS", "TRUTH_COLUMN",
           "abnormality_scores", "embed_items", "embed_prompts", "embed_texts", "embed_volume",
           "finding_classification", "load_prompts", "organ_classification", "pair_temperature",
           "parse_operating_point", "plot_roc", "prompt_organs", "prompt_texts", "shared_binary_labels",
           "write_predictions", "zero_shot_markdown"]
