"""`voxseq finetune cls`: volume classification on a (pretrained) voxseq ViT.

Each cached volume is resized (trilinear) to ``input_zyx``, encoded, mean-pooled over tokens and
classified by a linear or MLP head. Full fine-tuning (layer-wise lr decay) or a linear probe
(frozen encoder), as a task on the engine (``voxseq.train.loop``: warmup + cosine, clipping, the
non-finite guard, autocast, DDP, checkpoints with optimiser state, ``--resume``). Metrics on the
evaluation splits: AUC, accuracy, sensitivity, specificity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from voxseq import VoxseqError
from voxseq.config import load_config, to_dict
from voxseq.data.adapters import label_subset
from voxseq.models.classifier import Classifier
from voxseq.models.hub import encoder_config, load_checkpoint, load_encoder_weights, model_class_name, preprocess_of
from voxseq.models.vit3d import ViTConfig
from voxseq.tasks.data import DataConfig, training_cache
from voxseq.tasks.finetune_base import FinetuneTask
from voxseq.train.loop import RunContext, TrainConfig, fit


@dataclass
class ClsConfig:
    name: str = "cls"
    model: ViTConfig = field(default_factory=ViTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    use_init_preprocess: bool = True
    label_key: str = "label"  # the record's class column (manifest `classes`), binary 0/1
    input_zyx: list[int] = field(default_factory=lambda: [64, 128, 128])  # RICORD: 64 x 128 x 128
    head: str = "linear"  # linear | mlp
    linear_probe: bool = False  # freeze the encoder, train the head only
    label_ratio: float = 1.0
    batch_size: int = 4
    max_steps: int = 300
    lr: float = 1e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_steps: int = 20
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    seed: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    grad_accum: int = 1  # micro-batches of batch_size per optimiser step
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5  # skip steps with a non-finite loss or gradient; stop after this many in a row
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    distributed: str = "ddp"  # ddp | fsdp2 (under torchrun)


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUC, and accuracy, sensitivity, specificity at the fixed ``threshold`` on the probability: the one
    binary report of ``voxseq.eval.metrics`` with rule "fixed" (fine-tuning has no held-out set to choose
    an operating point on)."""
    from voxseq.eval.metrics import binary_report

    r = binary_report(labels, scores, rule="fixed", threshold=threshold)
    return {k: r[k] for k in ("auc", "acc", "sensitivity", "specificity")}


def _volume_tensor(cache, i: int, size) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(cache.image(i), dtype=np.float32))[None]  # (1, C, Z, Y, X)
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)[0]


class ClsTask(FinetuneTask):
    """Classification fine-tuning (or a linear probe) on the engine: resized volumes, BCE on the logit,
    AdamW with layer-wise lr decay; AUC/accuracy/sensitivity/specificity at the end (in the final
    checkpoint's metadata)."""

    kind, curve_title = "cls", "classification loss"

    def __init__(self, cfg: ClsConfig, init: str | None = None):
        self.cfg, self.init = cfg, init

    def setup(self, ctx: RunContext) -> None:
        cfg, run_dir = self.cfg, ctx.run_dir
        self.ctx = ctx
        vit = cfg.model
        ck = load_checkpoint(self.init) if self.init else None
        if ck is not None:
            vit = encoder_config(ck.meta)
            if cfg.use_init_preprocess and "preprocess" in ck.meta:
                cfg.data.preprocess = preprocess_of(ck.meta)
        if any(s % vit.patch_size for s in cfg.input_zyx):
            raise VoxseqError(f"input_zyx {cfg.input_zyx} must be multiples of the patch size {vit.patch_size}")
        self.model = model = Classifier(vit, cfg.head)
        self.how = "encoder from scratch"
        if ck is not None:
            rep = load_encoder_weights(model.encoder, ck)
            self.how = f"encoder from {ck.path.name}: {len(rep.loaded)} tensors loaded"
        cfg.model = vit
        cache = training_cache(cfg.data, run_dir, None, main=ctx.main, progress=ctx.progress)
        have = [i for i in range(len(cache)) if cfg.label_key in cache.entry(i).get("classes", {})]
        if not have:
            raise VoxseqError(f"no cached volume has the class {cfg.label_key!r} (manifest `classes`)")
        self.label = {i: float(cache.entry(i)["classes"][cfg.label_key]) for i in have}
        train = [i for i in have if cache.entry(i)["split"] == "train"]
        self.rng = self.batch_rng(cfg.seed, ctx.rank)
        keep = label_subset([cache.entry(i)["id"] for i in train], cfg.label_ratio, cfg.seed)
        self.train = [i for i in train if cache.entry(i)["id"] in keep]
        self.evals = [i for i in have if cache.entry(i)["split"] in cfg.eval_splits]
        if not self.train or not self.evals:
            raise VoxseqError(f"need training and evaluation volumes with {cfg.label_key!r}; "
                              f"have {len(self.train)} / {len(self.evals)}")
        if cfg.linear_probe:
            for p in model.encoder.parameters():
                p.requires_grad_(False)
        self.inputs = {i: _volume_tensor(cache, i, cfg.input_zyx) for i in self.train + self.evals}  # small: keep resized
        self.metrics: dict[str, float] | None = None

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = [self.train[int(self.rng.integers(len(self.train)))] for _ in range(self.cfg.batch_size)]
        x = torch.stack([self.inputs[i] for i in batch])
        y = torch.tensor([self.label[i] for i in batch])
        return x.to(self.ctx.device), y.to(self.ctx.device)

    def loss(self, net, batch, step: int, micro: int):
        x, y = batch
        return F.binary_cross_entropy_with_logits(net(x).float(), y), {}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model, device = self.model, self.ctx.device
        model.eval()
        scores = np.array([torch.sigmoid(model(self.inputs[i][None].to(device)).float())[0].item() for i in self.evals])
        model.train()
        return binary_metrics(scores, np.array([self.label[i] for i in self.evals]))

    def meta(self, final: bool) -> dict[str, Any]:
        cfg = self.cfg
        meta = {"task": "finetune-cls", "config": to_dict(cfg), "model": to_dict(cfg.model),
                "preprocess": to_dict(cfg.data.preprocess), "model_class": model_class_name(Classifier),
                "init": str(self.init) if self.init else None}
        if final:  # the last step's checkpoint carries the evaluation (every rank evaluates: FSDP2 shards the model)
            self.metrics = self.evaluate()
            meta["eval"] = self.metrics
        return meta


def run_finetune_cls(cfg: ClsConfig, out: str | Path, init: str | None = None, progress: bool = True,
                     resume: bool = False) -> dict[str, Any]:
    """Fine-tune; returns a summary (evaluation metrics, how the encoder started, case counts, seconds).
    ``resume``: continue from the run folder's latest checkpoint (pass the same config and ``init``)."""
    task = ClsTask(cfg, init)
    r = fit(task, TrainConfig.of(cfg, betas=[0.9, 0.999]), out, resume=resume, progress=progress)
    metrics = task.metrics if task.metrics is not None else load_checkpoint(out).meta.get("eval", {})
    return {"run_dir": str(out), "metrics": metrics, "how": task.how, "n_train": len(task.train),
            "n_eval": len(task.evals), "seconds": r.get("seconds", 0.0)}


def load_cls_config(path, overrides=None) -> ClsConfig:
    return load_config(ClsConfig, path, overrides)
