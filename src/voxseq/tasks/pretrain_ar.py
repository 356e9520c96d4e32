"""`voxseq pretrain ar`: autoregressive pretraining of the 3D ViT on token sequences (AR-SSL4M).

Wires the cache (data), the sequence sampler, the AR model and the norm-pixel objective into one
training loop: AdamW (no decay on norms, biases, special tokens), warmup + cosine, gradient clipping
and accumulation, bf16 autocast on GPUs, optional torch.compile, DDP/FSDP2 under torchrun, atomic
checkpoints and exact resume.

Exact resume: sequences depend only on their global index, prefix lengths on (seed, step, rank),
the schedule on the step, and the model/optimiser/RNG states are restored, so the steps after
``--resume`` reproduce an uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from voxseq import VoxseqError
from voxseq.config import load_config, require_at_least, save_yaml, to_dict
from voxseq.models.vit3d import ARViT3D, ViTConfig, count_params, flops_per_token
from voxseq.objectives.ar import norm_pixel_loss, prefix_loss_mask
from voxseq.sequence import ResumableSampler, SequenceConfig, SequenceDataset, collate_sequences
from voxseq.tasks.data import DataConfig, ensure_cache, open_cache
from voxseq.train import distributed as dist_utils
from voxseq.train.checkpoint import checkpoint_to_resume, load_checkpoint, load_state_dict_checked
from voxseq.train.guards import NonFiniteGuard, clip_gradients
from voxseq.train.metrics import MetricsLogger, Progress, read_metrics
from voxseq.train.optim import build_optimizer, param_groups, set_lr, warmup_cosine


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
        if self.model.in_chans != 1:
            raise VoxseqError("AR pretraining cuts single-channel sub-volumes: model.in_chans must be 1")
        require_at_least(self, 1, "batch_size", "grad_accum", "max_steps", "checkpoint_every", "log_every")
        require_at_least(self, 0, "max_nonfinite_steps")


def load_ar_config(path: str | Path | None, overrides: list[str] | None = None) -> ARPretrainConfig:
    return load_config(ARPretrainConfig, path, overrides)


def prefix_for_step(cfg: ARPretrainConfig, step: int, micro: int, rank: int, batch: int, length: int) -> torch.Tensor:
    """Prefix lengths of one micro-batch, a function of (seed, step, micro-step, rank) only."""
    if not cfg.random_start:
        return torch.zeros(batch, dtype=torch.long)
    g = torch.Generator().manual_seed(hash((cfg.seed, step, micro, rank)) % (2**63))
    return torch.randint(0, length, (batch,), generator=g)


def _batches(loader):
    while True:
        yield from loader


def run_pretrain_ar(cfg: ARPretrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train; returns a summary (first/last loss, steps, seconds, run folder)."""
    rank, world, _ = dist_utils.init_distributed()
    main = rank == 0
    device = dist_utils.pick_device(cfg.device)
    run_dir = Path(out)
    torch.manual_seed(cfg.seed + rank)

    if main:  # one process prepares the cache, the others wait and read it
        run_dir.mkdir(parents=True, exist_ok=True)
        ensure_cache(cfg.data, run_dir, progress)
    dist_utils.barrier()
    source = open_cache(Path(cfg.data.cache) if cfg.data.cache else run_dir / "cache", cfg.data.split)
    dataset = SequenceDataset(source, cfg.sequence)
    seq_len = cfg.sequence.seq_len(dataset.kinds[0])

    model = ARViT3D(cfg.model).to(device)
    ck = checkpoint_to_resume(run_dir, resume)
    if ck is not None:  # full weights into the plain module, before DDP/FSDP2 wrap (and shard) it
        load_state_dict_checked(model, ck.state_dict, strict=True)
    net = dist_utils.wrap_model(model, cfg.distributed, device)
    optimizer = build_optimizer(param_groups(model, cfg.weight_decay), cfg.lr, cfg.betas)  # after FSDP2's sharding
    start = dist_utils.restore_training_state(model, optimizer, ck) if ck is not None else 0
    if main:
        save_yaml({**to_dict(cfg), "preprocess": to_dict(source.preprocess)}, run_dir / "config.yaml")
    if start >= cfg.max_steps:
        return {"run_dir": str(run_dir), "steps": start, "message": "already finished"}

    if cfg.compile:
        net = torch.compile(net)
    per_step = cfg.batch_size * cfg.grad_accum
    sampler = ResumableSampler(start=start * per_step * world, world_size=world, rank=rank)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                         num_workers=cfg.data.loader_workers, collate_fn=collate_sequences,
                                         pin_memory=device.type == "cuda", persistent_workers=cfg.data.loader_workers > 0)
    batches = _batches(loader)
    logger = MetricsLogger(run_dir, resume_step=start - 1 if resume else None, enabled=main)
    bar = Progress(cfg.max_steps, start, f"pretrain ar ({count_params(model) / 1e6:.1f}M params)", enabled=main and progress)
    meta = {"task": "pretrain-ar", "config": to_dict(cfg), "preprocess": to_dict(source.preprocess),
            "model": to_dict(cfg.model), "model_class": "ARViT3D"}
    flops_tok = flops_per_token(cfg.model, seq_len + 1)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, run_dir)
    first_loss = last_loss = None
    t_run = time.perf_counter()
    try:
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            lr = set_lr(optimizer, cfg.lr, warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
            loss_sum, tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                x = batch["tokens"].to(device, non_blocking=True)  # (B, L, p^3)
                pos = batch["pos"].to(device, non_blocking=True)  # (B, L, 4)
                b, length, _ = x.shape
                prefix = prefix_for_step(cfg, step, micro, rank, b, length).to(device)
                mask = prefix_loss_mask(prefix, length) & batch["valid"].to(device)
                sync = micro == cfg.grad_accum - 1 or not hasattr(net, "no_sync")
                ctx = net.no_sync() if not sync else contextlib.nullcontext()
                with ctx, dist_utils.autocast_context(device, cfg.precision):
                    pred = net(x, pos, prefix)
                    loss = norm_pixel_loss(pred, x, mask, normalize=cfg.norm_pix)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
                tokens += b * length
            grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
            loss_val = float(dist_utils.all_reduce_mean(torch.tensor(loss_sum / cfg.grad_accum)))
            dt = time.perf_counter() - t0
            tok_s = tokens * world / dt
            if guard.should_skip(step, loss_val, grad_norm):  # no update; the run stops after too many in a row
                logger.log({"step": step, "skipped": "non-finite loss or gradient", "lr": lr})
            else:
                optimizer.step()
                first_loss = loss_val if first_loss is None else first_loss
                last_loss = loss_val
                if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
                    logger.log({"step": step, "loss": loss_val, "lr": lr, "tokens_per_s": tok_s, "grad_norm": grad_norm,
                                "step_time_s": dt, "model_tflops": tok_s * flops_tok / 1e12})
            optimizer.zero_grad(set_to_none=True)
            bar.update(step + 1, loss=loss_val, lr=lr, tok_s=tok_s)
            done = step + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                dist_utils.save_training_checkpoint(run_dir, done, model, optimizer, main=main, meta=meta,
                                                    keep_last=cfg.keep_checkpoints,
                                                    extra_state={"sampler": sampler.state_dict()})
    finally:
        bar.close()
        logger.close()
    seconds = time.perf_counter() - t_run
    if main:  # plots from the saved full weights: the live model may be sharded across ranks (FSDP2)
        plain = ARViT3D(cfg.model)
        plain.load_state_dict(load_checkpoint(run_dir).state_dict)
        make_ar_plots(run_dir, plain, dataset, torch.device("cpu"))
    return {"run_dir": str(run_dir), "steps": cfg.max_steps, "first_loss": first_loss, "last_loss": last_loss,
            "seconds": seconds, "rank": rank}


# ---------------------------------------------------------------------------- figures


def make_ar_plots(run_dir: Path, model: ARViT3D, dataset: SequenceDataset, device: torch.device) -> list[Path]:
    """loss_curve.png from metrics.jsonl and reconstruction.png: input slices next to predicted tokens."""
    from voxseq.train.plots import plot_loss_curve

    paths = [plot_loss_curve(read_metrics(run_dir), run_dir / "plots" / "loss_curve.png", title="AR pretraining loss")]
    paths.append(plot_reconstruction(model, dataset, run_dir / "plots" / "reconstruction.png", device))
    return paths


@torch.no_grad()
def predict_sequence(model: ARViT3D, item: dict[str, Any], prefix: int, device) -> torch.Tensor:
    """Predicted tokens in pixel units: the normalised prediction mapped back with each target's mean/std."""
    model.eval()
    x = item["tokens"][None].to(device)
    pred = model(x, item["pos"][None].to(device), torch.tensor([prefix], device=device)).float()
    mean = x.mean(-1, keepdim=True)
    std = (x.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    model.train()
    return (pred * std + mean)[0].cpu()


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
    p, grid = cfg.patch_size, cfg.grid
    inp = unpatchify(item["tokens"].reshape(n, k, -1), p, grid)[:, 0]  # (n, D, H, W)
    rec = unpatchify(pred.reshape(n, k, -1), p, grid)[:, 0]
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
    fig.suptitle(f"{['spatial', 'contrast', 'semantic'][item['kind']]} sequence: inputs and next-token predictions")
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["ARPretrainConfig", "load_ar_config", "make_ar_plots", "plot_reconstruction",
           "predict_sequence", "run_pretrain_ar"]
