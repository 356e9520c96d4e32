"""`voxseq demo`: the system end to end on a CPU, on synthetic phantoms and the bundled real samples.

Steps (each reused on a re-run when it finished and the steps it builds on were reused; ``--fresh``
redoes them all):
  1. data       - phantoms v2 (CT torsos + 4-contrast brain MRIs) and the real samples -> one cache
  2. sequences  - a figure of spatial, contrast and semantic sequences cut from the cache
  3. AR         - AR-SSL4M pretraining of the tiny ViT (configs/ar_tiny.yaml)
  4. seg        - UNETR fine-tuning on the CT phantoms' organs at 10% of the labels over seeds, encoder from
                  the AR run versus from scratch paired by seed (configs/seg_phantom_v2.yaml), an overlay figure,
                  and the per-token organ probe of the AR encoder against a random one
  5. VLP        - SigVLP pretraining on CT phantoms of SigVLP's proxy (version 1, configs/vlp_tiny.yaml
                  preprocessing)
  6. zero-shot  - abnormality and organ classification (configs/prompts_phantom.yaml) and volume <-> report
                  retrieval on held-out phantoms of another seed
  7. report     - report.md, a self-contained report.html and metrics.json in the demo folder
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from voxseq.data.cache import Cache
from voxseq.data.preprocess import Preprocess
from voxseq.tasks.data import PhantomConfig, ensure_cache, repo_path
from voxseq.train.metrics import loss_summary

AR_CONFIG = "configs/ar_tiny.yaml"
SEG_CONFIG = "configs/seg_phantom_v2.yaml"
VLP_CONFIG = "configs/vlp_tiny.yaml"
PROMPTS = "configs/prompts_phantom.yaml"
RETRIEVAL_KS = (1, 5, 10)
PHANTOM_VERSION = 2  # AR-SSL4M's CPU proxy (docs/reproducing.md): organs told apart by texture, shape and place
VLP_PHANTOM_VERSION = 1  # SigVLP's proxy: findings and organs as its docs measure them


def _say(msg: str) -> None:
    from rich.console import Console

    Console(highlight=False, soft_wrap=True).print(f"[bold cyan]demo[/] {msg}")


def demo_settings(quick: bool) -> dict[str, Any]:
    """Sizes of the demo. Per-step costs measured with --quick on 2 busy cores (AR about 1 s per step of
    2 x 512 tokens, UNETR about 1.5 s per step of 2 x 32^3 crops, SigVLP about 3 s per step of 8 chunks)
    put the full demo near 15 minutes on 2 idle cores and --quick near 4; zero-shot and retrieval only
    embed, and the data steps take seconds."""
    if quick:
        return {"n_ct": 6, "n_mri": 2, "size_xy": 96, "max_slices": 96, "ar_steps": 40, "batch_size": 2,
                "seg_ratios": (0.1,), "seg_seeds": (0, 1), "seg_steps": 30, "seg_roi": 32, "seg_overlap": 0.0,
                "probe_tokens": 4000,
                "vlp_steps": 50, "vlp_chunks": 8, "vlp_max_slices": 32, "n_heldout": 8}
    return {"n_ct": 16, "n_mri": 4, "size_xy": 128, "max_slices": 160, "ar_steps": 200, "batch_size": 4,
            "seg_ratios": (0.1,), "seg_seeds": (0, 1, 2), "seg_steps": 60, "seg_roi": 32, "seg_overlap": 0.25,
            "probe_tokens": 20000,
            "vlp_steps": 60, "vlp_chunks": 8, "vlp_max_slices": 64, "n_heldout": 16}


def _finished(run: Path, steps: int) -> bool:
    """A training run whose newest checkpoint is at (or past) ``steps``."""
    from voxseq.train.checkpoint import latest_checkpoint

    ck = latest_checkpoint(run) if run.exists() else None
    return ck is not None and json.loads(ck.read_text())["step"] >= steps


def _drop_stale(folder: Path, upstream_reused: bool) -> None:
    """Results made from an earlier upstream step are stale once that step ran again."""
    if not upstream_reused and folder.exists():
        shutil.rmtree(folder)


def _clean(x: Any) -> Any:
    """NaN (an AUROC of a label with one class only) as null, so that metrics.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# ---------------------------------------------------------------------------- 1-3: data, sequences, AR


def phantom_folder(out: Path, s: dict[str, Any]) -> Path:
    """Where step 1 writes its phantoms (the folder name ``ensure_cache`` gives them)."""
    return out / f"phantoms_ct{s['n_ct']}_mri{s['n_mri']}_seed0_{s['size_xy']}_v{PHANTOM_VERSION}"


