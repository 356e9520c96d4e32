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
evaluation never drifts from training. This module wires checkpoints (through the model hub), caches and
output files; the evaluation itself is ``voxseq.eval.zero_shot`` and ``voxseq.eval.retrieval``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from voxseq import VoxseqError
from voxseq.config import from_dict, to_dict
from voxseq.data.cache import Cache, prepare_cache
from voxseq.eval.retrieval import retrieval_markdown, retrieval_results
from voxseq.eval.zero_shot import (  # noqa: F401 - the evaluation pieces, importable from here as before
    ORGAN_TEMPLATE,
    PREDICTIONS_CSV,
    PROMPT_TEMPLATE,
    TRUTH_COLUMN,
    abnormality_scores,
    embed_items,
    embed_prompts,
    embed_texts,
    embed_volume,
    finding_classification,
    load_prompts,
    organ_classification,
    pair_temperature,
    parse_operating_point,
    plot_roc,
    prompt_organs,
    shared_binary_labels,
    write_predictions,
    zero_shot_markdown,
)
from voxseq.models.vlp import load_tokenizer
from voxseq.sequence.chunks import ChunkConfig, ChunkTextDataset
from voxseq.tasks.pretrain_vlp import vlp_from_checkpoint

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


def _progress(items, description: str):
    from rich.progress import track

    return track(items, description=description, transient=True)


# ---------------------------------------------------------------------------- zero-shot


def organ_chunks(cache: Cache, meta: dict[str, Any], n_chunks: int, seed: int = 12345,
                 slices: int | None = None) -> list[dict[str, Any]]:
    """``n_chunks`` chunks drawn as the checkpoint's training drew them (its chunk sizes, crops and organ
    centring; every shown organ listed), keeping those paired through organ masks; [] without masks.

    Organ windows are placed without looking at the lesions (``lesion_centred`` off): whether one holds a
    lesion is then chance, and its place says nothing about the finding. An organ with lesions counts as
    shown only by windows that hold one (``lesion_fraction``), as in training. Every checkpoint is tested on
    the same placement (the default ``organ_jitter``), whatever jitter it trained with. ``slices``: every chunk
    this thick instead (a multiple of the patch; thicker than training shows the model longer inputs than it saw)."""
    thickness = {"min_slices": slices, "max_slices": slices} if slices else {}
    cfg = from_dict(ChunkConfig, {**meta["config"]["chunks"], "text_mode": "all", "max_sentences": 64, "seed": seed,
                                  "focus_fraction": 0.0, "lesion_centred": False,
                                  "organ_jitter": ChunkConfig.organ_jitter, **thickness})
    try:
        ds = ChunkTextDataset(cache, cfg)
    except VoxseqError:
        return []
    items = [ds[i] for i in _progress(range(n_chunks), "zero-shot: drawing organ chunks")]
    return [it for it in items if it["organs"]]  # not the report fallback


def volume_tiles(model, cache: Cache, rows: list[int], meta: dict[str, Any], slices: int | None = None
                 ) -> tuple[list[np.ndarray], list[list[list[str]]] | None, list[np.ndarray]]:
    """Each volume as tiles of the checkpoint's training chunk (its thickness, or ``slices``; its in-plane
    crop), overlapping by half along every axis: their (n_tiles, D) embeddings per volume, and the organs each
    tile shows by the organ masks (the training rule: ``chunks.organ_fraction`` / ``chunk_fraction``), or None
    when some volume has no masks, and each volume's (n_tiles, 6) tile boxes (z0, y0, x0, z1, y1, x1) in the
    cache's voxels (a padded tile may start before 0 or end past the volume)."""
    from voxseq.sequence.chunks import label_counts, organ_masks, volume_chunks, window_organs

    ccfg = from_dict(ChunkConfig, meta["config"]["chunks"])
    p, thick = model.cfg.vision.patch_size, slices or ccfg.max_slices
    emb, organs, boxes = [], [], []
    for i in _progress(rows, "zero-shot: embedding volume tiles"):
        image = cache.image(i)
        tiles = volume_chunks(image, p, thick, _pad_value(meta), ccfg.crop_yx, z_overlap=True)
        emb.append(embed_items(model, tiles))
        box = np.array([[t["z0"], t["y0"], t["x0"], t["z1"], t["y0"] + t["grid"][1] * p, t["x0"] + t["grid"][2] * p]
                        for t in tiles], dtype=np.int32).reshape(-1, 6)
        boxes.append(box)
        masks, mapping = organ_masks(cache, i)
        if masks is None or organs is None:
            organs = None
            continue
        counts = label_counts(masks, len(cache.entry(i).get("regions", [])))
        organs.append([window_organs(masks, counts, mapping, b[:3], [e - s for s, e in zip(b[:3], b[3:])],
                                     ccfg.organ_fraction, ccfg.chunk_fraction) for b in box.tolist()])
    return emb, organs, boxes


