"""`voxseq pretrain vlp`: SigVLP vision-language pretraining on CT chunks paired with organ sentences.

Wires the cache, the chunk-text sampler (variable-thickness z-chunks packed into rows, each chunk
attending to itself only, computed chunk by chunk), the SigVLP two-tower model and the SigLIP loss
(negatives exchanged between ranks), with Muon for the hidden weight matrices + AdamW for the rest (or AdamW alone), as a task on
the training engine (``voxseq.train.loop``): warmup + cosine, gradient clipping, bf16 autocast on
GPUs, DDP/FSDP2 under torchrun, atomic checkpoints and exact resume (batches are a pure function of
the step and rank).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from voxseq import VoxseqError
from voxseq.config import load_config, require_at_least, to_dict
from voxseq.data.preprocess import Preprocess
from voxseq.models.hub import load_model, model_class_name
from voxseq.models.vit3d import count_params
from voxseq.models.vlp import SigVLP, VLPModelConfig, load_tokenizer, tokenize, vlp_meta
from voxseq.objectives.siglip import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, SigLipLoss, key_tensor
from voxseq.sequence.chunks import ChunkBatchSampler, ChunkConfig, ChunkTextDataset, collate_packed, padding_waste
from voxseq.tasks.data import DataConfig, training_cache
from voxseq.train.loop import RunContext, StepInfo, TrainConfig, TrainTask, fit
from voxseq.train.metrics import read_metrics
from voxseq.train.optim import build_optimizers


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
    init: str | None = None  # an AR-SSL4M (or MAE) run or checkpoint whose encoder starts the vision tower
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


class VLPPretrainTask(TrainTask):
    """SigVLP on the engine: packed chunk-text batches, the two towers and the SigLIP loss."""

    def __init__(self, cfg: VLPPretrainConfig):
        self.cfg = cfg

    def setup(self, ctx: RunContext) -> None:
        cfg, self.ctx = self.cfg, ctx
        self.source = source = training_cache(cfg.data, ctx.run_dir, cfg.data.split, main=ctx.main, progress=ctx.progress)
        channels = {int(source.entry(i).get("channels", 1)) for i in range(len(source))}
        if channels != {cfg.model.vision.in_chans}:
            raise VoxseqError(f"the cache's volumes have {sorted(channels)} channel(s) (preprocess.hu_windows gives one "
                              f"per window) but model.vision.in_chans is {cfg.model.vision.in_chans}")
        self.dataset = ChunkTextDataset(source, cfg.chunks)
        self.tokenizer = load_tokenizer(cfg.model.text_model)
        self.max_len = cfg.text_max_length or cfg.model.text_max_length
        self.loss_fn = SigLipLoss()

    def build_model(self, ctx: RunContext) -> SigVLP:
        self.model = SigVLP(self.cfg.model, SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS)
        # a resumed run then loads its own checkpoint over these weights
        self.init_report = init_vision_tower(self.model, self.cfg.init) if self.cfg.init else None
        return self.model

    def build_optimizers(self, model, ctx):
        cfg = self.cfg
        return build_optimizers(model, cfg.optimizer, cfg.lr, cfg.weight_decay, tuple(cfg.betas),
                                lr_scales={"logit_scale": cfg.logit_lr_scale, "logit_bias": cfg.logit_lr_scale})

    def description(self, model) -> str:
        return f"pretrain vlp ({count_params(model) / 1e6:.1f}M params)"

    def config_dict(self) -> dict[str, Any]:
        return {**to_dict(self.cfg), "preprocess": to_dict(self.source.preprocess)}

    def meta(self, final: bool) -> dict[str, Any]:
        return {"task": "pretrain-vlp", "config": to_dict(self.cfg), "preprocess": to_dict(self.source.preprocess),
                **vlp_meta(self.cfg.model), "model_class": model_class_name(SigVLP),
                **({"init": self.init_report} if self.init_report else {})}

    def start(self, step: int, ctx: RunContext) -> None:
        cfg = self.cfg
        sampler = ChunkBatchSampler(cfg.chunks_per_batch, start_step=step, num_steps=cfg.max_steps - step,
                                    world_size=ctx.world, rank=ctx.rank)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.data.loader_workers,
                                             collate_fn=functools.partial(collate_packed, max_tokens=cfg.max_tokens),
                                             persistent_workers=cfg.data.loader_workers > 0)
        self.batches = iter(loader)  # batches are a pure function of the step and rank

    def batch(self, step: int, micro: int) -> dict[str, Any]:
        return next(self.batches)

    def loss(self, net, batch, step: int, micro: int):
        device, model = self.ctx.device, self.model
        text = {k: v.to(device) for k, v in tokenize(self.tokenizer, batch["text"], self.max_len).items()}
        n = len(batch["text"])
        img, txt = net(batch["tokens"].to(device), batch["pos"].to(device), batch["segment"].to(device), n,
                       text["input_ids"], text["attention_mask"])
        with torch.autocast(device.type, enabled=False):  # the SigLIP loss in fp32
            loss = self.loss_fn(img.float(), txt.float(), model.logit_scale, model.logit_bias,
                                key_tensor(batch["shown_keys"]).to(device), key_tensor(batch["sentence_keys"]).to(device))
        return loss, {"tokens": int((batch["segment"] >= 0).sum()), "chunks": n,
                      "padding_waste": padding_waste(batch["segment"])}

    def row(self, info: StepInfo) -> dict[str, Any]:
        model = self.model
        return {"step": info.step, "loss": info.loss, "lr": info.lr, "tokens_per_s": info.per_second("tokens"),
                "chunks_per_s": info.per_second("chunks"), "padding_waste": info.logs[-1]["padding_waste"],
                "grad_norm": info.grad_norm, "temperature": float(model.logit_scale.detach().exp()),
                "bias": float(model.logit_bias.detach()), "step_time_s": info.seconds}

    def progress_info(self, info: StepInfo) -> dict[str, float]:
        return {"tok_s": info.per_second("tokens")}

    def on_end(self, summary: dict[str, Any]) -> dict[str, Any]:
        if self.ctx.main:
            make_vlp_plots(self.ctx.run_dir, self.cfg, self.dataset, self.tokenizer)
        return summary


def run_pretrain_vlp(cfg: VLPPretrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train; returns a summary (first/last loss, steps, seconds, run folder)."""
    return fit(VLPPretrainTask(cfg), TrainConfig.of(cfg), out, resume=resume, progress=progress)


