"""`voxseq evaluate zero-shot` and `voxseq evaluate retrieval`: SigVLP checkpoints on a manifest.

* Zero-shot abnormality classification (the CT-RATE protocol of CT-CLIP): each volume against "<X>." and
  "not <X>." (CT-CLIP's prompts; or the prompts of a YAML file, several per side averaged), softmax over the
  pair at the model's temperature, AUROC per label, ACC / weighted F1 / precision at the operating point of
  Youden's J (or the ROC corner, or a fixed threshold), 95% bootstrap intervals (1000 resamples of the
  volumes, a fixed seed), and every volume's P(present) per label written to zero_shot_predictions.csv with
  its record id (the accession) and its labels. A volume is embedded whole, whatever its number of
  slices (``aggregate=volume``), or as z-chunks whose highest P(present) counts (``aggregate=chunks``; cut
  in-plane too, into half-overlapping tiles of the training crop, when the checkpoint trained on ``crop_yx``).
* Zero-shot organ classification of chunks: which organs a chunk shows, from organ-name prompts, scored
  against the organ masks (AUROC per organ and top-1 accuracy).
* Zero-shot findings in organ chunks ("lesion present in <organ>"): for labels whose prompts name their organ,
  the chunks that show that organ (drawn as in training, but placed without looking at the lesions), each
  scored with the label's prompt pair against the volume's label. A chunk shows an organ with a lesion box
  only when it holds the lesion (``chunks.lesion_fraction``), so a positive chunk has the finding in view.
* Retrieval: volume -> report and report -> volume recall@k, and volume -> volume MAP@k where two volumes
  are relevant to each other when they share at least one positive label.

The evaluation volumes are prepared with the checkpoint's own preprocessing (into ``OUT/cache``), so
evaluation never drifts from training.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxseq import VoxseqError
from voxseq.config import from_dict, load_yaml, to_dict
from voxseq.data.cache import Cache, prepare_cache
from voxseq.models.vlp import SigVLP, load_tokenizer
from voxseq.sequence.chunks import ChunkConfig, ChunkTextDataset, collate_packed, volume_chunks
from voxseq.tasks.pretrain_vlp import tokenize, vlp_from_checkpoint

PROMPT_TEMPLATE = ("{}.", "not {}.")  # CT-CLIP's zero-shot prompts, with the label as the data spells it
PREDICTIONS_CSV = "zero_shot_predictions.csv"
TRUTH_COLUMN = "{} (truth)"  # the predictions CSV's ground-truth column of a label
ORGAN_TEMPLATE = "The {}."


# ---------------------------------------------------------------------------- data and embeddings


def evaluation_cache(source: str | Path, out: Path, meta: dict[str, Any], split: str | None,
                     nonfinite: str = "error") -> Cache:
    """A cache of ``source`` with the checkpoint's preprocessing: an existing cache folder (checked to match)
    or a manifest / dataset folder prepared into ``out/cache`` (``nonfinite`` as in ``read_volume``)."""
    from voxseq.tasks.prepare import load_records

    pre = meta.get("preprocess", {})
    source = Path(source)
    if (source / "index.jsonl").is_file():
        cache = Cache(source, split=split)
        if to_dict(cache.preprocess) != pre:
            raise VoxseqError(f"{source}: this cache was prepared with other settings than the checkpoint's "
                              "preprocessing; pass the manifest instead and it is prepared to match")
    else:
        from voxseq.data.preprocess import Preprocess

        prepare_cache(load_records(source), out / "cache", from_dict(Preprocess, pre), nonfinite=nonfinite)
        cache = Cache(out / "cache", split=split)
    if len(cache) == 0:
        raise VoxseqError(f"{source}: no volumes{f' in split {split!r}' if split else ''} to evaluate")
    return cache


def load_for_evaluation(checkpoint, source, out: Path, split: str | None, nonfinite: str = "error"):
    """(model, tokenizer, text max length, checkpoint metadata, evaluation cache); creates ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model, _, meta = vlp_from_checkpoint(checkpoint)
    max_len = meta["config"].get("text_max_length") or model.cfg.text_max_length
    return model, load_tokenizer(model.cfg.text_model), max_len, meta, evaluation_cache(source, out, meta, split, nonfinite)