def step_data(out: Path, s: dict[str, Any]) -> dict[str, Any]:
    from voxseq.config import from_dict, load_yaml
    from voxseq.tasks.data import DataConfig

    base = load_yaml(repo_path(AR_CONFIG))
    pre = from_dict(Preprocess, base["data"]["preprocess"])
    data = DataConfig(cache=str(out / "cache"), samples=True, preprocess=pre,
                      phantoms=PhantomConfig(n_ct=s["n_ct"], n_mri=s["n_mri"], size_xy=s["size_xy"], max_slices=s["max_slices"],
                                             version=PHANTOM_VERSION))
    reused = (out / "cache" / "index.jsonl").is_file()
    t = time.perf_counter()
    ensure_cache(data, out)
    cache = Cache(out / "cache")
    return {"volumes": len(cache), "seconds": time.perf_counter() - t, "ids": cache.ids, "reused": reused}


def ct_manifest(phantoms: Path) -> Path:
    """The CT phantoms of step 1 alone: segmentation and SigVLP reuse them (the MRIs carry other labels
    and no CT window applies to them)."""
    from voxseq.data.manifest import read_manifest, write_manifest

    path = phantoms / "ct_manifest.jsonl"
    if not path.is_file():
        records = [r for r in read_manifest(phantoms / "manifest.jsonl", resolve=False) if r.extra.get("kind") == "ct"]
        write_manifest(records, path)
    return path


