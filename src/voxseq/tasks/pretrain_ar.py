"""`voxseq pretrain ar`: autoregressive pretraining of the 3D ViT on token sequences (AR-SSL4M).

A task on the training engine (``voxseq.train.loop``): the cache (data), the sequence sampler, the
AR model and the norm-pixel objective, with AdamW (no decay on norms, biases, special tokens); the
engine adds warmup + cosine, gradient clipping and accumulation, bf16 autocast on GPUs, optional
torch.compile, DDP/FSDP2 under torchrun, atomic checkpoints and exact resume.

Exact resume: sequences depend only on their global index, prefix lengths on (seed, step, rank),
the schedule on the step, and the model/optimiser/RNG states are restored, so the steps after
``--resume`` reproduce an uninterrupted run's losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from voxseq import VoxseqError
from voxseq.checkpoint import load_checkpoint
from voxseq.config import load_config, require_at_least, to_dict
from voxseq.models.hub import model_class_name
from voxseq.models.vit3d import ARViT3D, ViTConfig, count_params, flops_per_token
from voxseq.objectives.ar import norm_pixel_loss, prefix_loss_mask, sample_prefix_len
from voxseq.sequence import ResumableSampler, SequenceConfig, SequenceDataset, collate_sequences
from voxseq.tasks.data import DataConfig, training_cache
from voxseq.train.loop import RunContext, StepInfo, TrainConfig, TrainTask, fit
from voxseq.train.metrics import read_metrics
from voxseq.train.optim import build_optimizer, param_groups


@dataclass
class ARPretrainConfig:
    name: str = "ar"
    model: ViTConfig = field(default_factory=ViTConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    max_nonfinite_steps: int = 5  # skip steps with a non-finite loss or gradient; stop after this many in a row
    random_start: bool = True  # prefix length ~ U[0, L-1]; False: pure causal (the paper's ablation)
    norm_pix: bool = True  # regress per-token-normalised voxels (the paper); False: raw voxels (an ablation)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    distributed: str = "ddp"  # ddp | fsdp2 (under torchrun)
    device: str = "auto"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sequence.patch_size != self.model.patch_size:
            raise VoxseqError(f"sequence.patch_size {self.sequence.patch_size} != model.patch_size {self.model.patch_size}")
        require_at_least(self, 1, "batch_size", "grad_accum", "max_steps", "checkpoint_every", "log_every")
        require_at_least(self, 0, "max_nonfinite_steps")


def load_ar_config(path: str | Path | None, overrides: list[str] | None = None) -> ARPretrainConfig:
    return load_config(ARPretrainConfig, path, overrides)


def prefix_for_step(cfg: ARPretrainConfig, step: int, micro: int, rank: int, batch: int, length: int) -> torch.Tensor:
    """Prefix lengths of one micro-batch, a function of (seed, step, micro-step, rank) only."""
    g = torch.Generator().manual_seed(hash((cfg.seed, step, micro, rank)) % (2**63))
    return sample_prefix_len(batch, length, g, random_start=cfg.random_start)


def _batches(loader):
    while True:
        yield from loader


class ARPretrainTask(TrainTask):
    """AR-SSL4M on the engine: sequences from the cache, norm-pixel loss on the tokens after the prefix."""

    def __init__(self, cfg: ARPretrainConfig):
        self.cfg = cfg

    def setup(self, ctx: RunContext) -> None:
        cfg, self.ctx = self.cfg, ctx
        self.source = training_cache(cfg.data, ctx.run_dir, cfg.data.split, main=ctx.main, progress=ctx.progress)
        self.dataset = SequenceDataset(self.source, cfg.sequence, pos_origin=cfg.model.pos_origin,
                                       channels=cfg.model.in_chans)
        self.flops_tok = flops_per_token(cfg.model, cfg.sequence.seq_len(self.dataset.kinds[0]) + 1)

    def build_model(self, ctx: RunContext) -> ARViT3D:
        return ARViT3D(self.cfg.model)

    def build_optimizers(self, model, ctx):
        return [build_optimizer(param_groups(model, self.cfg.weight_decay), self.cfg.lr, self.cfg.betas)]

    def description(self, model) -> str:
        return f"pretrain ar ({count_params(model) / 1e6:.1f}M params)"

    def config_dict(self) -> dict[str, Any]:
        return {**to_dict(self.cfg), "preprocess": to_dict(self.source.preprocess)}

    def meta(self, final: bool) -> dict[str, Any]:
        return {"task": "pretrain-ar", "config": to_dict(self.cfg), "preprocess": to_dict(self.source.preprocess),
                "model": to_dict(self.cfg.model), "model_class": model_class_name(ARViT3D)}

    def start(self, step: int, ctx: RunContext) -> None:
        cfg = self.cfg
        self.sampler = ResumableSampler(start=step * cfg.batch_size * cfg.grad_accum * ctx.world, world_size=ctx.world,
                                        rank=ctx.rank)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=self.sampler,
                                             num_workers=cfg.data.loader_workers, collate_fn=collate_sequences,
                                             pin_memory=ctx.device.type == "cuda",
                                             persistent_workers=cfg.data.loader_workers > 0)
        self.batches = _batches(loader)

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}  # informative: the sampler restarts from the step

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        batch = next(self.batches)
        device = self.ctx.device
        x = batch["tokens"].to(device, non_blocking=True)  # (B, L, C*p^3)
        b, length, _ = x.shape
        prefix = prefix_for_step(self.cfg, step, micro, self.ctx.rank, b, length).to(device)
        return {"x": x, "pos": batch["pos"].to(device, non_blocking=True), "prefix": prefix,
                "mask": prefix_loss_mask(prefix, length) & batch["valid"].to(device)}

    def loss(self, net, batch, step: int, micro: int):
        x = batch["x"]
        pred = net(x, batch["pos"], batch["prefix"])
        loss = norm_pixel_loss(pred, x, batch["mask"], normalize=self.cfg.norm_pix, channels=self.cfg.model.in_chans)
        return loss, {"tokens": x.shape[0] * x.shape[1]}

    def row(self, info: StepInfo) -> dict[str, Any]:
        tok_s = info.per_second("tokens")
        return {"step": info.step, "loss": info.loss, "lr": info.lr, "tokens_per_s": tok_s, "grad_norm": info.grad_norm,
                "step_time_s": info.seconds, "model_tflops": tok_s * self.flops_tok / 1e12}

    def progress_info(self, info: StepInfo) -> dict[str, float]:
        return {"tok_s": info.per_second("tokens")}

    def on_end(self, summary: dict[str, Any]) -> dict[str, Any]:
        if self.ctx.main:  # plots from the saved full weights: the live model may be sharded across ranks (FSDP2)
            plain = ARViT3D(self.cfg.model)
            plain.load_state_dict(load_checkpoint(self.ctx.run_dir).state_dict)
            make_ar_plots(self.ctx.run_dir, plain, self.dataset, torch.device("cpu"))
        return summary


def run_pretrain_ar(cfg: ARPretrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train; returns a summary (first/last loss, steps, seconds, run folder)."""
    return fit(ARPretrainTask(cfg), TrainConfig.of(cfg), out, resume=resume, progress=progress)