def _pad_value(meta: dict[str, Any]) -> float:
    return float(from_dict(ChunkConfig, meta["config"]["chunks"]).pad_value)


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


def _progress(items, description: str):
    from rich.progress import track

    return track(items, description=description, transient=True)


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


def prompt_organs(path: str | Path | None) -> dict[str, str]:
    """label -> the organ (sentence name) it is found in, for the labels of a prompts YAML that name one."""
    return {k: v["organ"] for k, v in _prompt_entries(path).items() if "organ" in v} if path else {}


def abnormality_scores(vol_chunks: list[np.ndarray], pos: np.ndarray, neg: np.ndarray,
                       temperature: float = 1.0) -> np.ndarray:
    """(N, K) P(present) per volume: the pair softmax of each embedding, highest over a volume's chunks."""
    from voxseq.eval.metrics import pair_softmax_scores

    return np.stack([pair_softmax_scores(e, pos, neg, temperature).max(axis=0) for e in vol_chunks])


def organ_chunks(cache: Cache, meta: dict[str, Any], n_chunks: int, seed: int = 12345,
                 slices: int | None = None) -> list[dict[str, Any]]:
    """``n_chunks`` chunks drawn as the checkpoint's training drew them (its chunk sizes, crops and organ
    centring; every shown organ listed), keeping those paired through organ masks; [] without masks.

    Organ windows are placed without looking at the lesions (``lesion_centred`` off): whether one holds a
    lesion is then chance, and its place says nothing about the finding. An organ with lesions counts as
    shown only by windows that hold one (``lesion_fraction``), as in training. ``slices``: every chunk this
    thick instead (a multiple of the patch; thicker than training shows the model longer inputs than it saw)."""
    thickness = {"min_slices": slices, "max_slices": slices} if slices else {}
    cfg = from_dict(ChunkConfig, {**meta["config"]["chunks"], "text_mode": "all", "max_sentences": 64, "seed": seed,
                                  "focus_fraction": 0.0, "lesion_centred": False, **thickness})
    try:
        ds = ChunkTextDataset(cache, cfg)
    except VoxseqError:
        return []
    items = [ds[i] for i in _progress(range(n_chunks), "zero-shot: drawing organ chunks")]
    return [it for it in items if it["organs"]]  # not the report fallback


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


