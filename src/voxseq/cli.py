"""The ``voxseq`` command line: thin wrappers that parse arguments and call library functions.

Heavy modules (torch, MONAI, SimpleITK) are imported inside the commands that need them, so
``voxseq --help`` answers at once. Errors caused by the input print one line naming the file
and the cause and exit with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from voxseq import VoxseqError, __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="voxseq: foundation models of 3D medical images (AR-SSL4M, SigVLP).")
pretrain_app = typer.Typer(no_args_is_help=True, help="Pretrain an encoder (ar: autoregressive sequences; vlp: vision-language on CT chunks).")
app.add_typer(pretrain_app, name="pretrain")

_state: dict = {"debug": False, "nonfinite_advice": None}
NONFINITE_HELP = "error: refuse NaN/Inf voxels; zero: replace them with 0."
NONFINITE_FLAG = "--nonfinite zero"
NONFINITE_OVERRIDE = "data.nonfinite=zero"  # commands whose data come from their config


def _version(value: bool) -> None:
    if value:
        typer.echo(f"voxseq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug
    _state["nonfinite_advice"] = None  # set by the command that runs (main() may run several in one process)


def _advise(message: str) -> str:
    """A library message in the running command's terms: the NaN/Inf advice names the command's own flag."""
    advice = _state["nonfinite_advice"]
    if advice and "nonfinite=" in message:
        from voxseq.io.volume import NONFINITE_ADVICE

        message = message.replace(NONFINITE_ADVICE, advice)
    return message


def _reads_volumes(nonfinite: str) -> str:
    """Called by each command with ``--nonfinite``: errors then advise that flag, and a wrong value stops here."""
    if nonfinite not in ("error", "zero"):
        raise VoxseqError(f"--nonfinite must be error or zero, not {nonfinite!r}")
    _state["nonfinite_advice"] = NONFINITE_FLAG
    return nonfinite


def _reads_config_data() -> None:
    """Called by each command that prepares its data from a config: errors advise the config override."""
    _state["nonfinite_advice"] = NONFINITE_OVERRIDE


def _err(message: str) -> None:
    typer.echo(f"voxseq: error: {_advise(message)}", err=True)


# ---------------------------------------------------------------------------- info


@app.command()
def info(
    paths: List[Path] = typer.Argument(..., help="Volume files or folders (DICOM series, or folders of volumes)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per input, one per line."),
) -> None:
    """Size, spacing, orientation and intensity range of volumes."""
    from voxseq.io.inspect import expand_inputs, volume_info

    failed = 0
    for path in expand_inputs(paths):
        try:
            d = volume_info(path)
        except VoxseqError as e:
            if _state["debug"]:
                raise
            _err(str(e))
            failed += 1
            continue
        if as_json:
            typer.echo(json.dumps(d))
        else:
            typer.echo(f"{d['path']}\n  format {d['format']}  size_xyz {tuple(d['size_xyz'])}  channels {d['channels']}  "
                       f"spacing_xyz {tuple(round(s, 4) for s in d['spacing_xyz'])} mm  orientation {d['orientation']}\n"
                       f"  dtype {d['dtype']}  min {d['min']:g}  max {d['max']:g}  mean {d['mean']:.4g}  "
                       f"NaN/Inf {d['nonfinite_voxels']}"
                       + (" (read as 0 in min/max/mean; other commands refuse them unless --nonfinite zero)"
                          if d["nonfinite_voxels"] else ""))
    if failed:
        raise typer.Exit(2)


# ---------------------------------------------------------------------------- prepare


@app.command()
def prepare(
    source: Path = typer.Argument(..., help="A manifest (.jsonl), a CSV, or a dataset folder (layout auto-detected)."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder to write (re-running resumes it)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with a Preprocess config (or a `preprocess:` section)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Dataset layout: msd, brats, deeplesion, ctrate, radgenome, la, ricord, nodulemnist3d, folder, csv (default: detect)."),
    window: Optional[str] = typer.Option(None, "--window", help="CT window preset (liver, lung, pancreas, hepatic_vessel, spleen, colon, ct)."),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="Target spacing 'x,y,z' in mm."),
    workers: int = typer.Option(2, "--workers", "-j", help="Parallel worker processes."),
    on_error: str = typer.Option("stop", "--on-error", help="stop: stop at the first bad volume; skip: go on and list it."),
    nonfinite: str = typer.Option("error", "--nonfinite", help=NONFINITE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing cache at --out first."),
    verify: bool = typer.Option(False, "--verify", help="Check the sha256 of every finished volume (file sizes are always checked); a broken one stops the run."),
    repair: bool = typer.Option(False, "--repair", help="Check every finished volume's sha256 and rebuild only the broken ones."),
    overrides: List[str] = typer.Argument(None, help="Preprocess overrides key=value, e.g. crop_foreground=true."),
) -> None:
    """Preprocess a corpus into a fast, memory-mapped voxel cache."""
    from voxseq.tasks.prepare import run_prepare

    _reads_volumes(nonfinite)
    summary = run_prepare(source, out, config=config, adapter=adapter, window=window, spacing=spacing,
                          workers=workers, on_error=on_error, nonfinite=nonfinite, overwrite=overwrite,
                          verify=verify, repair=repair, overrides=list(overrides or []))
    repaired = f", repaired {len(summary.repaired)}" if repair else ""
    typer.echo(f"prepared {summary.done} volume(s), reused {summary.reused}{repaired}, skipped {len(summary.skipped)} "
               f"in {summary.seconds:.1f} s ({summary.volumes_per_s:.2f} volumes/s, {summary.mb_per_s:.1f} MB/s) -> {out}")
    for rid in summary.repaired:
        typer.echo(f"  repaired {rid}")
    for s in summary.skipped:
        typer.echo(f"  skipped {s['id']}: {_advise(s['error'])}")
    for w in summary.warnings:
        typer.echo(f"voxseq: warning: {w}", err=True)


# ---------------------------------------------------------------------------- phantoms


@app.command()
def phantoms(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the phantoms and their manifest.jsonl into."),
    n_ct: int = typer.Option(8, "--n-ct", help="Number of CT torso phantoms."),
    n_mri: int = typer.Option(4, "--n-mri", help="Number of 4-contrast brain MRI phantoms."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same phantoms)."),
    size_xy: int = typer.Option(128, "--size-xy", min=16, help="In-plane voxels of the CT torsos (the field of view sets the spacing)."),
    max_slices: int = typer.Option(160, "--max-slices", min=24, help="Most slices of a CT torso (its scan range sets the count)."),
    phantom_version: int = typer.Option(1, "--phantom-version", min=1, max=2, help="2: organs of overlapping "
                                        "intensity told apart by texture, shape and place (docs/reproducing.md)."),
    findings: str = typer.Option("basic", "--findings", help="CT findings: basic (six: nodule, effusion, "
                                 "cardiomegaly, liver lesion, kidney cyst, bone lesion) or ct-rate (also emphysema, "
                                 "atelectasis, consolidation, pericardial effusion, aortic and coronary calcification, "
                                 "at CT-RATE's rates)."),
) -> None:
    """Write deterministic synthetic CT torsos and multi-contrast brain MRIs with masks, lesions and text."""
    from voxseq.data.phantoms import FINDING_SETS, write_phantoms

    if findings not in FINDING_SETS:
        raise VoxseqError(f"--findings must be one of {', '.join(FINDING_SETS)}, not {findings!r}")
    manifest = write_phantoms(out, n_ct=n_ct, n_mri=n_mri, seed=seed, size_xy=size_xy, max_slices=max_slices,
                              version=phantom_version, findings=findings)
    typer.echo(f"wrote {n_ct} CT and {n_mri} MRI phantoms -> {manifest}")


# ---------------------------------------------------------------------------- pretrain


@pretrain_app.command("ar")
def pretrain_ar(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/ar_tiny.yaml, configs/ar_vit_b.yaml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config, metrics.jsonl, checkpoints, plots."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    overrides: List[str] = typer.Argument(None, help="Config overrides key=value, dotted for nested fields (model.depth=4)."),
) -> None:
    """Autoregressive pretraining (AR-SSL4M) of a 3D ViT on token sequences."""
    from voxseq.tasks.pretrain_ar import load_ar_config, run_pretrain_ar

    _reads_config_data()
    cfg = load_ar_config(config, list(overrides or []))
    _note_fresh_start(out, resume)
    _report_training(run_pretrain_ar(cfg, out, resume=resume), out)


@pretrain_app.command("mae")
def pretrain_mae(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/mae_tiny.yaml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config, metrics.jsonl, checkpoints, plots."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    overrides: List[str] = typer.Argument(None, help="Config overrides key=value, dotted for nested fields (mask_ratio=0.6)."),
) -> None:
    """Masked-autoencoder pretraining (MAE3D) of the same 3D ViT: the baseline of AR-SSL4M."""
    from voxseq.tasks.pretrain_mae import load_mae_config, run_pretrain_mae

    _reads_config_data()
    cfg = load_mae_config(config, list(overrides or []))
    _report_training(run_pretrain_mae(cfg, out, resume=resume), out)


@pretrain_app.command("vlp")
def pretrain_vlp(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/vlp_tiny.yaml, configs/vlp_vit_l.yaml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config, metrics.jsonl, checkpoints, plots."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    init: Optional[Path] = typer.Option(None, "--init", help="An AR-SSL4M (or MAE) run or checkpoint whose encoder "
                                        "starts the vision tower (same architecture; sets the config's init)."),
    overrides: List[str] = typer.Argument(None, help="Config overrides key=value, dotted for nested fields (model.vision.depth=4)."),
) -> None:
    """SigVLP vision-language pretraining: CT chunks of any size paired with organ-wise sentences."""
    from voxseq.tasks.pretrain_vlp import load_vlp_config, run_pretrain_vlp

    _reads_config_data()
    cfg = load_vlp_config(config, list(overrides or []) + ([f"init={init}"] if init else []))
    _note_fresh_start(out, resume)
    _report_training(run_pretrain_vlp(cfg, out, resume=resume), out)


def _note_fresh_start(out: Path, resume: bool) -> None:
    """``--resume`` on a run folder without checkpoints starts from step 0: say so (rank 0 only)."""
    import os

    if resume and os.environ.get("RANK", "0") == "0" and not any((out / "checkpoints").glob("model_*.json")):
        typer.echo(f"voxseq: note: {out} holds no checkpoint to resume from; starting a fresh run", err=True)


def _report_training(summary: dict, out: Path) -> None:
    if summary.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return
    if summary.get("first_loss") is not None:
        drop = 1 - summary["last_loss"] / summary["first_loss"]
        typer.echo(f"trained to step {summary['steps']} in {summary['seconds']:.0f} s: loss {summary['first_loss']:.4f} -> "
                   f"{summary['last_loss']:.4f} ({drop:+.0%} drop) -> {out}")
    else:
        typer.echo(f"{out}: {summary.get('message', 'nothing to do')}")


# ---------------------------------------------------------------------------- fine-tuning, evaluation, prediction

finetune_app = typer.Typer(no_args_is_help=True, help="Fine-tune a (pretrained) encoder on a downstream task.")
app.add_typer(finetune_app, name="finetune")


@finetune_app.command("seg")
def finetune_seg(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/seg_phantom_tiny.yaml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder."),
    init: Optional[Path] = typer.Option(None, "--init", help="Checkpoint or run folder to take the encoder from (default: scratch)."),
    label_ratio: Optional[float] = typer.Option(None, "--label-ratio", help="Train on this fraction of the labelled cases."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint (same config and --init)."),
    overrides: List[str] = typer.Argument(None, help="Config overrides key=value."),
) -> None:
    """UNETR segmentation fine-tuning; Dice per class on the validation split."""
    from voxseq.tasks.finetune_seg import load_seg_config, run_finetune_seg

    _reads_config_data()
    extra = [f"label_ratio={label_ratio}"] if label_ratio is not None else []
    cfg = load_seg_config(config, list(overrides or []) + extra)
    r = run_finetune_seg(cfg, out, init=str(init) if init else None, resume=resume)
    typer.echo(f"{r['how']}; {r['n_train']} training / {r['n_val']} validation volumes; "
               f"validation mean Dice {r['val']['mean_dice']:.4f} in {r['seconds']:.0f} s -> {out}")


@finetune_app.command("cls")
def finetune_cls(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/cls_phantom_tiny.yaml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder."),
    init: Optional[Path] = typer.Option(None, "--init", help="Checkpoint or run folder to take the encoder from (default: scratch)."),
    label_ratio: Optional[float] = typer.Option(None, "--label-ratio", help="Train on this fraction of the labelled cases."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint (same config and --init)."),
    overrides: List[str] = typer.Argument(None, help="Config overrides key=value (e.g. linear_probe=true)."),
) -> None:
    """Volume classification (mean-pooled tokens -> head); AUC, ACC, sensitivity, specificity."""
    from voxseq.tasks.finetune_cls import load_cls_config, run_finetune_cls

    _reads_config_data()
    extra = [f"label_ratio={label_ratio}"] if label_ratio is not None else []
    cfg = load_cls_config(config, list(overrides or []) + extra)
    r = run_finetune_cls(cfg, out, init=str(init) if init else None, resume=resume)
    m = r["metrics"]
    typer.echo(f"{r['how']}; {r['n_train']} training / {r['n_eval']} evaluation volumes; AUC {m['auc']:.3f} "
               f"ACC {m['acc']:.3f} sensitivity {m['sensitivity']:.3f} specificity {m['specificity']:.3f} -> {out}")


evaluate_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                           help="Evaluate a checkpoint: segmentation Dice on a split (--checkpoint), or a SigVLP "
                                "checkpoint's zero-shot classification and retrieval (subcommands).")
app.add_typer(evaluate_app, name="evaluate")


@evaluate_app.callback()
def evaluate(
    ctx: typer.Context,
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A segmentation checkpoint or run folder."),
    split: str = typer.Option("val", "--split", help="Split of the training cache to evaluate on."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for evaluation.json/.md (default: the run folder)."),
) -> None:
    """Metrics of a fine-tuned segmentation checkpoint on a split: JSON and markdown."""
    if ctx.invoked_subcommand:
        return
    if checkpoint is None:
        raise VoxseqError("give --checkpoint (a segmentation run), or a subcommand: zero-shot, retrieval")
    from voxseq.tasks.finetune_seg import evaluate_checkpoint

    r = evaluate_checkpoint(checkpoint, split, out)
    typer.echo(f"mean Dice {r['mean_dice']:.4f} over {len(r['per_case'])} volume(s); per class "
               + ", ".join(f"{d:.3f}" for d in r["dice_per_class"]))


@evaluate_app.command("zero-shot")
def evaluate_zero_shot(
    source: Path = typer.Argument(..., help="Volumes with class labels: a manifest (.jsonl), dataset folder or cache."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A SigVLP checkpoint or run folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for zero_shot.json/.md, roc.png and zero_shot_predictions.csv "
                             "(one row per volume: id, P(present) per label, the labels)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="YAML: label -> [present prompt, absent prompt, organ (optional)]; "
                                           "a side may be a list of prompts, averaged (default: CT-CLIP's '<label>.' / "
                                           "'not <label>.'). Labels with an organ are also scored on the chunks showing that organ."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated labels (default: all in the prompts/data)."),
    aggregate: str = typer.Option("volume", "--aggregate", help="volume: one embedding per whole volume; chunks: "
                                  "the highest score over z-chunks (and over in-plane tiles of the training crop when the model "
                                  "trained on chunks.crop_yx crops); organ: tiles of the training chunk, each label pooled "
                                  "over the tiles that show its organ (the prompts file's third item)."),
    chunk_slices: Optional[int] = typer.Option(None, "--chunk-slices", min=1, help="Chunk thickness with --aggregate "
                                               "chunks (default 32) or organ (default: the training chunk's)."),
    pool: str = typer.Option("topk", "--pool", help="With --aggregate organ: topk (mean of the --top-k highest tile "
                             "scores), max, noisy-or or mean."),
    top_k: int = typer.Option(3, "--top-k", min=1, help="Tiles averaged by --pool topk."),
    localise: str = typer.Option("auto", "--localise", help="With --aggregate organ, which tiles show an organ: masks "
                                 "(the data's organ masks), prompts (the model's 'The <organ>.' prompts), none (every "
                                 "tile scores every label), auto (masks when every volume has them)."),
    split: Optional[str] = typer.Option(None, "--split", help="Only this split of the data."),
    organ_chunks: int = typer.Option(200, "--organ-chunks", min=1, help="Chunks drawn (as in training, from the "
                                     "organ masks) for organ classification and findings in organ chunks."),
    organ_chunk_slices: Optional[int] = typer.Option(None, "--organ-chunk-slices", min=1, help="Those chunks' "
                                                     "thickness (default: as in training; thicker tests longer inputs)."),
    nonfinite: str = typer.Option("error", "--nonfinite", help=NONFINITE_HELP),
    operating_point: str = typer.Option("youden", "--operating-point", help="Where ACC / weighted F1 / precision are "
                                        "taken, per label: youden (maximum sensitivity + specificity - 1), corner (the ROC "
                                        "point closest to (0, 1)), or a number (a fixed threshold on P(present))."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Resamples of the volumes for the 95% intervals "
                                  "(fixed seed; 0: none)."),
) -> None:
    """Zero-shot abnormality classification (the CT-RATE protocol: CT-CLIP prompts, AUROC, Youden's J operating
    point, bootstrap intervals, per-volume CSV), organ classification of chunks and findings in the chunks that
    show their organ."""
    from voxseq.tasks.eval_vlp import parse_operating_point, run_zero_shot

    parse_operating_point(operating_point)  # a bad value is said before any volume is read
    r = run_zero_shot(checkpoint, source, out, prompts=prompts, labels=labels.split(",") if labels else None,
                      aggregate=aggregate, chunk_slices=chunk_slices, pool=pool, top_k=top_k, localise=localise,
                      split=split, organ_chunks_n=organ_chunks,
                      organ_chunk_slices=organ_chunk_slices, nonfinite=_reads_volumes(nonfinite),
                      operating_point=operating_point, bootstrap=bootstrap)

    def ci(m, key):
        return f" [{m[key][0]:.3f}, {m[key][1]:.3f}]" if key in m else ""

    for name, m in r["per_label"].items():
        typer.echo(f"{name:24s} AUROC {m['auc']:.3f}{ci(m, 'auc_ci')}  ACC {m['acc']:.3f}  "
                   f"weighted F1 {m['weighted_f1']:.3f}  precision {m['precision']:.3f}")
    typer.echo(f"mean AUROC {r['mean_auc']:.3f}{ci(r, 'mean_auc_ci')} over {r['n_volumes']} volumes")
    if "organ_classification" in r:
        o = r["organ_classification"]
        typer.echo(f"organ classification: top-1 {o['top1_accuracy']:.3f} (chance {o['top1_chance']:.3f}, "
                   f"always the most frequent organ {o['top1_majority']:.3f}), "
                   f"mean AUROC {o['mean_auc']:.3f}")
    if "finding_in_organ_chunks" in r:
        f = r["finding_in_organ_chunks"]
        typer.echo("findings in organ chunks: " + ", ".join(f"{n} {m['auc']:.3f}" for n, m in f["per_label"].items())
                   + f"; mean AUROC {f['mean_auc']:.3f}")
    typer.echo(f"-> {out / 'zero_shot.md'}")


@evaluate_app.command("retrieval")
def evaluate_retrieval(
    source: Path = typer.Argument(..., help="Volumes with reports: a manifest (.jsonl), dataset folder or cache."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A SigVLP checkpoint or run folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for retrieval.json/.md."),
    split: Optional[str] = typer.Option(None, "--split", help="Only this split of the data."),
    nonfinite: str = typer.Option("error", "--nonfinite", help=NONFINITE_HELP),
    aggregate: str = typer.Option("volume", "--aggregate", help="volume: one embedding per whole volume and per "
                                  "report; organ: tiles of the training chunk, each report sentence matched to the "
                                  "tiles that show its organ."),
    top_k: int = typer.Option(3, "--top-k", min=1, help="With --aggregate organ: tiles averaged per sentence."),
    localise: str = typer.Option("auto", "--localise", help="With --aggregate organ: masks, prompts, none or auto "
                                 "(masks when every volume has them)."),
) -> None:
    """Volume -> report and report -> volume retrieval, recall@1/5/10/50/100; volume -> volume MAP@k over the
    binary labels every volume carries (relevant: sharing a positive label)."""
    from voxseq.tasks.eval_vlp import run_retrieval

    r = run_retrieval(checkpoint, source, out, split=split, nonfinite=_reads_volumes(nonfinite), aggregate=aggregate,
                      top_k=top_k, localise=localise)
    for d in ("volume_to_report", "report_to_volume", "volume_to_volume"):
        if d in r:
            typer.echo(f"{d:18s} " + "  ".join(f"{k} {v:.3f}" for k, v in r[d].items()))
    typer.echo(f"-> {out / 'retrieval.md'}")


@app.command()
def predict(
    files: List[Path] = typer.Argument(..., help="Volume files or DICOM folders, any size."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A segmentation checkpoint or run folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: <input name>_seg.nii.gz per input."),
    nonfinite: str = typer.Option("error", "--nonfinite", help=NONFINITE_HELP),
) -> None:
    """Segment new scans with a fine-tuned checkpoint; outputs keep each input's geometry."""
    from voxseq.tasks.finetune_seg import predict_files

    for p in predict_files(checkpoint, list(files), out, nonfinite=_reads_volumes(nonfinite)):
        typer.echo(f"wrote {p}")


