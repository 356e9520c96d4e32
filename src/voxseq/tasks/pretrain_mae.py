"""`voxseq pretrain mae`: masked-autoencoder pretraining of the same 3D ViT (MAE3D), the baseline AR-SSL4M
is compared with.

A task on the training engine beside AR pretraining, sharing its data path: token sequences of the
cache cut by the sequence sampler (configs/mae_tiny.yaml: one 64^3 crop, 512 tokens), of which a
random ``mask_ratio`` is hidden from the encoder; MAE's norm-pixel loss on the hidden tokens. Run
folders, checkpoints (encoder weights under ``encoder.``), ``--resume`` and torchrun work as for
``pretrain ar``, so ``finetune``, ``embed`` and the experiments take an MAE run like an AR one.

Exact resume: masks are a function of (seed, step, micro-step, rank), sequences of their index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from voxseq.config import load_config
from voxseq.models.hub import model_class_name
from voxseq.models.mae import MAEDecoderConfig, MAEViT3D, random_masking
from voxseq.models.vit3d import count_params, flops_per_token
from voxseq.objectives.ar import norm_pixel_loss
from voxseq.tasks.pretrain_ar import ARPretrainConfig, ARPretrainTask
from voxseq.train.loop import RunContext, TrainConfig, fit
from voxseq.train.metrics import read_metrics


@dataclass
class MAEPretrainConfig(ARPretrainConfig):
    """AR pretraining's fields (``random_start`` is not used) plus the mask ratio and the decoder."""

    name: str = "mae"
    mask_ratio: float = 0.75  # MAE's default; MAE3D uses 0.75 as well
    decoder: MAEDecoderConfig = field(default_factory=MAEDecoderConfig)


def load_mae_config(path: str | Path | None, overrides: list[str] | None = None) -> MAEPretrainConfig:
    return load_config(MAEPretrainConfig, path, overrides)


def mask_for_step(cfg: MAEPretrainConfig, step: int, micro: int, rank: int, batch: int, length: int, device):
    """(keep, mask) of one micro-batch, a function of (seed, step, micro-step, rank) only."""
    g = torch.Generator().manual_seed(hash(("mae", cfg.seed, step, micro, rank)) % (2**63))
    return random_masking(batch, length, cfg.mask_ratio, g, device)


class MAEPretrainTask(ARPretrainTask):
    """MAE on the engine: AR pretraining's data and optimiser, a masked-token loss instead of next-token."""

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        length = self.cfg.sequence.seq_len(self.dataset.kinds[0])
        visible = max(1, length - int(round(length * self.cfg.mask_ratio)))
        self.flops_tok = flops_per_token(self.cfg.model, visible) * visible / length  # the encoder's share

    def build_model(self, ctx: RunContext) -> MAEViT3D:
        return MAEViT3D(self.cfg.model, self.cfg.decoder)

    def description(self, model) -> str:
        return f"pretrain mae ({count_params(model) / 1e6:.1f}M params, mask {self.cfg.mask_ratio:g})"

    def meta(self, final: bool) -> dict[str, Any]:
        return {**super().meta(final), "task": "pretrain-mae", "model_class": model_class_name(MAEViT3D)}

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        batch = next(self.batches)
        device = self.ctx.device
        x = batch["tokens"].to(device, non_blocking=True)  # (B, L, C*p^3)
        keep, mask = mask_for_step(self.cfg, step, micro, self.ctx.rank, x.shape[0], x.shape[1], device)
        return {"x": x, "pos": batch["pos"].to(device, non_blocking=True), "keep": keep,
                "mask": mask & batch["valid"].to(device)}

    def loss(self, net, batch, step: int, micro: int):
        x = batch["x"]
        pred = net(x, batch["pos"], batch["keep"])
        loss = norm_pixel_loss(pred, x, batch["mask"], normalize=self.cfg.norm_pix, channels=self.cfg.model.in_chans)
        return loss, {"tokens": x.shape[0] * x.shape[1]}

    def on_end(self, summary: dict[str, Any]) -> dict[str, Any]:
        if self.ctx.main:
            from voxseq.train.plots import plot_loss_curve

            plot_loss_curve(read_metrics(self.ctx.run_dir), self.ctx.run_dir / "plots" / "loss_curve.png",
                            title="MAE pretraining loss")
        return summary


def run_pretrain_mae(cfg: MAEPretrainConfig, out: str | Path, *, resume: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Train; returns a summary (first/last loss, steps, seconds, run folder)."""
    return fit(MAEPretrainTask(cfg), TrainConfig.of(cfg), out, resume=resume, progress=progress)


__all__ = ["MAEPretrainConfig", "MAEPretrainTask", "load_mae_config", "mask_for_step", "run_pretrain_mae"]