def run_zero_shot(checkpoint: str | Path, source: str | Path, out: str | Path, *, prompts: str | Path | None = None,
                  labels: list[str] | None = None, aggregate: str = "volume", chunk_slices: int = 32,
                  split: str | None = None, organ_chunks_n: int = 200, organ_chunk_slices: int | None = None,
                  organ_template: str = ORGAN_TEMPLATE, nonfinite: str = "error",
                  operating_point: str | float | None = "youden", bootstrap: int = 1000,
                  bootstrap_seed: int = 0) -> dict[str, Any]:
    """Zero-shot abnormality (and organ) classification; writes zero_shot.json, zero_shot.md, roc.png and
    zero_shot_predictions.csv.

    ``operating_point``: youden, corner or a fixed threshold on P(present), for the abnormality and
    finding-in-organ metrics (organ classification scores similarities and keeps Youden's J). ``bootstrap``:
    resamples of the volumes for the 95% intervals (0: none), drawn from ``bootstrap_seed``."""
    from voxseq.eval.metrics import multilabel_report

    if aggregate not in ("volume", "chunks"):
        raise VoxseqError(f"aggregate must be volume or chunks, not {aggregate!r}")
    if bootstrap < 0:
        raise VoxseqError(f"bootstrap must be a number of resamples (0 for none), not {bootstrap}")
    rule, threshold = parse_operating_point(operating_point)
    out = Path(out)
    model, tokenizer, max_len, meta, cache = load_for_evaluation(checkpoint, source, out, split, nonfinite)
    entries = [cache.entry(i) for i in range(len(cache))]
    pairs = load_prompts(prompts, labels or sorted({k for e in entries for k in e.get("classes", {})}))
    names = [n for n in (labels or list(pairs)) if any(n in e.get("classes", {}) for e in entries)]
    if not names:
        raise VoxseqError(f"{source}: no volume carries a class label among {sorted(pairs)}")
    missing = [n for n in names if n not in pairs]
    if missing:
        raise VoxseqError(f"{prompts}: no prompts for label(s) {', '.join(missing)}")
    rows = [i for i, e in enumerate(entries) if all(n in e.get("classes", {}) for n in names)]
    pad = _pad_value(meta)
    tile_yx = from_dict(ChunkConfig, meta["config"]["chunks"]).crop_yx if aggregate == "chunks" else None
    emb = [embed_volume(model, cache.image(i), pad, None if aggregate == "volume" else chunk_slices, tile_yx)
           for i in _progress(rows, "zero-shot: embedding volumes")]
    temperature = pair_temperature(model)
    pos = embed_prompts(model, tokenizer, [pairs[n][0] for n in names], max_len)
    neg = embed_prompts(model, tokenizer, [pairs[n][1] for n in names], max_len)
    scores = abnormality_scores(emb, pos, neg, temperature)
    truth = np.array([[entries[i]["classes"][n] for n in names] for i in rows], dtype=int)
    ids = [str(entries[i]["id"]) for i in rows]
    result = {"checkpoint": str(checkpoint), "source": str(source), "aggregate": aggregate, "tile_yx": tile_yx,
              "organ_chunk_slices": organ_chunk_slices,
              "n_volumes": len(rows), "slices": [int(cache.image(i).shape[1]) for i in rows],
              "prompts": {n: [p if isinstance(p, str) else list(p) for p in pairs[n]] for n in names},
              "prompt_template": None if prompts else list(PROMPT_TEMPLATE), "temperature": temperature,
              "ids": ids, "predictions": PREDICTIONS_CSV,
              **multilabel_report(truth, scores, names, rule, threshold, resamples=bootstrap, seed=bootstrap_seed)}
    items = organ_chunks(cache, meta, organ_chunks_n, slices=organ_chunk_slices)
    img = embed_items(model, items)
    organ = organ_classification(model, tokenizer, items, img, organ_template, max_len)
    if organ is not None:
        result["organ_classification"] = organ
    findings = finding_classification(model, tokenizer, items, img, entries, pairs,
                                      {n: o for n, o in prompt_organs(prompts).items() if n in names}, max_len,
                                      rule, threshold, temperature)
    if findings is not None:
        result["finding_in_organ_chunks"] = findings
    (out / "zero_shot.json").write_text(json.dumps(result, indent=1))
    (out / "zero_shot.md").write_text(zero_shot_markdown(result))
    write_predictions(out / PREDICTIONS_CSV, ids, names, scores, truth)
    plot_roc(truth, scores, names, out / "roc.png")
    return result


RULE_WORDS = {"youden": "Youden's J (maximum sensitivity + specificity - 1)",
              "corner": "the ROC point closest to (0, 1)", "fixed": "a fixed threshold"}


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


# ---------------------------------------------------------------------------- retrieval