def prompt_tile_organs(model, tokenizer, tile_emb: list[np.ndarray], organs: list[str], max_len: int,
                       template: str = ORGAN_TEMPLATE) -> list[list[list[str]]] | None:
    """The organs each tile of each volume shows by the model's own organ prompts (None for fewer than 2 organs)."""
    from voxseq.eval.zero_shot import prompt_localised_organs

    if len(organs) < 2:
        return None
    organ_emb = embed_texts(model, tokenizer, [template.format(o) for o in organs], max_len)
    return [prompt_localised_organs(e, organ_emb, organs) for e in tile_emb]


def pick_localisation(localise: str, by_masks, by_prompts, source) -> tuple[str, list[list[list[str]]] | None]:
    """(the localisation used, the organs of every tile by it): ``auto`` is masks when every volume has them."""
    used = localise if localise != "auto" else ("masks" if by_masks is not None else "prompts")
    if used == "masks" and by_masks is None:
        raise VoxseqError(f"{source}: --localise masks needs organ masks for every volume; use prompts")
    return used, {"masks": by_masks, "prompts": by_prompts, "none": None}[used]


TILES_NPZ = "zero_shot_tiles.npz"  # every tile's P(present) per label (--aggregate organ), to pool again offline


def save_tile_scores(path: Path, ids: list[str], names: list[str], tile_p: list[np.ndarray],
                     tile_organs: list[list[list[str]]] | None, organs: list[str], boxes: list[np.ndarray]) -> Path:
    """Every tile's P(present) per label in one npz: ``p`` (T, K), ``volume`` (T,) row of ``ids``, ``labels``,
    ``ids``, with tile boxes ``box_zyx`` (T, 6): z0, y0, x0, z1, y1, x1 in the prepared volume's voxels (where
    in a scan a label scores high), and with organ masks ``organs`` and ``shows`` (T, O) whether each tile
    shows each organ."""
    arrays: dict[str, Any] = {"p": np.concatenate(tile_p).astype(np.float32), "labels": np.array(names),
                              "ids": np.array(ids), "volume": np.repeat(np.arange(len(tile_p)), [len(t) for t in tile_p]),
                              "box_zyx": np.concatenate(boxes).astype(np.int32)}
    if tile_organs is not None and organs:
        arrays["organs"] = np.array(organs)
        arrays["shows"] = np.array([[o in shown for o in organs] for v in tile_organs for shown in v], dtype=bool)
    np.savez_compressed(path, **arrays)
    return path


def aggregation_comparison(tile_p: list[np.ndarray], mask_organs, prompt_organs_, label_organs: list[str | None],
                           truth: np.ndarray, names: list[str], k: int) -> dict[str, Any]:
    """Mean and per-label AUROC of every localisation x pool from the same tile probabilities."""
    from voxseq.eval.metrics import multilabel_report
    from voxseq.eval.zero_shot import POOLS, localised_scores

    out: dict[str, Any] = {}
    for loc, organs in (("masks", mask_organs), ("prompts", prompt_organs_), ("none", None)):
        if loc != "none" and organs is None:
            continue
        out[loc] = {}
        for pool in POOLS:
            r = multilabel_report(truth, localised_scores(tile_p, organs, label_organs, pool, k), names)
            out[loc][pool] = {"mean_auc": r["mean_auc"], "auc": {n: m.get("auc") for n, m in r["per_label"].items()}}
    return out