# ---------------------------------------------------------------------------- figures


def make_ar_plots(run_dir: Path, model: ARViT3D, dataset: SequenceDataset, device: torch.device) -> list[Path]:
    """loss_curve.png from metrics.jsonl and reconstruction.png: input slices next to predicted tokens."""
    from voxseq.train.plots import plot_loss_curve

    paths = [plot_loss_curve(read_metrics(run_dir), run_dir / "plots" / "loss_curve.png", title="AR pretraining loss")]
    paths.append(plot_reconstruction(model, dataset, run_dir / "plots" / "reconstruction.png", device))
    return paths


@torch.no_grad()
def predict_sequence(model: ARViT3D, item: dict[str, Any], prefix: int, device) -> torch.Tensor:
    """Predicted tokens in pixel units: the normalised prediction mapped back with each target's mean/std
    (per channel, as the target was normalised)."""
    model.eval()
    x = item["tokens"][None].to(device)
    pred = model(x, item["pos"][None].to(device), torch.tensor([prefix], device=device)).float()
    c = model.encoder.cfg.in_chans
    xc = x.reshape(*x.shape[:-1], c, -1)
    mean = xc.mean(-1, keepdim=True)
    std = (xc.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    model.train()
    return (pred.reshape(xc.shape) * std + mean).reshape(x.shape)[0].cpu()


def plot_reconstruction(model: ARViT3D, dataset: SequenceDataset, path: Path, device, index: int = 0) -> Path:
    """For one sequence, the middle slice of each sub-volume (input) next to the model's next-token
    predictions given the first sub-volume as prefix."""
    from voxseq.sequence import unpatchify
    from voxseq.train.plots import _plt, save_figure

    plt = _plt()
    cfg = dataset.cfg
    item = dataset[index]
    k = cfg.tokens_per_subvolume
    n = item["tokens"].shape[0] // k
    pred = predict_sequence(model, item, prefix=k, device=device)
    p, grid, c = cfg.patch_size, cfg.grid, dataset.channels
    inp = unpatchify(item["tokens"].reshape(n, k, -1), p, grid, c)[:, 0]  # (n, D, H, W): the first channel
    rec = unpatchify(pred.reshape(n, k, -1), p, grid, c)[:, 0]
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.4), dpi=110, squeeze=False)
    mid = inp.shape[1] // 2
    lo, hi = float(inp.min()), float(inp.max())
    for i in range(n):
        axes[0, i].imshow(inp[i, mid], cmap="gray", vmin=lo, vmax=hi)
        axes[0, i].set_title(f"input {i}" + (" (prefix)" if i == 0 else ""), fontsize=9)
        if i == 0:  # the prefix is given, not predicted
            axes[1, i].text(0.5, 0.5, "prefix:\ngiven to the model", ha="center", va="center", fontsize=9)
        else:
            axes[1, i].imshow(rec[i, mid], cmap="gray", vmin=lo, vmax=hi)
            axes[1, i].set_title(f"predicted {i}", fontsize=9)
        for a in axes[:, i]:
            a.axis("off")
    fig.suptitle(f"{['spatial', 'contrast', 'semantic'][item['kind']]} sequence: inputs and next-token predictions"
                 + (f" (channel 1 of {c})" if c > 1 else ""))
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["ARPretrainConfig", "ARPretrainTask", "load_ar_config", "make_ar_plots", "plot_reconstruction",
           "predict_sequence", "run_pretrain_ar"]
