"""`voxseq pretrain vlp`: SigVLP vision-language pretraining on CT chunks paired with organ sentences.

Wires the cache, the chunk-text sampler (variable-thickness z-chunks packed into rows with
block-diagonal attention), the SigVLP two-tower model and the SigLIP loss (negatives exchanged between
ranks) into the same loop features as AR pretraining: warmup + cosine, Muon for the hidden weight
matrices + AdamW for the rest (or AdamW alone), gradient clipping, bf16 autocast on GPUs, DDP/FSDP2
under torchrun, atomic checkpoints and exact resume (batches are a pure function of the step and rank).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from voxseq import VoxseqError
from voxseq.config import load_config, require_at_least, save_yaml, to_dict
from voxseq.data.preprocess import Preprocess
from voxseq.models.vit3d import count_params
from voxseq.models.vlp import SigVLP, VLPModelConfig, load_tokenizer, vlp_meta
from voxseq.objectives.siglip import SigLipLoss, key_tensor
from voxseq.sequence.chunks import ChunkBatchSampler, ChunkConfig, ChunkTextDataset, collate_packed, padding_waste
from voxseq.tasks.data import DataConfig, ensure_cache, open_cache
from voxseq.train import distributed as dist_utils
from voxseq.train.checkpoint import checkpoint_to_resume, load_checkpoint, load_state_dict_checked
from voxseq.train.guards import NonFiniteGuard, clip_gradients
from voxseq.train.metrics import MetricsLogger, Progress, read_metrics
from voxseq.train.optim import build_optimizers, set_lr_all, warmup_cosine


def _ct_preprocess() -> Preprocess:
    return Preprocess(intensity="window", window="ct", out_range=[-1.0, 1.0])  # HU [-1000, 1000] -> [-1, 1]


def _vlp_data() -> DataConfig:
    return DataConfig(preprocess=_ct_preprocess())


@dataclass
class VLPPretrainConfig:
    name: str = "vlp"
    model: VLPModelConfig = field(default_factory=VLPModelConfig)
    chunks: ChunkConfig = field(default_factory=ChunkConfig)
    data: DataConfig = field(default_factory=_vlp_data)
    chunks_per_batch: int = 32  # chunk-text pairs per process and step (the SigLIP batch)
    max_tokens: int = 4096  # tokens per packed row
    text_max_length: int | None = None  # None: model.text_max_length
    max_steps: int = 1000
    lr: float = 1e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    optimizer: str = "muon"  # muon: Muon for hidden weight matrices + AdamW for the rest; adamw: AdamW alone
    logit_lr_scale: float = 1.0  # lr multiplier of the SigLIP temperature and bias (short runs need them to move)
    grad_clip: float = 1.0
    max_nonfinite_steps: int = 5  # skip steps with a non-finite loss or gradient; stop after this many in a row
    precision: str = "auto"
    compile: bool = False
    distributed: str = "ddp"
    device: str = "auto"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.chunks.patch_size != self.model.vision.patch_size:
            raise VoxseqError(f"chunks.patch_size {self.chunks.patch_size} != model.vision.patch_size "
                              f"{self.model.vision.patch_size}")
        if self.optimizer not in ("muon", "adamw"):
            raise VoxseqError(f"optimizer must be muon or adamw, not {self.optimizer!r}")
        require_at_least(self, 1, "chunks_per_batch", "max_tokens", "max_steps", "checkpoint_every", "log_every")
        require_at_least(self, 0, "max_nonfinite_steps")


def load_vlp_config(path: str | Path | None, overrides: list[str] | None = None) -> VLPPretrainConfig:
    return load_config(VLPPretrainConfig, path, overrides)


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def run_pretrain_vlp(cfg: VLPPretrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train; returns a summary (first/last loss, steps, seconds, run folder)."""
    rank, world, _ = dist_utils.init_distributed()
    main = rank == 0
    device = dist_utils.pick_device(cfg.device)
    run_dir = Path(out)
    torch.manual_seed(cfg.seed + rank)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ensure_cache(cfg.data, run_dir, progress)
    dist_utils.barrier()
    source = open_cache(Path(cfg.data.cache) if cfg.data.cache else run_dir / "cache", cfg.data.split)
    channels = {int(source.entry(i).get("channels", 1)) for i in range(len(source))}
    if channels != {cfg.model.vision.in_chans}:
        raise VoxseqError(f"the cache's volumes have {sorted(channels)} channel(s) (preprocess.hu_windows gives one per "
                          f"window) but model.vision.in_chans is {cfg.model.vision.in_chans}")
    dataset = ChunkTextDataset(source, cfg.chunks)
    tokenizer = load_tokenizer(cfg.model.text_model)
    max_len = cfg.text_max_length or cfg.model.text_max_length

    model = SigVLP(cfg.model).to(device)
    ck = checkpoint_to_resume(run_dir, resume)
    if ck is not None:
        load_state_dict_checked(model, ck.state_dict, strict=True)
    net = dist_utils.wrap_model(model, cfg.distributed, device)
    optimizers = build_optimizers(model, cfg.optimizer, cfg.lr, cfg.weight_decay, tuple(cfg.betas),
                                  lr_scales={"logit_scale": cfg.logit_lr_scale, "logit_bias": cfg.logit_lr_scale})
    start = dist_utils.restore_training_state(model, optimizers, ck) if ck is not None else 0
    if main:
        save_yaml({**to_dict(cfg), "preprocess": to_dict(source.preprocess)}, run_dir / "config.yaml")
    if start >= cfg.max_steps:
        return {"run_dir": str(run_dir), "steps": start, "message": "already finished"}
    if cfg.compile:
        net = torch.compile(net)

    loss_fn = SigLipLoss()
    sampler = ChunkBatchSampler(cfg.chunks_per_batch, start_step=start, num_steps=cfg.max_steps - start,
                                world_size=world, rank=rank)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.loader_workers,
                                         collate_fn=functools.partial(collate_packed, max_tokens=cfg.max_tokens),
                                         persistent_workers=cfg.data.loader_workers > 0)
    logger = MetricsLogger(run_dir, resume_step=start - 1 if resume else None, enabled=main)
    bar = Progress(cfg.max_steps, start, f"pretrain vlp ({count_params(model) / 1e6:.1f}M params)", enabled=main and progress)
    meta = {"task": "pretrain-vlp", "config": to_dict(cfg), "preprocess": to_dict(source.preprocess), **vlp_meta(cfg.model)}
    params = [p for p in model.parameters() if p.requires_grad]
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, run_dir)
    first_loss = last_loss = None
    t_run = time.perf_counter()
    try:
        for step, batch in zip(range(start, cfg.max_steps), loader):
            t0 = time.perf_counter()
            lr = set_lr_all(optimizers, cfg.lr, warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
            text = {k: v.to(device) for k, v in tokenize(tokenizer, batch["text"], max_len).items()}
            n = len(batch["text"])
            with dist_utils.autocast_context(device, cfg.precision):
                img, txt = net(batch["tokens"].to(device), batch["pos"].to(device), batch["segment"].to(device), n,
                               text["input_ids"], text["attention_mask"])
            loss = loss_fn(img.float(), txt.float(), model.logit_scale, model.logit_bias,
                           key_tensor(batch["shown_keys"]).to(device), key_tensor(batch["sentence_keys"]).to(device))
            loss.backward()
            grad_norm = clip_gradients(params, cfg.grad_clip)
            loss_val = float(dist_utils.all_reduce_mean(loss.detach().cpu()))
            dt = time.perf_counter() - t0
            real_tokens = int((batch["segment"] >= 0).sum())
            if guard.should_skip(step, loss_val, grad_norm):  # no update; the run stops after too many in a row
                logger.log({"step": step, "skipped": "non-finite loss or gradient", "lr": lr})
            else:
                for opt in optimizers:
                    opt.step()
                first_loss = loss_val if first_loss is None else first_loss
                last_loss = loss_val
                if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
                    logger.log({"step": step, "loss": loss_val, "lr": lr, "tokens_per_s": real_tokens * world / dt,
                                "chunks_per_s": n * world / dt, "padding_waste": padding_waste(batch["segment"]),
                                "grad_norm": grad_norm, "temperature": float(model.logit_scale.detach().exp()),
                                "bias": float(model.logit_bias.detach()), "step_time_s": dt})
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            bar.update(step + 1, loss=loss_val, lr=lr, tok_s=real_tokens * world / dt)
            done = step + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                dist_utils.save_training_checkpoint(run_dir, done, model, optimizers, main=main, meta=meta,
                                                    keep_last=cfg.keep_checkpoints)
    finally:
        bar.close()
        logger.close()
    seconds = time.perf_counter() - t_run
    if main:
        make_vlp_plots(run_dir, cfg, dataset, tokenizer)
    return {"run_dir": str(run_dir), "steps": cfg.max_steps, "first_loss": first_loss, "last_loss": last_loss,
            "seconds": seconds, "rank": rank}


# ---------------------------------------------------------------------------- loading and figures


def vlp_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[SigVLP, Preprocess, dict[str, Any]]:
    """(SigVLP with the checkpoint's weights, its preprocessing, metadata) from a checkpoint or run folder."""
    from voxseq.config import from_dict

    ck = load_checkpoint(path)
    if "vlp_model" not in ck.meta:
        raise VoxseqError(f"{ck.path}: not a SigVLP checkpoint (task {ck.meta.get('task', '?')}); "
                          "zero-shot and retrieval need the text tower of a `voxseq pretrain vlp` run")
    model = SigVLP(from_dict(VLPModelConfig, ck.meta["vlp_model"]))
    load_state_dict_checked(model, ck.state_dict, strict=True)
    return model.to(device).eval(), from_dict(Preprocess, ck.meta.get("preprocess", {})), ck.meta


@torch.no_grad()
def plot_similarity(model: SigVLP, dataset: ChunkTextDataset, tokenizer, max_len: int, path: Path, n: int = 12) -> Path:
    """Chunk-text similarity of a fresh batch: the diagonal (each chunk's own text) should stand out."""
    from voxseq.train.plots import _plt, save_figure

    model.eval()
    batch = collate_packed([dataset[10**8 + i] for i in range(n)], max_tokens=10**9)
    text = tokenize(tokenizer, batch["text"], max_len)
    img, txt = model(batch["tokens"], batch["pos"], batch["segment"], n, text["input_ids"], text["attention_mask"])
    sim = (img @ txt.T).numpy()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=110)
    im = ax.imshow(sim, cmap="viridis")
    ax.set_xlabel("text")
    ax.set_ylabel("chunk")
    labels = [", ".join(o) or "report" for o in batch["organs"]]
    ax.set_yticks(range(n), [f"{lab} (z {int(a)}-{int(b)})" for lab, a, b in zip(labels, batch["z0"], batch["z1"])], fontsize=7)
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set_title("SigVLP: chunk vs text similarity on held-out samples")
    fig.tight_layout()
    return save_figure(fig, path)


def make_vlp_plots(run_dir: Path, cfg: VLPPretrainConfig, dataset: ChunkTextDataset, tokenizer) -> list[Path]:
    """loss_curve.png and similarity.png, from the saved weights (the live model may be sharded)."""
    from voxseq.train.plots import plot_loss_curve

    model, _, _ = vlp_from_checkpoint(run_dir)
    return [plot_loss_curve(read_metrics(run_dir), run_dir / "plots" / "loss_curve.png", title="SigVLP loss (SigLIP)"),
            plot_similarity(model, dataset, tokenizer, cfg.text_max_length or cfg.model.text_max_length,
                            run_dir / "plots" / "similarity.png")]


__all__ = ["VLPPretrainConfig", "load_vlp_config", "make_vlp_plots", "run_pretrain_vlp", "tokenize", "vlp_from_checkpoint"]