def run_zero_shot(checkpoint: str | Path, source: str | Path, out: str | Path, *, prompts: str | Path | None = None,
                  labels: list[str] | None = None, aggregate: str = "volume", chunk_slices: int | None = None,
                  pool: str = "topk", top_k: int = 3, localise: str = "auto",
                  split: str | None = None, organ_chunks_n: int = 200, organ_chunk_slices: int | None = None,
                  organ_template: str = ORGAN_TEMPLATE, nonfinite: str = "error",
                  operating_point: str | float | None = "youden", bootstrap: int = 1000,
                  bootstrap_seed: int = 0) -> dict[str, Any]:
    """Zero-shot abnormality (and organ) classification; writes zero_shot.json, zero_shot.md, roc.png and
    zero_shot_predictions.csv.

    ``aggregate``: ``volume`` (one embedding of the whole volume), ``chunks`` (the highest score over z-chunks
    of ``chunk_slices``, default 32, and in-plane tiles of the training crop) or ``organ``: tiles of the training
    chunk overlapping by half, and each label scored by ``pool`` (``top_k``) over the tiles that show its organ
    (the prompts file's third item), found by the organ masks or, without masks, by the organ prompts
    (``localise`` auto / masks / prompts / none); every localisation x pool is also reported
    (``aggregation.comparison``) from the same tiles.
    ``operating_point``: youden, corner or a fixed threshold on P(present), for the abnormality and
    finding-in-organ metrics (organ classification scores similarities and keeps Youden's J). ``bootstrap``:
    resamples of the volumes for the 95% intervals (0: none), drawn from ``bootstrap_seed``."""
    from voxseq.eval.metrics import multilabel_report, pair_softmax_scores
    from voxseq.eval.zero_shot import LOCALISERS, POOLS, localised_scores

    if aggregate not in ("volume", "chunks", "organ"):
        raise VoxseqError(f"aggregate must be volume, chunks or organ, not {aggregate!r}")
    if pool not in POOLS:
        raise VoxseqError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
    if localise not in ("auto", *LOCALISERS):
        raise VoxseqError(f"localise must be auto, {', '.join(LOCALISERS)}, not {localise!r}")
    if top_k < 1:
        raise VoxseqError(f"top-k must be at least 1, not {top_k}")
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
    temperature = pair_temperature(model)
    pos = embed_prompts(model, tokenizer, [pairs[n][0] for n in names], max_len)
    neg = embed_prompts(model, tokenizer, [pairs[n][1] for n in names], max_len)
    truth = np.array([[entries[i]["classes"][n] for n in names] for i in rows], dtype=int)
    tile_yx = from_dict(ChunkConfig, meta["config"]["chunks"]).crop_yx if aggregate != "volume" else None
    aggregation = None
    organ_of = prompt_organs(prompts)  # label -> the organ its prompts name
    if aggregate == "organ":
        label_organs = [organ_of.get(n) for n in names]
        emb, mask_organs, boxes = volume_tiles(model, cache, rows, meta, chunk_slices)
        tile_p = [pair_softmax_scores(e, pos, neg, temperature) for e in emb]
        organ_names = sorted({o for o in label_organs if o})
        by_prompt = prompt_tile_organs(model, tokenizer, emb, organ_names, max_len, organ_template)
        used, chosen = pick_localisation(localise, mask_organs, by_prompt, source)
        scores = localised_scores(tile_p, chosen, label_organs, pool, top_k)
        save_tile_scores(out / TILES_NPZ, [str(entries[i]["id"]) for i in rows], names, tile_p, mask_organs, organ_names,
                         boxes)
        aggregation = {"localise": used, "pool": pool, "top_k": top_k, "label_organs": dict(zip(names, label_organs)),
                       "tiles_per_volume": [int(len(e)) for e in emb], "tiles": TILES_NPZ,
                       "comparison": aggregation_comparison(tile_p, mask_organs, by_prompt, label_organs, truth, names,
                                                            top_k)}
    else:
        emb = [embed_volume(model, cache.image(i), pad, None if aggregate == "volume" else chunk_slices or 32, tile_yx)
               for i in _progress(rows, "zero-shot: embedding volumes")]
        scores = abnormality_scores(emb, pos, neg, temperature)
    ids = [str(entries[i]["id"]) for i in rows]
    result = {"checkpoint": str(checkpoint), "source": str(source), "aggregate": aggregate, "tile_yx": tile_yx,
              **({"aggregation": aggregation} if aggregation else {}),
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
                                      {n: o for n, o in organ_of.items() if n in names}, max_len,
                                      rule, threshold, temperature)
    if findings is not None:
        result["finding_in_organ_chunks"] = findings
    (out / "zero_shot.json").write_text(json.dumps(result, indent=1))
    (out / "zero_shot.md").write_text(zero_shot_markdown(result))
    write_predictions(out / PREDICTIONS_CSV, ids, names, scores, truth)
    plot_roc(truth, scores, names, out / "roc.png")
    return result


# ---------------------------------------------------------------------------- retrieval