# ---------------------------------------------------------------------------- loading and figures

INIT_ARCHITECTURE = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")


def init_vision_tower(model: SigVLP, path: str | Path) -> dict[str, Any]:
    """Start ``model``'s vision tower from the encoder of a voxseq run or checkpoint (AR-SSL4M, MAE, another
    SigVLP): every transformer weight, the patch embedding and the final norm. Returns what was loaded.

    Positions need no conversion: voxseq's sin-cos encodings (AR, MAE) are computed from the token grid, not
    learned, so there is nothing to carry over; the rotary tower applies its own 3D rotary positions inside
    attention, and the pretrained weights learn to read them during SigVLP training. The AR start token is
    left behind (SigVLP reads chunks without one). A patch embedding of another channel count is inflated
    (one channel spread evenly over several) or summed (several into one), so a 1-channel AR run starts a
    3-window CT tower. The architecture (``INIT_ARCHITECTURE``) must match."""
    from voxseq.models.hub import encoder_config, load_checkpoint, load_encoder_weights

    ck = load_checkpoint(path)
    src, dst = encoder_config(ck.meta), model.cfg.vision
    differ = [f for f in INIT_ARCHITECTURE if getattr(src, f) != getattr(dst, f)]
    if differ:
        raise VoxseqError(f"{path}: its encoder does not match model.vision in {', '.join(differ)}; set "
                          + " ".join(f"model.vision.{f}={getattr(src, f)}" for f in differ) + " to start from it")
    state = dict(ck.state_dict)
    key = "encoder.patch_embed.weight"
    note = ""
    if key in state and state[key].shape[1] != dst.in_chans:
        w, c = state[key], state[key].shape[1]
        if c == 1:
            state[key] = w.repeat(1, dst.in_chans, 1, 1, 1) / dst.in_chans
        elif dst.in_chans == 1:
            state[key] = w.sum(1, keepdim=True)
        else:
            raise VoxseqError(f"{path}: its patch embedding reads {c} channels, model.vision.in_chans is {dst.in_chans}; "
                              "only 1 -> n and n -> 1 can be converted")
        note = f"; patch embedding {c} -> {dst.in_chans} channel(s)"
    ck.state_dict = state
    report = load_encoder_weights(model.encoder, ck)
    if report.missing or report.mismatched or not report.loaded:
        raise VoxseqError(f"{path}: the encoder weights do not fit the vision tower:\n{report.summary()}")
    return {"path": str(path), "from_task": ck.meta.get("task"), "from_pos_embed": src.pos_embed,
            "loaded": len(report.loaded), "summary": f"loaded {len(report.loaded)} tensors from a "
            f"{ck.meta.get('task', 'voxseq')} encoder ({src.pos_embed} positions -> rotary){note}"}



def vlp_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[SigVLP, Preprocess, dict[str, Any]]:
    """(SigVLP with the checkpoint's weights, its preprocessing, metadata) from a checkpoint or run folder."""
    return load_model(path, expect=model_class_name(SigVLP), device=device,
                      hint="zero-shot and retrieval need the text tower of a `voxseq pretrain vlp` run")


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


__all__ = ["INIT_ARCHITECTURE", "VLPPretrainConfig", "VLPPretrainTask", "init_vision_tower", "load_vlp_config", "make_vlp_plots", "run_pretrain_vlp", "tokenize", "vlp_from_checkpoint"]
