"""`voxseq evaluate zero-shot` and `voxseq evaluate retrieval`: SigVLP checkpoints on a manifest.

* Zero-shot abnormality classification (CT-CLIP protocol): each volume against "<X> is present." and
  "<X> is not present." (or the prompt pairs of a YAML file), softmax over the pair, AUROC per label, ACC
  and weighted F1 at the ROC point closest to (0, 1). A volume is embedded whole, whatever its number of
  slices (``aggregate=volume``), or as z-chunks whose highest P(present) counts (``aggregate=chunks``; cut
  in-plane too, into half-overlapping tiles of the training crop, when the checkpoint trained on ``crop_yx``).
* Zero-shot organ classification of chunks: which organs a chunk shows, from organ-name prompts, scored
  against the organ masks (AUROC per organ and top-1 accuracy).
* Zero-shot findings in organ chunks ("lesion present in <organ>"): for labels whose prompts name their organ,
  the chunks that show that organ (drawn as in training, but placed without looking at the lesions), each
  scored with the label's prompt pair against the volume's label. A chunk shows an organ with a lesion box
  only when it holds the lesion (``chunks.lesion_fraction``), so a positive chunk has the finding in view.
* Retrieval: volume -> report and report -> volume recall@k.

The evaluation volumes are prepared with the checkpoint's own preprocessing (into ``OUT/cache``), so
evaluation never drifts from training.
"""

from __future__ import annotations

import json
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

PROMPT_TEMPLATE = ("{} is present.", "{} is not present.")
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


def _prompt_entries(path: str | Path) -> dict[str, dict[str, str]]:
    """label -> {"present", "absent"[, "organ"]} from a prompts YAML: ``label: [present, absent]``,
    ``label: [present, absent, organ]`` or ``label: {present: .., absent: .., organ: ..}``."""
    data = load_yaml(path)
    out: dict[str, dict[str, str]] = {}
    bad = []
    for k, v in (data or {}).items():
        if isinstance(v, list) and len(v) in (2, 3) and all(isinstance(t, str) for t in v):
            out[str(k)] = dict(zip(("present", "absent", "organ"), v))
        elif isinstance(v, dict) and {"present", "absent"} <= set(v) <= {"present", "absent", "organ"} \
                and all(isinstance(t, str) for t in v.values()):
            out[str(k)] = {key: str(t) for key, t in v.items()}
        else:
            bad.append(k)
    if bad or not out:
        raise VoxseqError(f"{path}: each label needs [present prompt, absent prompt] (optionally a third item, "
                          f"or an 'organ' key, naming the organ it is found in); check {', '.join(map(str, bad)) or 'the file'}")
    return out


def load_prompts(path: str | Path | None, labels: list[str]) -> dict[str, tuple[str, str]]:
    """label -> (present, absent) prompts: a YAML mapping of label -> [present, absent], else the CT-CLIP
    template for every label."""
    if path is None:
        return {lab: (PROMPT_TEMPLATE[0].format(lab.capitalize()), PROMPT_TEMPLATE[1].format(lab.capitalize()))
                for lab in labels}
    return {k: (v["present"], v["absent"]) for k, v in _prompt_entries(path).items()}


def prompt_organs(path: str | Path | None) -> dict[str, str]:
    """label -> the organ (sentence name) it is found in, for the labels of a prompts YAML that name one."""
    return {k: v["organ"] for k, v in _prompt_entries(path).items() if "organ" in v} if path else {}


def abnormality_scores(vol_chunks: list[np.ndarray], pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """(N, K) P(present) per volume: the pair softmax of each embedding, highest over a volume's chunks."""
    from voxseq.eval.metrics import pair_softmax_scores

    return np.stack([pair_softmax_scores(e, pos, neg).max(axis=0) for e in vol_chunks])


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
                           entries: list[dict[str, Any]], pairs: dict[str, tuple[str, str]],
                           organs: dict[str, str], max_len: int) -> dict[str, Any] | None:
    """Zero-shot "<finding> present in <organ>" on chunks: for each label with an organ, the chunks showing
    that organ, P(present) from the label's prompt pair against the chunk's volume label (AUROC, ACC,
    weighted F1 per label, as for volumes)."""
    from voxseq.eval.metrics import binary_report, pair_softmax_scores, summarise_labels

    per_label: dict[str, Any] = {}
    for name, organ in organs.items():
        rows = [i for i, it in enumerate(items) if organ in it["organs"]
                and name in entries[it["volume_index"]].get("classes", {})]
        if not rows:
            continue
        pos, neg = embed_texts(model, tokenizer, list(pairs[name]), max_len)
        truth = np.array([int(entries[items[i]["volume_index"]]["classes"][name]) for i in rows])
        scores = pair_softmax_scores(img[rows], pos[None], neg[None])[:, 0]
        per_label[name] = {"organ": organ, "volumes": len({items[i]["volume_index"] for i in rows}),
                           **binary_report(truth, scores)}
    return {"n_chunks": len(items), **summarise_labels(per_label)} if per_label else None