def report_sentences(entry: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(organ, sentence) pairs of a volume's report: its organ-wise sentences when the data has them
    (``sentences``), else the report text cut into sentences (no organ)."""
    import re

    if entry.get("sentences"):
        return [(organ, text) for organ, text in entry["sentences"].items() if text.strip()]
    return [(None, t.strip()) for t in re.split(r"(?<=[.!?])\s+", entry.get("text") or "") if t.strip()]


def run_retrieval(checkpoint: str | Path, source: str | Path, out: str | Path, *, split: str | None = None,
                  ks: tuple[int, ...] = (1, 5, 10, 50, 100), nonfinite: str = "error", aggregate: str = "volume",
                  top_k: int = 3, localise: str = "auto") -> dict[str, Any]:
    """Volume -> report and report -> volume recall@k, and volume -> volume MAP@k over the binary labels
    every volume carries (two volumes relevant when they share a positive one); writes retrieval.json and
    retrieval.md. ``aggregate``: ``volume`` (one embedding per whole volume and one per report) or ``organ``
    (tiles of the training chunk; each report sentence matched to the tiles showing its organ, by masks or
    organ prompts as ``localise`` says, top-``top_k`` cosine, averaged over the report; volume -> volume uses
    the mean tile embedding)."""
    from voxseq.eval.retrieval import sentence_tile_similarity

    if aggregate not in ("volume", "organ"):
        raise VoxseqError(f"aggregate must be volume or organ, not {aggregate!r}")
    if localise not in ("auto", "masks", "prompts", "none"):
        raise VoxseqError(f"localise must be auto, masks, prompts or none, not {localise!r}")
    out = Path(out)
    model, tokenizer, max_len, meta, cache = load_for_evaluation(checkpoint, source, out, split, nonfinite)
    rows = [i for i in range(len(cache)) if (cache.entry(i).get("text") or "").strip()]
    if len(rows) < 2:
        raise VoxseqError(f"{source}: retrieval needs at least two volumes with a report (text)")
    pad = _pad_value(meta)
    labels = shared_binary_labels([cache.entry(i) for i in rows])
    truth = np.array([[cache.entry(i)["classes"][n] for n in labels] for i in rows], dtype=int) if labels else None
    extra: dict[str, Any] = {}
    if aggregate == "organ":
        tiles, mask_organs, _ = volume_tiles(model, cache, rows, meta)
        reports = [report_sentences(cache.entry(i)) for i in rows]
        texts = sorted({t for r in reports for _, t in r})
        sent_emb = embed_texts(model, tokenizer, texts, max_len)
        at = {t: j for j, t in enumerate(texts)}
        organs = sorted({o for r in reports for o, _ in r if o})
        by_prompt = prompt_tile_organs(model, tokenizer, tiles, organs, max_len) \
            if localise == "prompts" or (localise == "auto" and mask_organs is None) else None
        used, chosen = pick_localisation(localise, mask_organs, by_prompt, source)
        sim = sentence_tile_similarity(tiles, chosen, [[(o, at[t]) for o, t in r] for r in reports], sent_emb, top_k).T
        img = np.stack([e.mean(axis=0) for e in tiles])
        scores = retrieval_results(img, None, truth, labels, ks, sim=sim)
        extra = {"localise": used, "top_k": top_k, "tiles_per_volume": [int(len(e)) for e in tiles]}
    else:
        img = np.concatenate([embed_volume(model, cache.image(i), pad) for i in _progress(rows, "retrieval: embedding volumes")])
        txt = embed_texts(model, tokenizer, [cache.entry(i)["text"] for i in rows], max_len)
        scores = retrieval_results(img, txt, truth, labels, ks)
    by_volume = {k: v for k, v in scores.items() if k.startswith("volume_to_volume")}
    result = {"checkpoint": str(checkpoint), "source": str(source), "aggregate": aggregate, **extra,
              **{k: v for k, v in scores.items() if k not in by_volume},
              "ids": [str(cache.entry(i)["id"]) for i in rows], **by_volume}
    (out / "retrieval.json").write_text(json.dumps(result, indent=1))
    (out / "retrieval.md").write_text(retrieval_markdown(result, ks))
    return result


__all__ = ["aggregation_comparison", "pick_localisation", "prompt_tile_organs", "report_sentences", "save_tile_scores",
           "volume_tiles", "embed_items", "embed_prompts", "embed_texts", "embed_volume", "evaluation_cache", "finding_classification",
           "load_prompts", "organ_chunks", "organ_classification", "parse_operating_point", "prompt_organs", "run_retrieval",
           "run_zero_shot", "shared_binary_labels", "write_predictions"]
