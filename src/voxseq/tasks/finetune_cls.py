"""`voxseq finetune cls`: volume classification on a (pretrained) voxseq ViT.

Each cached volume is resized (trilinear) to ``input_zyx``, encoded, mean-pooled over tokens and
classified by a linear or MLP head. Full fine-tuning (layer-wise lr decay) or a linear probe
(frozen encoder). Metrics on the evaluation splits: AUC, accuracy, sensitivity, specificity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voxseq import VoxseqError
from voxseq.config import from_dict, load_config, save_yaml, to_dict
from voxseq.data.adapters import label_subset
from voxseq.data.preprocess import Preprocess
from voxseq.models.vit3d import ViT3D, ViTConfig
from voxseq.tasks.data import DataConfig, ensure_cache, open_cache
from voxseq.train.checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from voxseq.train.metrics import MetricsLogger, Progress, read_metrics
from voxseq.train.optim import build_optimizer, param_groups_lrd, set_lr, warmup_cosine


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


class Classifier(nn.Module):
    """Encoder -> mean-pooled tokens (B, E) -> logit (B,)."""

    def __init__(self, vit: ViTConfig, head: str = "linear"):
        super().__init__()
        self.encoder = ViT3D(vit)
        e = vit.embed_dim
        if head == "linear":
            self.head = nn.Linear(e, 1)
        elif head == "mlp":
            self.head = nn.Sequential(nn.Linear(e, e), nn.GELU(), nn.Linear(e, 1))
        else:
            raise VoxseqError(f"head must be 'linear' or 'mlp', not {head!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_features(x).mean(1))[:, 0]


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUC (scikit-learn), and accuracy, sensitivity, specificity at ``threshold`` on the probability."""
    from sklearn.metrics import roc_auc_score

    pred = scores >= threshold
    pos, neg = labels == 1, labels == 0
    auc = float(roc_auc_score(labels, scores)) if pos.any() and neg.any() else float("nan")
    return {"auc": auc, "acc": float((pred == pos).mean()),
            "sensitivity": float(pred[pos].mean()) if pos.any() else float("nan"),
            "specificity": float((~pred[neg]).mean()) if neg.any() else float("nan")}


def _volume_tensor(cache, i: int, size) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(cache.image(i), dtype=np.float32))[None]  # (1, C, Z, Y, X)
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)[0]


def run_finetune_cls(cfg: ClsConfig, out: str | Path, init: str | None = None, progress: bool = True) -> dict[str, Any]:
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    vit = cfg.model
    ck = load_checkpoint(init) if init else None
    if ck is not None:
        vit = from_dict(ViTConfig, ck.meta["model"])
        if cfg.use_init_preprocess and "preprocess" in ck.meta:
            cfg.data.preprocess = from_dict(Preprocess, ck.meta["preprocess"])
    if any(s % vit.patch_size for s in cfg.input_zyx):
        raise VoxseqError(f"input_zyx {cfg.input_zyx} must be multiples of the patch size {vit.patch_size}")
    model = Classifier(vit, cfg.head)
    how = "encoder from scratch"
    if ck is not None:
        rep = load_state_dict_checked(model.encoder, ck.state_dict, prefix_map={"encoder.": ""})
        how = f"encoder from {ck.path.name}: {len(rep.loaded)} tensors loaded"
    cfg.model = vit
    ensure_cache(cfg.data, run_dir, progress)
    cache = open_cache(Path(cfg.data.cache) if cfg.data.cache else run_dir / "cache", None, cfg.data.label_map)
    have = [i for i in range(len(cache)) if cfg.label_key in cache.entry(i).get("classes", {})]
    if not have:
        raise VoxseqError(f"no cached volume has the class {cfg.label_key!r} (manifest `classes`)")
    label = {i: float(cache.entry(i)["classes"][cfg.label_key]) for i in have}
    train = [i for i in have if cache.entry(i)["split"] == "train"]
    rng = np.random.default_rng(cfg.seed)
    keep = label_subset([cache.entry(i)["id"] for i in train], cfg.label_ratio, cfg.seed)
    train = [i for i in train if cache.entry(i)["id"] in keep]
    evals = [i for i in have if cache.entry(i)["split"] in cfg.eval_splits]
    if not train or not evals:
        raise VoxseqError(f"need training and evaluation volumes with {cfg.label_key!r}; have {len(train)} / {len(evals)}")
    save_yaml(to_dict(cfg), run_dir / "config.yaml")
    if cfg.linear_probe:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    groups = param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay, model.encoder.num_layers)
    optimizer = build_optimizer(groups, cfg.lr, (0.9, 0.999))
    inputs = {i: _volume_tensor(cache, i, cfg.input_zyx) for i in train + evals}  # small volumes: keep resized
    logger = MetricsLogger(run_dir)
    bar = Progress(cfg.max_steps, 0, f"finetune cls ({how})", enabled=progress)
    t0 = time.perf_counter()
    try:
        for step in range(cfg.max_steps):
            lr = set_lr(optimizer, cfg.lr, warmup_cosine(step, cfg.warmup_steps, cfg.max_steps))
            batch = [train[int(rng.integers(len(train)))] for _ in range(cfg.batch_size)]
            x = torch.stack([inputs[i] for i in batch])
            y = torch.tensor([label[i] for i in batch])
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logger.log({"step": step, "loss": loss.item(), "lr": lr})
            bar.update(step + 1, loss=loss.item(), lr=lr)
    finally:
        bar.close()
        logger.close()
    model.eval()
    with torch.no_grad():
        scores = np.array([torch.sigmoid(model(inputs[i][None]))[0].item() for i in evals])
    metrics = binary_metrics(scores, np.array([label[i] for i in evals]))
    meta = {"task": "finetune-cls", "config": to_dict(cfg), "model": to_dict(vit), "preprocess": to_dict(cfg.data.preprocess),
            "model_class": "Classifier", "init": str(init) if init else None, "eval": metrics}
    save_checkpoint(run_dir, cfg.max_steps, model, meta=meta)
    from voxseq.train.plots import plot_loss_curve

    plot_loss_curve(read_metrics(run_dir), run_dir / "plots" / "loss_curve.png", title="classification loss")
    return {"run_dir": str(run_dir), "metrics": metrics, "how": how, "n_train": len(train), "n_eval": len(evals),
            "seconds": time.perf_counter() - t0}


def load_cls_config(path, overrides=None) -> ClsConfig:
    return load_config(ClsConfig, path, overrides)