def run_retrieval(checkpoint: str | Path, source: str | Path, out: str | Path, *, split: str | None = None,
                  ks: tuple[int, ...] = (1, 5, 10, 50, 100), nonfinite: str = "error") -> dict[str, Any]:
    """Volume -> report and report -> volume recall@k, and volume -> volume MAP@k over the binary labels
    every volume carries (two volumes relevant when they share a positive one); writes retrieval.json and
    retrieval.md."""
    from voxseq.eval.metrics import retrieval_report, volume_retrieval_report

    out = Path(out)
    model, tokenizer, max_len, meta, cache = load_for_evaluation(checkpoint, source, out, split, nonfinite)
    rows = [i for i in range(len(cache)) if (cache.entry(i).get("text") or "").strip()]
    if len(rows) < 2:
        raise VoxseqError(f"{source}: retrieval needs at least two volumes with a report (text)")
    pad = _pad_value(meta)
    img = np.concatenate([embed_volume(model, cache.image(i), pad) for i in _progress(rows, "retrieval: embedding volumes")])
    txt = embed_texts(model, tokenizer, [cache.entry(i)["text"] for i in rows], max_len)
    rep = retrieval_report(img, txt, ks)
    result = {"checkpoint": str(checkpoint), "source": str(source), "n": len(rows), **rep,
              "chance": {f"R@{k}": min(k, len(rows)) / len(rows) for k in ks},
              "ids": [str(cache.entry(i)["id"]) for i in rows]}
    labels = shared_binary_labels([cache.entry(i) for i in rows])
    if labels:
        truth = np.array([[cache.entry(i)["classes"][n] for n in labels] for i in rows], dtype=int)
        vv = volume_retrieval_report(img, truth, ks)
        result.update({"volume_to_volume": vv["volume_to_volume"], "volume_to_volume_chance": vv["chance"],
                       "volume_to_volume_labels": labels, "volume_to_volume_queries": vv["queries"],
                       "volume_to_volume_relevant_fraction": vv["relevant_fraction"],
                       "volume_to_volume_relevance": "shares at least one positive label"})
    (out / "retrieval.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Retrieval ({len(rows)} volumes and their reports)", "", f"checkpoint: `{checkpoint}`", "",
             "| direction | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for d in ("volume_to_report", "report_to_volume"):
        lines.append(f"| {d.replace('_', ' ')} | " + " | ".join(f"{rep[d][f'R@{k}']:.3f}" for k in ks) + " |")
    lines.append("| chance | " + " | ".join(f"{result['chance'][f'R@{k}']:.3f}" for k in ks) + " |")
    if labels and not result["volume_to_volume_queries"]:
        lines += ["", f"No volume shares a positive label ({', '.join(labels)}) with another: no volume -> volume MAP@k."]
    elif labels:
        lines += ["", f"## Volume -> volume MAP@k ({result['volume_to_volume_queries']} queries)", "",
                  f"Two volumes are relevant to each other when they share at least one positive label among "
                  f"{', '.join(labels)}; each volume with such a neighbour queries all the others. AP@k divides by "
                  f"min(k, relevant volumes); chance is the exact MAP@k of a random ranking.", "",
                  "| | " + " | ".join(f"MAP@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|",
                  "| volume to volume | " + " | ".join(f"{result['volume_to_volume'][f'MAP@{k}']:.3f}" for k in ks) + " |",
                  "| chance | " + " | ".join(f"{result['volume_to_volume_chance'][f'MAP@{k}']:.3f}" for k in ks) + " |"]
    else:
        lines += ["", "No binary label carried by every volume: no volume -> volume MAP@k."]
    (out / "retrieval.md").write_text("\n".join(lines) + "\n")
    return result


def shared_binary_labels(entries: list[dict[str, Any]]) -> list[str]:
    """The class labels every entry carries with a 0/1 value, sorted (the labels of volume -> volume MAP@k)."""
    if not entries:
        return []
    names = set.intersection(*(set(e.get("classes", {})) for e in entries))
    return sorted(n for n in names if all(float(e["classes"][n]) in (0.0, 1.0) for e in entries))


__all__ = ["embed_items", "embed_prompts", "embed_texts", "embed_volume", "evaluation_cache", "finding_classification",
           "load_prompts", "organ_chunks", "organ_classification", "parse_operating_point", "prompt_organs", "run_retrieval",
           "run_zero_shot", "shared_binary_labels", "write_predictions"]