def plot_sequences(cache: Cache, seq_cfg, path: Path) -> Path:
    """One row per sequence kind: the middle slice of each sub-volume, in sequence order."""
    from dataclasses import replace

    from voxseq.sequence import KINDS, AugmentConfig, SequenceDataset, unpatchify
    from voxseq.train.plots import _plt, save_figure

    plt = _plt()
    kinds = [k for k, w in seq_cfg.kind_weights.items() if w > 0]
    fig, axes = plt.subplots(len(kinds), seq_cfg.n_subvolumes, figsize=(2.4 * seq_cfg.n_subvolumes, 2.5 * len(kinds)),
                             dpi=110, squeeze=False)
    for row, kind in enumerate(kinds):
        cfg = replace(seq_cfg, kind_weights={kind: 1.0}, augment=AugmentConfig(intensity_prob=0.0))
        ds = SequenceDataset(cache, cfg)
        item = max((ds[i] for i in range(8)), key=lambda it: float(it["tokens"].std()))  # the most telling of a few
        k = cfg.tokens_per_subvolume
        n = item["tokens"].shape[0] // k
        subs = unpatchify(item["tokens"].reshape(n, k, -1), cfg.patch_size, cfg.grid)[:, 0]
        name = cache.entry(item["volume_index"])["id"]
        for i in range(n):
            ax = axes[row, i]
            ax.imshow(subs[i, subs.shape[1] // 2], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{KINDS[item['kind']]} {i}" + (f"\n{name}" if i == 0 else ""), fontsize=8)
            ax.axis("off")
    fig.suptitle("Token sequences cut from the cache (middle slice of each sub-volume)")
    fig.tight_layout()
    return save_figure(fig, path)


def step_sequences(out: Path, cache: Cache) -> dict[str, Any]:
    from voxseq.tasks.pretrain_ar import load_ar_config

    t = time.perf_counter()
    png = plot_sequences(cache, load_ar_config(repo_path(AR_CONFIG)).sequence, out / "plots" / "sequences.png")
    return {"figure": str(png), "seconds": time.perf_counter() - t, "reused": False}


def step_pretrain(out: Path, s: dict[str, Any], upstream_reused: bool) -> dict[str, Any]:
    from voxseq.tasks.pretrain_ar import load_ar_config, run_pretrain_ar
    from voxseq.train.metrics import read_metrics

    run = out / "ar_pretrain"
    _drop_stale(run, upstream_reused)
    overrides = [f"max_steps={s['ar_steps']}", f"batch_size={s['batch_size']}", f"data.cache={out / 'cache'}",
                 "data.samples=false", "data.phantoms.n_ct=0", "data.phantoms.n_mri=0",
                 f"checkpoint_every={max(10, s['ar_steps'] // 3)}", f"warmup_steps={max(5, s['ar_steps'] // 10)}"]
    cfg = load_ar_config(repo_path(AR_CONFIG), overrides)
    done = _finished(run, s["ar_steps"])
    t = time.perf_counter()
    if not done:
        run_pretrain_ar(cfg, run, resume=run.exists())
    rows = read_metrics(run)
    tail = rows[-max(1, len(rows) // 10):]
    return {**loss_summary(rows), "tokens_per_s": sum(r["tokens_per_s"] for r in tail) / len(tail),
            "seconds": time.perf_counter() - t, "reused": done, "run": str(run),
            "command": f"voxseq pretrain ar --config {AR_CONFIG} --out AR " + " ".join(overrides)}


# ---------------------------------------------------------------------------- 4: segmentation


def seg_overrides(out: Path, s: dict[str, Any]) -> list[str]:
    """configs/seg_phantom_v2.yaml sized for the demo, on the CT phantoms of step 1."""
    roi = s["seg_roi"]
    return [f"data.source={ct_manifest(phantom_folder(out, s))}", "data.phantoms.n_ct=0", "data.workers=2",
            f"max_steps={s['seg_steps']}", f"warmup_steps={max(5, s['seg_steps'] // 10)}",
            f"checkpoint_every={s['seg_steps']}", f"roi_zyx=[{roi},{roi},{roi}]", f"overlap={s['seg_overlap']}",
            "eval_splits=[val,test]"]


def step_segmentation(out: Path, s: dict[str, Any], ar_run: Path, upstream_reused: bool) -> dict[str, Any]:
    """Pretrained (encoder from the AR run) versus scratch, same UNETR, data, preprocessing and steps, over
    seeds (which labelled volumes, which crops) and paired by seed; run_label_efficiency keeps the table in
    results.json and resumes it on a re-run."""
    from voxseq.tasks.experiments import run_label_efficiency

    folder = out / "seg"
    _drop_stale(folder, upstream_reused)
    ratios, seeds = s["seg_ratios"], s["seg_seeds"]
    wanted = {(arm, r, seed) for arm in ("scratch", "pretrained") for r in ratios for seed in seeds}
    done_path = folder / "results.json"
    done = done_path.is_file() and wanted <= {(r["arm"], r["ratio"], r["seed"]) for r in json.loads(done_path.read_text())["runs"]}
    overrides = seg_overrides(out, s)
    t = time.perf_counter()
    result = run_label_efficiency(repo_path(SEG_CONFIG), ar_run, folder, ratios=ratios, seeds=seeds, overrides=overrides)
    seconds = time.perf_counter() - t
    low = min(ratios)
    runs = [r for r in result["runs"] if (r["arm"], r["ratio"], r["seed"]) in wanted]
    stats = {(r["arm"], r["ratio"]): r for r in result["summary"]}
    paired = next(p for p in result["paired"] if p["ratio"] == low)
    first = {(r["arm"], r["ratio"]): r for r in runs if r["seed"] == seeds[0]}
    figure = folder / "overlays.png"
    if not (done and figure.is_file()):
        plot_seg_overlays(folder, low, figure)
    return {"ratio": low, "ratios": list(ratios), "seeds": list(seeds), "steps": s["seg_steps"],
            "dice": {arm: stats[(arm, low)]["mean"] for arm in ("scratch", "pretrained")},
            "dice_sd": {arm: stats[(arm, low)]["std"] for arm in ("scratch", "pretrained")},
            "dice_per_class": {arm: first[(arm, low)]["dice_per_class"] for arm in ("scratch", "pretrained")},
            "paired": paired, "verdict": seg_verdict(paired),
            "table": [{"ratio": r, "n_train": first[("scratch", r)]["n_train"],
                       **{arm: stats[(arm, r)]["mean"] for arm in ("scratch", "pretrained")},
                       **{f"{arm}_sd": stats[(arm, r)]["std"] for arm in ("scratch", "pretrained")}} for r in ratios],
            "train_seconds": sum(r["seconds"] for r in runs),
            "steps_per_s": len(runs) * s["seg_steps"] / max(1e-9, sum(r["seconds"] for r in runs)),
            "seconds": seconds, "reused": done, "figure": str(figure), "plot": str(folder / "label_efficiency.png"),
            "command": f"voxseq experiment label-efficiency --config {SEG_CONFIG} --init {ar_run} --out SEG "
                       f"--ratios {','.join(f'{r:g}' for r in ratios)} --seeds {','.join(map(str, seeds))} "
                       + " ".join(overrides)}


def seg_verdict(paired: dict[str, Any]) -> str:
    """One line on pretrained minus scratch: ahead or behind by more than 2 sd of the paired differences,
    or within noise (and why that is expected at the demo's budget)."""
    m, sd, n = paired["mean"], paired["std"], len(paired["seeds"])
    if n >= 2 and abs(m) > 2 * sd and abs(m) >= 0.005:  # and a difference worth a word
        return f"pretrained {'ahead of' if m > 0 else 'behind'} scratch by {m:+.3f} Dice, more than 2 sd ({sd:.3f}) of {n} paired seeds"
    return (f"pretrained and scratch within noise ({m:+.3f} +- {sd:.3f} Dice over {n} paired seeds): the demo's "
            "pretraining and fine-tuning are minutes long; docs/reproducing.md has the comparison at a longer budget")


def step_probe(out: Path, s: dict[str, Any], ar_run: Path, upstream_reused: bool) -> dict[str, Any]:
    """Per-token linear probe of every phantom organ: the AR encoder against a random one of its
    architecture, on the segmentation step's volumes (training phantoms fit, validation and test scored)."""
    from voxseq.tasks.experiments import run_token_probe

    folder = out / "probe"
    _drop_stale(folder, upstream_reused)
    done = (folder / "token_probe.json").is_file()
    t = time.perf_counter()
    overrides = [*seg_overrides(out, s), f"data.cache={out / 'seg' / 'cache'}", "data.label_map={}"]
    r = json.loads((folder / "token_probe.json").read_text()) if done else \
        run_token_probe(repo_path(SEG_CONFIG), ar_run, folder, overrides, max_tokens=s["probe_tokens"])
    return {"layer": r["layer"], "pretrained": r["pretrained"]["balanced_accuracy"],
            "random": r["random"]["balanced_accuracy"], "test_tokens": r["pretrained"]["test_tokens"],
            "seconds": time.perf_counter() - t, "reused": done, "plot": str(folder / "probe_layers.png"),
            "command": f"voxseq experiment linear-probe --config {SEG_CONFIG} --init {ar_run} --out PROBE "
                       + " ".join(overrides)}


def plot_seg_overlays(folder: Path, ratio: float, path: Path) -> Path:
    """Three axial slices of the first validation volume: image, ground truth, each arm's prediction."""
    from voxseq.data.phantoms import ORGANS
    from voxseq.tasks.finetune_seg import dice_per_class, load_seg_model, sliding_predict
    from voxseq.train.plots import plot_label_overlays

    maps, val_id, cache, label_map = {}, None, None, {}
    for arm in ("scratch", "pretrained"):
        model, _, meta = load_seg_model(folder / f"{arm}_r{ratio}_s0")
        if cache is None:  # the classes the runs were trained on (a label_map merges organs)
            label_map = {int(k): int(v) for k, v in meta["config"]["data"].get("label_map", {}).items()}
            cache = Cache(folder / "cache", label_map=label_map or None)
        val_id = meta["val_ids"][0]
        i = cache.ids.index(val_id)
        pred = sliding_predict(model, np.asarray(cache.image(i)), meta["config"]["roi_zyx"], meta["config"]["overlap"])
        dice = np.nanmean(dice_per_class(pred, cache.label(i), meta["unetr"]["out_channels"]))
        maps[f"{arm} (Dice {dice:.2f})"] = pred
    i = cache.ids.index(val_id)
    label = np.asarray(cache.label(i))
    organ_z = np.flatnonzero((label > 1).any(axis=(1, 2)))  # slices that show an organ, not only the body
    slices = [int(organ_z[int(q * (len(organ_z) - 1))]) for q in (0.2, 0.5, 0.8)]
    maps = {"ground truth": label, **maps}
    names = {v: k for k, v in ORGANS.items()} if not label_map else \
        {c: "/".join(k for k, v in ORGANS.items() if label_map.get(v) == c) for c in sorted(set(label_map.values()))}
    return plot_label_overlays(np.asarray(cache.image(i), dtype=np.float32)[0], maps, {0: "background", **names},
                               slices, path,
                               title=f"UNETR on {val_id} (validation), trained on {ratio:g} of the labels")


# ---------------------------------------------------------------------------- 5-6: SigVLP, zero-shot, retrieval


def step_vlp(out: Path, s: dict[str, Any], upstream_reused: bool) -> dict[str, Any]:
    """SigVLP on CT phantoms of its own proxy (version 1, the seed of step 1), prepared into its own cache with
    the vlp config's preprocessing."""
    from voxseq.tasks.pretrain_vlp import load_vlp_config, run_pretrain_vlp
    from voxseq.train.metrics import read_metrics

    run = out / "vlp_pretrain"
    _drop_stale(run, upstream_reused)
    steps = s["vlp_steps"]
    overrides = [f"data.source={vlp_manifest(out, s)}", "data.phantoms.n_ct=0", f"max_steps={steps}",
                 f"chunks_per_batch={s['vlp_chunks']}", f"chunks.max_slices={s['vlp_max_slices']}", f"warmup_steps={max(3, steps // 10)}",
                 f"checkpoint_every={max(10, steps // 2)}"]
    cfg = load_vlp_config(repo_path(VLP_CONFIG), overrides)
    done = _finished(run, steps)
    t = time.perf_counter()
    if not done:
        run_pretrain_vlp(cfg, run, resume=run.exists())
    rows = read_metrics(run)
    return {**loss_summary(rows), "train_seconds": sum(r["step_time_s"] for r in rows),
            "chunks_per_s": sum(r["chunks_per_s"] for r in rows) / len(rows),
            "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
            "seconds": time.perf_counter() - t, "reused": done, "run": str(run),
            "command": f"voxseq pretrain vlp --config {VLP_CONFIG} --out VLP " + " ".join(overrides)}


def vlp_manifest(out: Path, s: dict[str, Any]) -> Path:
    """CT phantoms of SigVLP's own proxy (version 1), as many as step 1 wrote, from the same seed."""
    from voxseq.data.phantoms import write_phantoms

    folder = out / f"phantoms_vlp_ct{s['n_ct']}_{s['size_xy']}_v{VLP_PHANTOM_VERSION}"
    if (folder / "manifest.jsonl").is_file():
        return folder / "manifest.jsonl"
    return write_phantoms(folder, n_ct=s["n_ct"], n_mri=0, seed=0, size_xy=s["size_xy"], max_slices=s["max_slices"],
                          progress=False, version=VLP_PHANTOM_VERSION)


def heldout_manifest(out: Path, s: dict[str, Any]) -> Path:
    """CT phantoms of another seed than every training volume: what zero-shot and retrieval are scored on."""
    from voxseq.data.phantoms import write_phantoms

    folder = out / f"heldout_v{VLP_PHANTOM_VERSION}"
    if (folder / "manifest.jsonl").is_file():
        return folder / "manifest.jsonl"
    return write_phantoms(folder, n_ct=s["n_heldout"], n_mri=0, seed=1, size_xy=96, max_slices=s["max_slices"],
                          progress=False, version=VLP_PHANTOM_VERSION)


def step_zero_shot(out: Path, s: dict[str, Any], vlp_run: Path, upstream_reused: bool) -> dict[str, Any]:
    from voxseq.tasks.eval_vlp import run_zero_shot

    folder = out / "zero_shot"
    _drop_stale(folder, upstream_reused)
    manifest = heldout_manifest(out, s)
    done = (folder / "zero_shot.json").is_file()
    t = time.perf_counter()
    r = json.loads((folder / "zero_shot.json").read_text()) if done else \
        run_zero_shot(vlp_run, manifest, folder, prompts=repo_path(PROMPTS), aggregate="organ")
    o = r["organ_classification"]
    return {"mean_auc": r["mean_auc"], "mean_auc_ci": r.get("mean_auc_ci"),
            "auc": {k: m["auc"] for k, m in r["per_label"].items()},
            "auc_ci": {k: m.get("auc_ci") for k, m in r["per_label"].items()},
            "aggregate": r["aggregate"], "pool": r.get("aggregation", {}).get("pool"),
            "localise": r.get("aggregation", {}).get("localise"),
            "positives": {k: f"{m['positives']}/{m['n']}" for k, m in r["per_label"].items()},
            "n_volumes": r["n_volumes"], "organ_top1": o["top1_accuracy"], "organ_chance": o["top1_chance"],
            "organ_majority": o["top1_majority"],
            "organ_mean_auc": o["mean_auc"], "organ_chunks": o["n_chunks"],
            "seconds": time.perf_counter() - t, "reused": done, "figure": str(folder / "roc.png"),
            "cache": str(folder / "cache"),
            "command": f"voxseq evaluate zero-shot --checkpoint {vlp_run} --prompts {PROMPTS} --aggregate organ "
                       f"--out ZS {manifest}"}


def step_retrieval(out: Path, vlp_run: Path, heldout_cache: Path, upstream_reused: bool) -> dict[str, Any]:
    """On the held-out cache that zero-shot prepared with the checkpoint's preprocessing."""
    from voxseq.tasks.eval_vlp import run_retrieval

    folder = out / "retrieval"
    _drop_stale(folder, upstream_reused)
    done = (folder / "retrieval.json").is_file()
    t = time.perf_counter()
    r = json.loads((folder / "retrieval.json").read_text()) if done else \
        run_retrieval(vlp_run, heldout_cache, folder, aggregate="organ")
    keep = [f"R@{k}" for k in RETRIEVAL_KS]
    return {"n": r["n"], **{d: {k: r[d][k] for k in keep} for d in ("volume_to_report", "report_to_volume", "chance")},
            "seconds": time.perf_counter() - t, "reused": done,
            "aggregate": r.get("aggregate", "volume"),
            "command": f"voxseq evaluate retrieval --checkpoint {vlp_run} --aggregate organ --out RT {heldout_cache}"}


# ---------------------------------------------------------------------------- 7: report


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def report_tables(m: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, header, rows) of every table in the report, shared by the markdown and the HTML page."""
    pre, seg, vlp, zs, rt = m["pretrain"], m["segmentation"], m["vlp"], m["zero_shot"], m["retrieval"]
    probe = m["probe"]
    f3 = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    pm = lambda arm, r: f"{f3(r[arm])} +- {f3(r[f'{arm}_sd'])}"  # noqa: E731
    summary = [["volumes in cache", m["data"]["volumes"]],
               ["AR loss (first -> last 10% of steps)", f"{pre['loss_start']:.4f} -> {pre['loss_end']:.4f} ({pre['loss_drop']:.1%} lower)"],
               [f"segmentation Dice at {seg['ratio']:g} of the labels, {len(seg['seeds'])} seeds (scratch / pretrained)",
                f"{pm('scratch', seg['table'][0])} / {pm('pretrained', seg['table'][0])}"],
               ["pretrained minus scratch, paired by seed", f"{seg['paired']['mean']:+.3f} +- {seg['paired']['std']:.3f}"],
               [f"per-token organ probe, balanced accuracy at block {probe['layer']} (AR / random init)",
                f"{f3(probe['pretrained'])} / {f3(probe['random'])}"],
               ["SigVLP loss (first -> last 10% of steps)", f"{vlp['loss_start']:.4f} -> {vlp['loss_end']:.4f} ({vlp['loss_drop']:.1%} lower)"],
               ["zero-shot abnormality mean AUROC per volume [95% interval] (chance 0.500)",
                f"{f3(zs['mean_auc'])}{_interval(zs.get('mean_auc_ci'))}"],
               ["zero-shot organ top-1 (random organ; most frequent organ)",
                f"{f3(zs['organ_top1'])} ({f3(zs['organ_chance'])}; {f3(zs['organ_majority'])})"],
               ["zero-shot organ mean AUROC (chance)", f"{f3(zs['organ_mean_auc'])} (0.500)"],
               ["volume -> report R@1 (chance)", f"{f3(rt['volume_to_report']['R@1'])} ({f3(rt['chance']['R@1'])})"],
               ["report -> volume R@5 (chance)", f"{f3(rt['report_to_volume']['R@5'])} ({f3(rt['chance']['R@5'])})"],
               ["total wall time (s)", f"{m['wall_s']:.0f}"]]
    timings = [["1 data", f"{m['data']['seconds']:.1f}", m["data"]["reused"], f"{m['data']['volumes']} volumes cached"],
               ["2 sequences", f"{m['sequences']['seconds']:.1f}", False, "3 sequence kinds drawn"],
               ["3 AR pretraining", f"{pre['seconds']:.1f}", pre["reused"], f"{pre['steps']} steps, {pre['tokens_per_s']:.0f} tokens/s"],
               ["4 segmentation", f"{seg['seconds']:.1f}", seg["reused"],
                f"{2 * len(seg['ratios']) * len(seg['seeds'])} runs x {seg['steps']} steps in {seg['train_seconds']:.0f} s, "
                f"{seg['steps_per_s']:.2f} steps/s"],
               ["4b token probe", f"{probe['seconds']:.1f}", probe["reused"], f"{probe['test_tokens']} test tokens"],
               ["5 SigVLP pretraining", f"{vlp['seconds']:.1f}", vlp["reused"],
                f"{vlp['steps']} steps in {vlp['train_seconds']:.0f} s, {vlp['chunks_per_s']:.1f} chunks/s, {vlp['tokens_per_s']:.0f} tokens/s"],
               ["6a zero-shot", f"{zs['seconds']:.1f}", zs["reused"], f"{zs['n_volumes']} volumes, {zs['organ_chunks']} chunks"],
               ["6b retrieval", f"{rt['seconds']:.1f}", rt["reused"], f"{rt['n']} volumes and reports"]]
    label_eff = [[f"{r['ratio']:g}", r["n_train"], pm("scratch", r), pm("pretrained", r)] for r in seg["table"]]
    headlines = [["AR pretraining -> segmentation", seg["verdict"]],
                 ["AR pretraining -> token probe", probe_verdict(probe)],
                 ["SigVLP -> zero-shot findings", zero_shot_verdict(zs)]]
    zero_shot = [[k, zs["positives"][k], f"{f3(v)}{_interval(zs.get('auc_ci', {}).get(k))}"] for k, v in zs["auc"].items()] \
        + [["mean", "", f"{f3(zs['mean_auc'])}{_interval(zs.get('mean_auc_ci'))}"]]
    organ = [["top-1 accuracy", f3(zs["organ_top1"]), f3(zs["organ_chance"])],
             ["top-1 accuracy, always the most frequent organ", "", f3(zs["organ_majority"])],
             ["mean AUROC", f3(zs["organ_mean_auc"]), "0.500"]]
    ks = [f"R@{k}" for k in RETRIEVAL_KS]
    retrieval = [[d.replace("_", " "), *[f3(rt[d][k]) for k in ks]] for d in ("volume_to_report", "report_to_volume", "chance")]
    for row in timings:
        row[2] = "yes" if row[2] else "no"
    return [("Headlines", ["what", "verdict"], headlines), ("Results", ["result", "value"], summary),
            ("Timings and throughput per step (this run)", ["step", "wall time (s)", "reused", "throughput"], timings),
            (f"Label efficiency: mean Dice on the validation and test phantoms, UNETR, mean +- sd over seeds {seg['seeds']}",
             ["label ratio", "training volumes", "scratch", "pretrained (AR)"], label_eff),
            (f"Zero-shot abnormality classification ({zs['n_volumes']} held-out volumes"
             + (f"; each label pooled over the tiles that show its organ, {zs['pool']})" if zs.get("pool") else ")"),
             ["label", "positives", "AUROC [95% interval]"], zero_shot),
            (f"Zero-shot organ classification ({zs['organ_chunks']} held-out chunks)", ["metric", "SigVLP", "chance"], organ),
            (f"Retrieval ({rt['n']} held-out volumes and their reports)", ["direction", *ks], retrieval)]


def _interval(ci) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def probe_verdict(probe: dict[str, Any]) -> str:
    d = probe["pretrained"] - probe["random"]
    if d >= 0.05:
        return f"AR features ahead of a random encoder's by {d:+.3f} balanced accuracy"
    return (f"AR features {d:+.3f} against a random encoder's: below the +0.05 that counts as learned at this "
            "budget (minutes of pretraining; docs/reproducing.md has longer runs)")


def zero_shot_verdict(zs: dict[str, Any]) -> str:
    auc, ci = zs["mean_auc"], zs.get("mean_auc_ci")
    if auc is None or (ci[0] <= 0.5 if ci else abs(auc - 0.5) < 0.1):
        return (f"abnormality mean AUROC per volume {'n/a' if auc is None else f'{auc:.3f}'}{_interval(ci)} is not "
                "above chance: a few dozen SigVLP steps on a few phantoms do not carry findings to whole volumes "
                "(docs/reproducing.md, SigVLP at the volume level, has the 1000-step runs)")
    return f"abnormality mean AUROC per volume {auc:.3f}{_interval(ci)}, above chance"


def _md_table(title: str, header: list[str], rows: list[list[Any]]) -> list[str]:
    return [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]


def _html_table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


INTRO = ("Synthetic phantoms and real sample volumes -> cache -> token sequences -> AR-SSL4M pretraining -> "
         "UNETR fine-tuning (pretrained versus scratch) -> SigVLP pretraining -> zero-shot classification and "
         "retrieval on held-out phantoms, on a CPU.")


def write_report(out: Path, metrics: dict[str, Any], figures: list[tuple[Path, str]], commands: list[tuple[str, str]]) -> None:
    """report.md (images linked), report.html (images embedded, one file) and metrics.json."""
    (out / "metrics.json").write_text(json.dumps(_clean(metrics), indent=1))
    tables = report_tables(metrics)
    md = ["# voxseq demo report", "", INTRO, ""]
    for t in tables:
        md += _md_table(*t)
    md += ["## Figures", ""] + [f"![{alt}]({p.relative_to(out)})\n" for p, alt in figures]
    md += ["## Reproduce each step", ""] + [f"- {what}: `{cmd}`" for what, cmd in commands]
    (out / "report.md").write_text("\n".join(md) + "\n")
    cmds = "".join(f"<li>{html.escape(w)}: <code>{html.escape(c)}</code></li>" for w, c in commands)
    figs = "".join(_img_tag(p, alt) for p, alt in figures)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>voxseq demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin-bottom:1em}}td,th{{border:1px solid #ccc;padding:4px 10px}}th{{background:#f4f4f4}}
figure{{margin:1.5em 0}}img{{max-width:100%;border:1px solid #eee}}figcaption{{color:#555;font-size:90%}}
code{{background:#f4f4f4;padding:1px 4px}}</style></head><body>
<h1>voxseq demo report</h1><p>{html.escape(INTRO)}</p>{"".join(_html_table(*t) for t in tables)}
<h2>Figures</h2>{figs}<h2>Reproduce each step</h2><ul>{cmds}</ul>
</body></html>"""
    (out / "report.html").write_text(page)


def report_figures(out: Path, m: dict[str, Any]) -> list[tuple[Path, str]]:
    ar, vlp, seg = Path(m["pretrain"]["run"]), Path(m["vlp"]["run"]), m["segmentation"]
    figures = [(Path(m["sequences"]["figure"]), "Token sequences of each kind cut from the cache"),
               (ar / "plots" / "loss_curve.png", "AR pretraining loss and learning rate"),
               (ar / "plots" / "reconstruction.png", "AR reconstruction: inputs and next-token predictions"),
               (Path(seg["figure"]), "Segmentation of a validation volume: ground truth and each arm's prediction")]
    if len(seg["ratios"]) > 1:
        figures.append((Path(seg["plot"]), "Label efficiency: validation Dice over the fraction of training labels"))
    figures.append((Path(m["probe"]["plot"]), "Per-token organ probe by layer: AR encoder against a random one"))
    return figures + [(vlp / "plots" / "loss_curve.png", "SigVLP loss (SigLIP) and learning rate"),
                      (vlp / "plots" / "similarity.png", "SigVLP chunk-text similarity"),
                      (Path(m["zero_shot"]["figure"]), "Zero-shot abnormality classification: ROC curves on held-out phantoms")]


def report_commands(m: dict[str, Any], s: dict[str, Any]) -> list[tuple[str, str]]:
    return [("phantoms", f"voxseq phantoms --out PHANTOMS --n-ct {s['n_ct']} --n-mri {s['n_mri']}"),
            ("cache", f"voxseq prepare PHANTOMS/manifest.jsonl --out CACHE --config {AR_CONFIG}"),
            ("AR pretraining", m["pretrain"]["command"]),
            ("segmentation, pretrained versus scratch", m["segmentation"]["command"]),
            ("per-token probe", m["probe"]["command"]),
            ("SigVLP pretraining", m["vlp"]["command"]),
            ("zero-shot classification", m["zero_shot"]["command"]),
            ("retrieval", m["retrieval"]["command"])]


# ---------------------------------------------------------------------------- the whole demo


def _timed(label: str, fn, *args) -> dict[str, Any]:
    r = fn(*args)
    _say(f"    {label}: {'reused' if r.get('reused') else 'done'} in {r['seconds']:.1f} s")
    return r


def run_demo(out: str | Path = "runs/demo", quick: bool = False, fresh: bool = False) -> dict[str, Any]:
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    s = demo_settings(quick)
    t0 = time.perf_counter()
    m: dict[str, Any] = {"quick": quick, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}}
    _say(f"1/7 data: {s['n_ct']} CT + {s['n_mri']} MRI phantoms and 3 real sample volumes -> cache {out / 'cache'}")
    m["data"] = _timed(f"{s['n_ct'] + s['n_mri'] + 3} volumes cached", step_data, out, s)
    _say("2/7 sequences: spatial, contrast and semantic sequences -> plots/sequences.png")
    m["sequences"] = _timed("figure", step_sequences, out, Cache(out / "cache"))
    _say(f"3/7 AR pretraining: tiny ViT, {s['ar_steps']} steps")
    pre = m["pretrain"] = _timed("AR pretraining", step_pretrain, out, s, m["data"]["reused"])
    _say(f"    loss {pre['loss_start']:.3f} -> {pre['loss_end']:.3f} ({pre['loss_drop']:.0%} lower), "
         f"{pre['tokens_per_s']:.0f} tokens/s")
    _say(f"4/7 segmentation: UNETR on the CT organs, label ratio {', '.join(f'{r:g}' for r in s['seg_ratios'])}, "
         f"{s['seg_steps']} steps, seeds {', '.join(map(str, s['seg_seeds']))}, encoder from the AR run versus from "
         "scratch; then the per-token probe")
    seg = m["segmentation"] = _timed("segmentation", step_segmentation, out, s, Path(pre["run"]), pre["reused"])
    _say(f"    Dice at {seg['ratio']:g} of the labels over {len(seg['seeds'])} seeds: scratch {seg['dice']['scratch']:.3f}, "
         f"pretrained {seg['dice']['pretrained']:.3f}; {seg['verdict']}")
    probe = m["probe"] = _timed("token probe", step_probe, out, s, Path(pre["run"]), pre["reused"])
    _say(f"    per-token organ probe at block {probe['layer']}: AR {probe['pretrained']:.3f}, random {probe['random']:.3f}")
    _say(f"5/7 SigVLP pretraining: {s['n_ct']} CT phantoms, {s['vlp_steps']} steps of {s['vlp_chunks']} chunk-text pairs")
    vlp = m["vlp"] = _timed("SigVLP pretraining", step_vlp, out, s, m["data"]["reused"])
    _say(f"    loss {vlp['loss_start']:.3f} -> {vlp['loss_end']:.3f} ({vlp['loss_drop']:.0%} lower)")
    _say(f"6/7 zero-shot and retrieval on {s['n_heldout']} held-out CT phantoms (seed 1)")
    zs = m["zero_shot"] = _timed("zero-shot", step_zero_shot, out, s, Path(vlp["run"]), vlp["reused"])
    _say(f"    abnormality mean AUROC {zs['mean_auc']:.3f}; organ top-1 {zs['organ_top1']:.3f} "
         f"(chance {zs['organ_chance']:.3f}, most frequent organ {zs['organ_majority']:.3f}), organ mean AUROC {zs['organ_mean_auc']:.3f} (chance 0.5)")
    rt = m["retrieval"] = _timed("retrieval", step_retrieval, out, Path(vlp["run"]), Path(zs["cache"]), vlp["reused"])
    _say(f"    volume -> report R@1 {rt['volume_to_report']['R@1']:.3f}, R@5 {rt['volume_to_report']['R@5']:.3f} "
         f"(chance {rt['chance']['R@1']:.3f}, {rt['chance']['R@5']:.3f})")
    m["wall_s"] = time.perf_counter() - t0
    figures = report_figures(out, m)
    m["figures"] = [str(p) for p, _ in figures]
    _say(f"7/7 report -> {out / 'report.html'}")
    write_report(out, m, figures, report_commands(m, s))
    _say(f"done in {m['wall_s']:.0f} s. Open {out / 'report.html'}")
    return m