def run_zero_shot(checkpoint: str | Path, source: str | Path, out: str | Path, *, prompts: str | Path | None = None,
                  labels: list[str] | None = None, aggregate: str = "volume", chunk_slices: int = 32,
                  split: str | None = None, organ_chunks_n: int = 200, organ_chunk_slices: int | None = None,
                  organ_template: str = ORGAN_TEMPLATE, nonfinite: str = "error") -> dict[str, Any]:
    """Zero-shot abnormality (and organ) classification; writes zero_shot.json, zero_shot.md, roc.png."""
    from voxseq.eval.metrics import multilabel_report

    if aggregate not in ("volume", "chunks"):
        raise VoxseqError(f"aggregate must be volume or chunks, not {aggregate!r}")
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
    pos = embed_texts(model, tokenizer, [pairs[n][0] for n in names], max_len)
    neg = embed_texts(model, tokenizer, [pairs[n][1] for n in names], max_len)
    scores = abnormality_scores(emb, pos, neg)
    truth = np.array([[entries[i]["classes"][n] for n in names] for i in rows], dtype=int)
    result = {"checkpoint": str(checkpoint), "source": str(source), "aggregate": aggregate, "tile_yx": tile_yx,
              "organ_chunk_slices": organ_chunk_slices,
              "n_volumes": len(rows), "slices": [int(cache.image(i).shape[1]) for i in rows],
              "prompts": {n: list(pairs[n]) for n in names}, **multilabel_report(truth, scores, names)}
    items = organ_chunks(cache, meta, organ_chunks_n, slices=organ_chunk_slices)
    img = embed_items(model, items)
    organ = organ_classification(model, tokenizer, items, img, organ_template, max_len)
    if organ is not None:
        result["organ_classification"] = organ
    findings = finding_classification(model, tokenizer, items, img, entries, pairs,
                                      {n: o for n, o in prompt_organs(prompts).items() if n in names}, max_len)
    if findings is not None:
        result["finding_in_organ_chunks"] = findings
    (out / "zero_shot.json").write_text(json.dumps(result, indent=1))
    (out / "zero_shot.md").write_text(zero_shot_markdown(result))
    plot_roc(truth, scores, names, out / "roc.png")
    return result


def zero_shot_markdown(r: dict[str, Any]) -> str:
    s = r["slices"]
    lines = [f"# Zero-shot abnormality classification ({r['n_volumes']} volumes, {min(s)}-{max(s)} slices, "
             f"aggregate: {r['aggregate']})", "", f"checkpoint: `{r['checkpoint']}`", "",
             "| label | positives | AUROC | ACC | weighted F1 | prompts (present / absent) |", "|---|---|---|---|---|---|"]
    for name, m in r["per_label"].items():
        lines.append(f"| {name} | {m['positives']}/{m['n']} | {m['auc']:.3f} | {m['acc']:.3f} | {m['weighted_f1']:.3f} | "
                     f"{r['prompts'][name][0]} / {r['prompts'][name][1]} |")
    lines += ["", f"mean AUROC **{r['mean_auc']:.3f}**, ACC {r['mean_acc']:.3f}, weighted F1 {r['mean_weighted_f1']:.3f}"]
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
                  "", "| label | organ | positive chunks | volumes | AUROC | ACC | weighted F1 |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {m['organ']} | {m['positives']}/{m['n']} | {m['volumes']} | {m['auc']:.3f} | {m['acc']:.3f} | "
                  f"{m['weighted_f1']:.3f} |" for name, m in f["per_label"].items()]
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
    """Volume -> report and report -> volume recall@k; writes retrieval.json and retrieval.md."""
    from voxseq.eval.metrics import retrieval_report

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
              "chance": {f"R@{k}": min(k, len(rows)) / len(rows) for k in ks}}
    (out / "retrieval.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Retrieval ({len(rows)} volumes and their reports)", "", f"checkpoint: `{checkpoint}`", "",
             "| direction | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for d in ("volume_to_report", "report_to_volume"):
        lines.append(f"| {d.replace('_', ' ')} | " + " | ".join(f"{rep[d][f'R@{k}']:.3f}" for k in ks) + " |")
    lines.append("| chance | " + " | ".join(f"{result['chance'][f'R@{k}']:.3f}" for k in ks) + " |")
    (out / "retrieval.md").write_text("\n".join(lines) + "\n")
    return result


__all__ = ["embed_items", "embed_texts", "embed_volume", "evaluation_cache", "finding_classification", "load_prompts",
           "organ_chunks", "organ_classification", "prompt_organs", "run_retrieval", "run_zero_shot"]
