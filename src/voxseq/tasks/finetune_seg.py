"""`voxseq finetune seg`: UNETR segmentation on a (pretrained) voxseq ViT, and `voxseq predict`.

Training, a task on the engine (``voxseq.train.loop``: warmup + cosine, clipping, the non-finite
guard, autocast, DDP, checkpoints with optimiser state, ``--resume``): random ROI crops from the
cache (half of them centred on a labelled voxel), DiceCE loss (MONAI), AdamW with MAE-style
layer-wise lr decay, Dice per class on the validation split by sliding-window inference (MONAI). ``--init`` loads the encoder of any voxseq
checkpoint and, unless the config sets one, its preprocessing, so that fine-tuning sees volumes
exactly as pretraining did. Predictions are written in each input file's own geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxseq import VoxseqError
from voxseq.config import from_dict, load_config, to_dict
from voxseq.data.adapters import label_subset, split_ids
from voxseq.data.preprocess import Preprocess, to_source_grid
from voxseq.eval.segmentation import (  # noqa: F401 - dice_per_class is importable from here as before
    dice_per_class,
    evaluate_segmentation,
    sliding_predict,
    write_segmentation_report,
)
from voxseq.models.hub import (encoder_config, load_checkpoint, load_encoder_weights, load_model, model_class_name,
                               preprocess_of)
from voxseq.models.unetr import UNETR3D, UNETRConfig
from voxseq.models.vit3d import ViTConfig
from voxseq.sequence.samplers import read_window
from voxseq.tasks.data import DataConfig, open_cache, training_cache
from voxseq.tasks.finetune_base import FinetuneTask
from voxseq.train.loop import RunContext, StepInfo, TrainConfig, fit


CROP_SAMPLING = ("foreground", "class_balanced")


@dataclass
class SegConfig:
    name: str = "seg"
    model: ViTConfig = field(default_factory=ViTConfig)  # replaced by the --init checkpoint's encoder config
    unetr: UNETRConfig = field(default_factory=UNETRConfig)
    data: DataConfig = field(default_factory=DataConfig)
    use_init_preprocess: bool = True  # with --init: train on the checkpoint's preprocessing
    roi_zyx: list[int] = field(default_factory=lambda: [96, 96, 96])
    pos_fraction: float = 0.5  # crops centred on a labelled voxel
    # how that voxel is drawn: "foreground" (any labelled voxel: large organs dominate) or "class_balanced"
    # (a class present in the volume first, uniformly, then one of its voxels: small organs get crops too)
    crop_sampling: str = "foreground"
    # the Dice part of the DiceCE loss: over the whole batch (nnU-Net's batch Dice) rather than crop by crop,
    # where a class absent from a crop costs the full Dice for any probability it gets; and with or without
    # the background class
    dice_batch: bool = False
    dice_background: bool = True
    label_ratio: float = 1.0  # fraction of the training cases used (fixed-seed subset)
    freeze_encoder: bool = False  # train the decoder only, on the encoder's features as they are
    batch_size: int = 2
    max_steps: int = 500
    lr: float = 3e-4
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    overlap: float = 0.5  # sliding-window overlap at inference
    eval_splits: list[str] = field(default_factory=lambda: ["val"])  # splits scored at the end
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 100
    seed: int = 0
    keep_checkpoints: int = 3
    grad_accum: int = 1  # micro-batches of batch_size per optimiser step
    max_nonfinite_steps: int = 5  # skip steps with a non-finite loss or gradient; stop after this many in a row
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    distributed: str = "ddp"  # ddp | fsdp2 (under torchrun)

    def __post_init__(self) -> None:
        if self.crop_sampling not in CROP_SAMPLING:
            raise VoxseqError(f"crop_sampling must be one of {CROP_SAMPLING}, not {self.crop_sampling!r}")
        top = max(self.data.label_map.values(), default=0)
        if top >= self.unetr.out_channels:
            raise VoxseqError(f"data.label_map maps labels to {top}, but unetr.out_channels is {self.unetr.out_channels} "
                              f"(classes 0..{self.unetr.out_channels - 1})")


def labelled_splits(cache, labelled: list[int], seed: int) -> dict[int, str]:
    """The split of each labelled volume; with no validation volume among them, a fixed-seed 80/20
    train/val split of them (so that something is scored)."""
    splits = {i: cache.entry(i)["split"] for i in labelled}
    if not any(s == "val" for s in splits.values()):
        auto = split_ids([cache.entry(i)["id"] for i in labelled], (0.8, 0.2, 0.0), seed=seed)
        splits = {i: auto[cache.entry(i)["id"]] if auto[cache.entry(i)["id"]] != "test" else "val" for i in labelled}
    return splits


def seg_cases(cache, cfg: SegConfig) -> tuple[list[int], list[int]]:
    """The cached volumes a fine-tuning trains on (its ``label_ratio`` subset of the training split, fixed by
    ``seed``) and those it is scored on (``eval_splits``)."""
    labelled = [i for i in range(len(cache)) if cache.entry(i).get("has_label")]
    if not labelled:
        raise VoxseqError("no labelled volumes in the cache: segmentation needs labels")
    splits = labelled_splits(cache, labelled, cfg.seed)
    train = [i for i in labelled if splits[i] == "train"]
    keep = label_subset([cache.entry(i)["id"] for i in train], cfg.label_ratio, cfg.seed)
    return [i for i in train if cache.entry(i)["id"] in keep], [i for i in labelled if splits[i] in cfg.eval_splits]


def load_seg_config(path, overrides=None) -> SegConfig:
    return load_config(SegConfig, path, overrides)


def _class_voxels(lab: np.ndarray, rng) -> dict[int, np.ndarray]:
    """Up to 256 voxels (z, y, x) of each foreground class of a label volume."""
    lab = np.asarray(lab)
    out = {}
    for c in np.unique(lab):
        if c > 0:
            nz = np.argwhere(lab == c)
            out[int(c)] = nz[rng.choice(len(nz), size=min(256, len(nz)), replace=False)]
    return out


def sample_crop(cache, i: int, roi, rng, pos_fraction: float,
                sampling: str = "foreground") -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(C, *roi) image and (*roi) label crop, centred on a random labelled voxel with ``pos_fraction``
    (any labelled voxel, or with ``sampling="class_balanced"`` one of a class drawn uniformly first), and
    the crop's start (z, y, x) in the volume (negative where it is padded)."""
    img, lab = cache.image(i), cache.label(i)
    shape = img.shape[1:]
    if rng.random() < pos_fraction:
        if sampling == "class_balanced":
            per_class = cache.entry(i).get("fg_classes")
            if per_class is None:  # found once per volume
                per_class = cache.entry(i)["fg_classes"] = _class_voxels(lab, rng)
            classes = sorted(per_class)
            fg = per_class[classes[int(rng.integers(len(classes)))]] if classes else np.empty((0, 3), int)
        else:
            fg = cache.entry(i).get("fg_sample")
        if fg is None:  # a few hundred foreground voxels, found once per volume
            nz = np.argwhere(np.asarray(lab) > 0)
            fg = nz[rng.choice(len(nz), size=min(256, len(nz)), replace=False)] if len(nz) else np.empty((0, 3), int)
            cache.entry(i)["fg_sample"] = fg
        if len(fg):
            c = fg[rng.integers(len(fg))]
            start = [int(cz) - r // 2 + int(rng.integers(-r // 4, r // 4 + 1)) for cz, r in zip(c, roi)]
            start = [min(max(s, 0), n - r) if n >= r else s for s, n, r in zip(start, shape, roi)]
        else:
            start = [int(rng.integers(0, max(1, n - r + 1))) if n >= r else -((r - n) // 2) for n, r in zip(shape, roi)]
    else:
        start = [int(rng.integers(0, max(1, n - r + 1))) if n >= r else -((r - n) // 2) for n, r in zip(shape, roi)]
    x, _ = read_window(img, start, roi, 0.0)
    y, _ = read_window(lab[None], start, roi, 0)
    return x.astype(np.float32), y[0].astype(np.int64), start


def crop_batch(cache, cases: list[int], cfg: SegConfig, rng) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training batch of ``cfg.batch_size`` crops (``sample_crop``) from random ``cases``: images
    (B, C, *roi), labels (B, 1, *roi) and each crop's start (B, 3), for encoders with volume positions."""
    crops = [sample_crop(cache, cases[int(rng.integers(len(cases)))], cfg.roi_zyx, rng, cfg.pos_fraction,
                         cfg.crop_sampling) for _ in range(cfg.batch_size)]
    x = torch.from_numpy(np.stack([c[0] for c in crops]))
    y = torch.from_numpy(np.stack([c[1] for c in crops]))[:, None]
    return x, y, torch.tensor([c[2] for c in crops])


def build_seg_model(cfg: SegConfig, init: str | None, load_weights: bool = True) -> tuple[UNETR3D, Preprocess | None, str]:
    """The UNETR with the --init checkpoint's encoder (config and weights) or a fresh one.

    ``load_weights=False`` takes only the checkpoint's architecture and preprocessing: the
    from-scratch baseline of a pretrained-versus-scratch comparison.
    """
    if init is None:
        return UNETR3D(cfg.model, cfg.unetr), None, "encoder from scratch"
    ck = load_checkpoint(init)
    model = UNETR3D(encoder_config(ck.meta), cfg.unetr)
    pre = preprocess_of(ck.meta) if "preprocess" in ck.meta else None
    if not load_weights:
        return model, pre, f"encoder from scratch (architecture of {ck.path.name})"
    report = load_encoder_weights(model.encoder, ck)
    if not report.loaded:
        raise VoxseqError(f"{ck.path}: no encoder weights to initialise from")
    return model, pre, f"encoder from {ck.path.name}: {len(report.loaded)} tensors loaded, {len(report.missing)} missing"


def evaluate_seg(model: UNETR3D, cache, indices: list[int], cfg: SegConfig) -> dict[str, Any]:
    """Dice per class on cached volumes, with the config's ROI, overlap and classes."""
    return evaluate_segmentation(model, cache, indices, cfg.roi_zyx, cfg.overlap, cfg.unetr.out_channels)


class SegTask(FinetuneTask):
    """UNETR fine-tuning on the engine: random ROI crops (half on a labelled voxel), DiceCE loss, AdamW with
    layer-wise lr decay; Dice on the validation cases at the end (in the final checkpoint's metadata)."""

    kind, curve_title = "seg", "segmentation fine-tuning loss"

    def __init__(self, cfg: SegConfig, init: str | None = None, load_weights: bool = True):
        self.cfg, self.init, self.load_weights = cfg, init, load_weights

    def setup(self, ctx: RunContext) -> None:
        from monai.losses import DiceCELoss

        cfg, run_dir = self.cfg, ctx.run_dir
        self.ctx = ctx
        self.model, init_pre, self.how = build_seg_model(cfg, self.init, self.load_weights)
        if init_pre is not None and cfg.use_init_preprocess:
            cfg.data.preprocess = init_pre
        if cfg.freeze_encoder:
            self.model.encoder.requires_grad_(False)
            self.how += ", frozen"
        patch = self.model.encoder.cfg.patch_size
        if any(r % patch for r in cfg.roi_zyx):
            raise VoxseqError(f"roi_zyx {cfg.roi_zyx} must be multiples of the patch size {patch}")
        cfg.model = self.model.encoder.cfg
        self.cache = cache = training_cache(cfg.data, run_dir, None, main=ctx.main, progress=ctx.progress)
        self.train, self.val = seg_cases(cache, cfg)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=cfg.dice_batch,
                                  include_background=cfg.dice_background)
        self._meta = {"task": "finetune-seg", "config": to_dict(cfg), "model": to_dict(cfg.model),
                      "unetr": to_dict(cfg.unetr), "preprocess": to_dict(cfg.data.preprocess),
                      "model_class": model_class_name(UNETR3D),
                      "init": str(self.init) if self.init and self.load_weights else None,
                      "train_ids": [cache.entry(i)["id"] for i in self.train],
                      "val_ids": [cache.entry(i)["id"] for i in self.val]}
        self.rng = self.batch_rng(cfg.seed, ctx.rank)
        self.result: dict[str, Any] | None = None

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, origin = crop_batch(self.cache, self.train, self.cfg, self.rng)
        return x.to(self.ctx.device), y.to(self.ctx.device), origin

    def loss(self, net, batch, step: int, micro: int):
        x, y, origin = batch
        return self.loss_fn(net(x, origin_zyx=origin), y), {}

    def row(self, info: StepInfo) -> dict[str, Any]:
        row = super().row(info)
        if self.cfg.eval_every and (info.step + 1) % self.cfg.eval_every == 0 and self.val:
            row["val_mean_dice"] = evaluate_seg(self.model, self.cache, self.val, self.cfg)["mean_dice"]
        return row

    def meta(self, final: bool) -> dict[str, Any]:
        if not final:
            return self._meta
        # the last step's checkpoint carries the validation Dice (every rank evaluates: FSDP2 shards the model)
        self.result = evaluate_seg(self.model, self.cache, self.val, self.cfg) if self.val else {"mean_dice": float("nan")}
        return {**self._meta, "val": {k: v for k, v in self.result.items() if k != "per_case"}}

    def state_dict(self) -> dict[str, Any]:
        """The crop generator and the foreground voxels drawn so far (drawn from it, once per volume)."""
        entries = [self.cache.entry(i) for i in range(len(self.cache))]
        fg = {str(i): torch.from_numpy(np.asarray(e["fg_sample"], dtype=np.int64))
              for i, e in enumerate(entries) if "fg_sample" in e}
        by_class = {f"{i}:{c}": torch.from_numpy(np.asarray(v, dtype=np.int64))
                    for i, e in enumerate(entries) for c, v in e.get("fg_classes", {}).items()}
        return {**super().state_dict(), "fg_sample": fg, **({"fg_classes": by_class} if by_class else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for i, fg in state.get("fg_sample", {}).items():
            self.cache.entry(int(i))["fg_sample"] = fg.numpy()
        for key, v in state.get("fg_classes", {}).items():
            i, c = (int(x) for x in key.split(":"))
            self.cache.entry(i).setdefault("fg_classes", {})[c] = v.numpy()


def run_finetune_seg(cfg: SegConfig, out: str | Path, init: str | None = None, progress: bool = True,
                     load_weights: bool = True, resume: bool = False) -> dict[str, Any]:
    """Fine-tune; returns a summary (validation Dice, seconds, how the encoder started, case counts).
    ``resume``: continue from the run folder's latest checkpoint (pass the same config and ``init``)."""
    task = SegTask(cfg, init, load_weights)
    r = fit(task, TrainConfig.of(cfg, betas=[0.9, 0.999]), out, resume=resume, progress=progress)
    val = task.result
    if val is None:  # resumed a finished run: the final checkpoint's record
        val = load_checkpoint(out).meta.get("val", {"mean_dice": float("nan")})
    return {"run_dir": str(out), "val": val, "seconds": r.get("seconds", 0.0), "how": task.how,
            "n_train": len(task.train), "n_val": len(task.val)}


def evaluate_checkpoint(checkpoint: str | Path, split: str = "val", out: str | Path | None = None) -> dict[str, Any]:
    """Dice per class of a segmentation checkpoint on a split of the cache it was trained on;
    writes ``evaluation.json`` and ``evaluation.md`` to ``out`` (default: the run folder)."""
    model, _, meta = load_seg_model(checkpoint)
    cfg = from_dict(SegConfig, meta["config"])
    ck_path = load_checkpoint(checkpoint).path
    run_dir = ck_path.parent.parent
    cache = open_cache(Path(cfg.data.cache) if cfg.data.cache else run_dir / "cache", None, cfg.data.label_map)
    wanted = set(meta.get(f"{split}_ids", [])) or {cache.entry(i)["id"] for i in range(len(cache))
                                                    if cache.entry(i)["split"] == split}
    indices = [i for i in range(len(cache)) if cache.entry(i)["id"] in wanted and cache.entry(i).get("has_label")]
    if not indices:
        raise VoxseqError(f"{checkpoint}: no labelled volumes in split {split!r}")
    result = evaluate_seg(model, cache, indices, cfg)
    write_segmentation_report(result, out or run_dir, ck_path, split, len(indices))
    return result


def load_seg_model(checkpoint: str | Path) -> tuple[UNETR3D, Preprocess, dict[str, Any]]:
    """(UNETR, preprocessing, metadata) of a `voxseq finetune seg` checkpoint, through the model hub."""
    return load_model(checkpoint, expect=model_class_name(UNETR3D), hint="use one written by `voxseq finetune seg`")


def predict_files(checkpoint: str | Path, files: list[Path], out_dir: str | Path, nonfinite: str = "error") -> list[Path]:
    """Segment each file with the checkpoint's preprocessing; ``<name>_seg.nii.gz`` in the file's geometry.
    ``nonfinite``: ``"error"`` refuses NaN/Inf voxels, ``"zero"`` replaces them with 0 (as in ``read_volume``)."""
    import SimpleITK as sitk

    from voxseq.io.volume import read_volume

    model, pre, meta = load_seg_model(checkpoint)
    roi = meta["config"]["roi_zyx"]
    overlap = meta["config"].get("overlap", 0.5)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        source = read_volume(f, nonfinite=nonfinite)
        image, _ = pre(source)
        arr = image.array if image.array.ndim == 4 else image.array[None]
        pred = sliding_predict(model, arr, roi, overlap)
        seg = to_source_grid(pred, image, source)
        name = Path(f).name
        for suf in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".npz", ".npy"):
            if name.lower().endswith(suf):
                name = name[: -len(suf)]
                break
        path = out_dir / f"{name}_seg.nii.gz"
        sitk.WriteImage(sitk.Cast(seg, sitk.sitkUInt8), str(path), useCompression=True)
        written.append(path)
    return written