experiment_app = typer.Typer(no_args_is_help=True, help="Experiments that compare training set-ups.")
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("label-efficiency")
def label_efficiency(
    config: Path = typer.Option(..., "--config", "-c", help="Segmentation config (e.g. configs/seg_phantom_tiny.yaml)."),
    init: Path = typer.Option(..., "--init", help="The pretrained checkpoint or run folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Experiment folder (re-running resumes the table)."),
    ratios: str = typer.Option("0.1,1.0", "--ratios", help="Comma-separated label ratios."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds."),
    overrides: List[str] = typer.Argument(None, help="Config overrides key=value for every run."),
) -> None:
    """Fine-tune scratch and pretrained encoders over label ratios and seeds; table and plot."""
    from voxseq.tasks.experiments import run_label_efficiency

    _reads_config_data()
    r_list, s_list = _numbers(ratios, float, "--ratios"), _numbers(seeds, int, "--seeds")
    res = run_label_efficiency(config, init, out, r_list, s_list, list(overrides or []))
    _echo_dice_summary(res["summary"], out / "results.md")


@experiment_app.command("linear-probe")
def linear_probe(
    config: Path = typer.Option(..., "--config", "-c", help="Segmentation config giving the labelled data (e.g. configs/seg_phantom_tiny.yaml)."),
    init: Path = typer.Option(..., "--init", help="The pretrained checkpoint or run folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Experiment folder."),
    overrides: List[str] = typer.Argument(None, help="Config overrides key=value."),
    window: str = typer.Option("whole", "--window", help="whole (one sequence per volume), pretraining (windows of "
                               "the encoder's training geometry) or ZxYxX voxels."),
    layer: Optional[str] = typer.Option(None, "--layer", help="The headline layer: block N, mean or last "
                                        "(default: the checkpoint's embedding default). Every layer is in the curve."),
) -> None:
    """Per-token linear probe (organ at each token's centre): pretrained versus random encoder, by layer."""
    from voxseq.models.features import describe_geometry
    from voxseq.tasks.experiments import run_token_probe

    _reads_config_data()
    r = run_token_probe(config, init, out, list(overrides or []), window=window, layer=layer)
    typer.echo(f"layer {r['layer']}, {describe_geometry(r['window_zyx'])}")
    for name in ("pretrained", "random"):
        typer.echo(f"{name:10s} accuracy {r[name]['accuracy']:.4f}  balanced accuracy {r[name]['balanced_accuracy']:.4f}")
        curve = r["layers"][name]
        typer.echo(f"{'':10s} by layer: " + "  ".join(f"{k} {v['balanced_accuracy']:.3f}" for k, v in curve.items()))
    typer.echo(f"-> {out / 'token_probe.md'}")


@experiment_app.command("compare")
def compare(
    config: Path = typer.Option(..., "--config", "-c", help="Segmentation config giving the labelled data and the "
                                "fine-tuning budget (e.g. configs/seg_phantom_v2.yaml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Experiment folder (re-running resumes the table)."),
    ar: Optional[Path] = typer.Option(None, "--ar", help="An AR-SSL4M pretraining run folder or checkpoint."),
    mae: Optional[Path] = typer.Option(None, "--mae", help="An MAE pretraining run of the same architecture and data."),
    arms: str = typer.Option(",".join(("scratch", "random-frozen", "mae", "ar")), "--arms",
                             help="Comma-separated: scratch, random-frozen, mae, ar, mae-frozen, ar-frozen."),
    ratios: str = typer.Option("0.1,1.0", "--ratios", help="Comma-separated label ratios."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds (pairs every arm with scratch)."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="The per-layer token probe of random, MAE and AR encoders."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Fine-tunings run at once (each with its share of the cores)."),
    overrides: List[str] = typer.Argument(None, help="Config overrides key=value for every fine-tuning."),
) -> None:
    """Scratch, random-frozen, MAE and AR encoders: label efficiency paired by seed, and the token probe."""
    from voxseq.tasks.experiments import run_compare

    _reads_config_data()
    r_list, s_list = _numbers(ratios, float, "--ratios"), _numbers(seeds, int, "--seeds")
    res = run_compare(config, out, ar, mae, [a.strip() for a in arms.split(",") if a.strip()], r_list, s_list,
                      list(overrides or []), probe=probe, jobs=jobs)
    if res["probe"]:
        p = res["probe"]
        typer.echo("probe " + "  ".join(f"{k} {v:.4f} (layer {p['headline_layer'][k]})" for k, v in p["headline"].items()))
    _echo_dice_summary(res["summary"], out / "compare.md")


@experiment_app.command("ablation")
def ablation(
    config: Path = typer.Option(..., "--config", "-c", help="AR pretraining config the variants change (e.g. configs/ar_tiny.yaml)."),
    seg_config: Path = typer.Option(..., "--seg-config", help="Segmentation config scoring each encoder "
                                    "(e.g. configs/seg_phantom_v2.yaml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Experiment folder (re-running reuses finished runs)."),
    variants: str = typer.Option(",".join(("full", "causal", "stride4", "stride12", "spatial", "spatial+contrast")),
                                 "--variants", help="Comma-separated variants (docs/reproducing.md lists what each changes)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Pretraining steps of every variant (default: the config's)."),
    ratio: float = typer.Option(0.1, "--ratio", help="Label ratio of the fine-tuning score."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated fine-tuning seeds."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="The per-token probe of every variant's encoder."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Fine-tunings run at once."),
    overrides: List[str] = typer.Argument(None, help="Pretraining config overrides key=value (every variant)."),
    seg_override: List[str] = typer.Option([], "--seg", help="A fine-tuning override key=value (repeatable)."),
) -> None:
    """AR-SSL4M's Table 4: pretrain each variant, score its probe and its fine-tuning at few labels."""
    from voxseq.tasks.experiments import run_ablation

    _reads_config_data()
    res = run_ablation(config, seg_config, out, [v.strip() for v in variants.split(",") if v.strip()], steps, ratio,
                       _numbers(seeds, int, "--seeds"), list(overrides or []), list(seg_override), probe=probe, jobs=jobs)
    dice = {r["arm"]: r["mean"] for r in res["summary"]}
    for name in ["scratch", *res["variants"]]:
        pr = res.get("probe", {}).get("random" if name == "scratch" else name)
        typer.echo(f"{name:18s} probe {'-' if pr is None else f'{pr:.4f}'}  Dice {dice.get(name, float('nan')):.4f}")
    typer.echo(f"-> {out / 'ablation.md'}")


def _echo_dice_summary(rows: list[dict], table: Path) -> None:
    for row in rows:
        typer.echo(f"ratio {row['ratio']:g} {row['arm']:14s} Dice {row['mean']:.4f} +- {row['std']:.4f} (n={row['n']})")
    typer.echo(f"-> {table}")


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        raise VoxseqError(f"{flag} {text!r}: expected comma-separated numbers") from None


# ---------------------------------------------------------------------------- embed


@app.command()
def embed(
    files: List[Path] = typer.Argument(..., help="Volume files or DICOM folders."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npz."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A checkpoint file or run folder (its latest)."),
    random_init: Optional[str] = typer.Option(None, "--random-init", help="A randomly initialised preset (tiny, small, base, large): a baseline."),
    per_token: bool = typer.Option(False, "--per-token", help="Per-token features (N, E) and voxel_ijk (N, 3) of one file."),
    window: str = typer.Option("whole", "--window", help="whole: one sequence per volume; pretraining: overlapping "
                               "windows of the geometry the encoder was trained on (bounded memory for large scans; "
                               "whole volumes for rotary / unknown encoders); or ZxYxX voxels, e.g. 64x64x64."),
    overlap: float = typer.Option(0.5, "--overlap", help="Fraction of a window shared by neighbouring windows."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Block N (1..depth), mean (of all blocks) or last (the "
                                        "final normalised output). Default: the middle block of AR-SSL4M pretraining "
                                        "runs, last for every other checkpoint."),
    nonfinite: str = typer.Option("error", "--nonfinite", help=NONFINITE_HELP),
) -> None:
    """Encoder features of volumes, with the checkpoint's own preprocessing."""
    import numpy as np

    from voxseq.models.features import describe_geometry
    from voxseq.tasks.encoders import embed_file, embedding_setup, encoder_from_checkpoint, random_encoder

    if (checkpoint is None) == (random_init is None):
        raise VoxseqError("give exactly one of --checkpoint and --random-init")
    if per_token and len(files) != 1:
        raise VoxseqError("--per-token embeds one file at a time")
    if checkpoint is not None:
        encoder, pre, meta, report = encoder_from_checkpoint(checkpoint)
        typer.echo(f"encoder from {checkpoint}: {report.summary().splitlines()[0]}")
    else:
        encoder, pre = random_encoder(random_init)
        meta = {}
    _reads_volumes(nonfinite)
    chosen, window_zyx = embedding_setup(encoder, meta, layer, window)
    typer.echo(f"layer {chosen}, {describe_geometry(window_zyx, overlap)}")
    results = [embed_file(encoder, pre, f, per_token=per_token, window_zyx=window_zyx, layer=chosen, overlap=overlap,
                          nonfinite=nonfinite) for f in files]
    out.parent.mkdir(parents=True, exist_ok=True)
    if per_token:
        np.savez(out, features=results[0]["features"], voxel_ijk=results[0]["voxel_ijk"], path=str(files[0]))
        typer.echo(f"{results[0]['features'].shape[0]} tokens x {results[0]['features'].shape[1]} features -> {out}")
    else:
        np.savez(out, features=np.stack([r["features"] for r in results]), paths=np.array([str(f) for f in files]))
        typer.echo(f"{len(files)} volume(s) x {results[0]['features'].shape[0]} features -> {out}")


# ---------------------------------------------------------------------------- manifest


@app.command()
def manifest(
    root: Path = typer.Argument(..., help="Dataset folder (or CSV file) in its usual layout."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest file to write (.jsonl)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="msd, brats, deeplesion, ctrate, radgenome, la, ricord, nodulemnist3d, folder, csv (default: detect)."),
) -> None:
    """Build a voxseq manifest from a public dataset layout, a folder or a CSV."""
    from voxseq.data.adapters import build_manifest, detect_dataset
    from voxseq.data.manifest import write_manifest

    kind = adapter or detect_dataset(root)
    records = build_manifest(kind, root.resolve())  # absolute paths: the manifest may live anywhere
    write_manifest(records, out)
    splits = {s: sum(r.split == s for r in records) for s in ("train", "val", "test")}
    typer.echo(f"{kind}: {len(records)} record(s) {splits} -> {out}")


# ---------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Folder for the demo's cache, runs and report."),
    quick: bool = typer.Option(False, "--quick", help="A shorter run (fewer phantoms and steps)."),
    fresh: bool = typer.Option(False, "--fresh", help="Redo every step instead of reusing finished ones."),
) -> None:
    """Run the whole pipeline on bundled real samples and synthetic phantoms, on CPU."""
    from voxseq.tasks.demo import run_demo

    run_demo(out, quick=quick, fresh=fresh)


def _leave_process_group(finished: bool) -> None:
    """A command run under torchrun leaves its process group before the interpreter exits: left to the exit
    handlers, gloo's threads can be torn down while still running and abort the process (SIGABRT). After a
    finished command the ranks first meet at a barrier; after an error they do not wait for each other."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        if finished:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``voxseq`` console script."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    rc = 1
    try:
        rc = _main(argv, debug)
        return rc
    finally:
        _leave_process_group(rc == 0)


def _main(argv: list[str] | None, debug: bool) -> int:
    try:
        rc = app(args=argv, standalone_mode=False)  # returns the exit code of typer.Exit
    except VoxseqError as e:
        if debug:
            raise
        _err(str(e))
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit):
            return e.code if isinstance(e.code, int) else 1
        _err("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's promise is one line, not a traceback
        if isinstance(e, typer.TyperException):  # usage errors: typer prints them itself
            e.show()
            return e.exit_code
        if isinstance(e, typer.Abort):
            _err("aborted")
            return 1
        if debug:
            raise
        _err(f"{type(e).__name__}: {e} (run with --debug for the traceback)")
        return 1
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
