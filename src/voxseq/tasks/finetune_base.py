"""What segmentation and classification fine-tuning share on the training engine: an encoder with a
head, AdamW with MAE's layer-wise lr decay, metrics rows of step/loss/lr, a numpy generator drawing the
batches (saved with each checkpoint, so ``--resume`` continues exactly) and the loss curve at the end."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from voxseq.config import to_dict
from voxseq.train.loop import StepInfo, TrainTask
from voxseq.train.metrics import read_metrics
from voxseq.train.optim import build_optimizer, param_groups_lrd


class FinetuneTask(TrainTask):
    """Subclasses set ``self.cfg``, and in ``setup`` ``self.ctx``, ``self.model`` (with ``.encoder``),
    ``self.how`` and ``self.rng``."""

    kind = "task"  # "seg", "cls": the progress bar's label
    curve_title = "fine-tuning loss"
    per_rank_state = True  # under torchrun each rank draws its own batches

    @staticmethod
    def batch_rng(seed: int, rank: int) -> np.random.Generator:
        """The generator drawing a rank's batches: ``seed`` alone on rank 0 (a one-process run's stream)."""
        return np.random.default_rng(seed if rank == 0 else [seed, rank])

    def build_model(self, ctx):
        return self.model

    def build_optimizers(self, model, ctx):
        cfg = self.cfg
        groups = param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay, model.encoder.num_layers)
        return [build_optimizer(groups, cfg.lr, (0.9, 0.999))]

    def description(self, model) -> str:
        return f"finetune {self.kind} ({self.how})"

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)

    def row(self, info: StepInfo) -> dict[str, Any]:
        return {"step": info.step, "loss": info.loss, "lr": info.lr}

    def state_dict(self) -> dict[str, Any]:
        return {"batch_rng": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "batch_rng" in state:
            self.rng.bit_generator.state = json.loads(state["batch_rng"])

    def on_end(self, summary: dict[str, Any]) -> dict[str, Any]:
        if self.ctx.main:
            from voxseq.train.plots import plot_loss_curve

            run_dir = self.ctx.run_dir
            plot_loss_curve(read_metrics(run_dir), run_dir / "plots" / "loss_curve.png", title=self.curve_title)
        return summary


__all__ = ["FinetuneTask"]
