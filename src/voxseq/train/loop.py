"""One training engine for every task (pretraining and fine-tuning alike).

A task supplies what is its own: the model, its optimisers, the batch of each (step, micro-step), the
loss of a batch (with a few numbers to log), the metadata of its checkpoints and any state beyond the
model, optimisers and RNG that an exact resume needs. :func:`fit` owns everything else, once:
distributed init, seeding, resume, DDP/FSDP2 wrapping, torch.compile, the lr schedule (warmup +
cosine), gradient accumulation with ``no_sync``, autocast, clipping, the all-reduced loss, the
non-finite guard, metrics.jsonl, the progress bar and atomic checkpoints. The loop never knows the
loss: the task returns it (as MAE's ``engine_pretrain.train_one_epoch`` and open_clip's
``train_one_epoch`` do).

Task configs stay flat (``max_steps=1000``, ``lr=...`` at their top level, as the YAML files and
``key=value`` overrides have them); :meth:`TrainConfig.of` reads the shared fields from one.

Exact resume: the schedule is a function of the step, the model/optimiser/RNG states and the task's
:meth:`TrainTask.state_dict` are restored, and batches are a function of the step (or of restored
state), so the steps after ``resume=True`` reproduce an uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from voxseq import VoxseqError
from voxseq.config import save_yaml
from voxseq.train import distributed as dist_utils
from voxseq.checkpoint import checkpoint_to_resume, load_state_dict_checked, set_rng_state
from voxseq.train.guards import NonFiniteGuard, clip_gradients
from voxseq.train.metrics import MetricsLogger, Progress
from voxseq.train.optim import set_lr_all, warmup_cosine


@dataclass
class TrainConfig:
    """The fields every training run shares. Task configs carry them flat, under these names."""

    max_steps: int = 1000
    lr: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0: no clipping (the norm is still measured and logged)
    grad_accum: int = 1  # micro-batches per optimiser step
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; bf16; fp32
    distributed: str = "ddp"  # ddp | fsdp2 | none (under torchrun)
    device: str = "auto"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    seed: int = 0
    max_nonfinite_steps: int = 5  # skip steps with a non-finite loss or gradient; stop after this many in a row
    compile: bool = False

    @classmethod
    def of(cls, task_cfg: Any, **defaults: Any) -> TrainConfig:
        """The shared fields of a flat task config: the task config's own value where it has the field,
        else ``defaults``, else this class's default."""
        values = {}
        for f in dataclasses.fields(cls):
            if hasattr(task_cfg, f.name):
                values[f.name] = getattr(task_cfg, f.name)
            elif f.name in defaults:
                values[f.name] = defaults[f.name]
        return cls(**values)


@dataclass
class RunContext:
    """Where and how this process trains; handed to the task's hooks."""

    run_dir: Path
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    resume: bool
    progress: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return dist_utils.autocast_context(self.device, self.cfg.precision)


@dataclass
class StepInfo:
    """One finished optimiser step, for the task's metrics row."""

    step: int
    loss: float  # mean over micro-steps, all-reduced over ranks
    lr: float  # the base lr of this step
    grad_norm: float  # before clipping
    seconds: float
    world: int
    logs: list[dict[str, float]]  # what the task's loss returned, one dict per micro-step (this rank)

    def total(self, key: str) -> float:
        return sum(float(d.get(key, 0.0)) for d in self.logs)

    def per_second(self, key: str) -> float:
        """``key`` summed over micro-steps, times the world size, per second of this step."""
        return self.total(key) * self.world / self.seconds


class TrainTask:
    """The task protocol of :func:`fit`, with defaults for the optional hooks.

    Required: :meth:`build_model`, :meth:`build_optimizers`, :meth:`batch`, :meth:`loss`,
    :meth:`config_dict`, :meth:`meta`."""

    per_rank_state = False  # True: each rank's state_dict differs (its own batch generator) and is saved per rank

    def description(self, model: nn.Module) -> str:
        """The progress bar's label."""
        return "train"

    def setup(self, ctx: RunContext) -> None:
        """Before the model: prepare data (the cache...). Runs after seeding, on every rank."""

    def build_model(self, ctx: RunContext) -> nn.Module:
        """The plain (unwrapped) model; :func:`fit` moves it to the device."""
        raise NotImplementedError

    def build_optimizers(self, model: nn.Module, ctx: RunContext) -> list[torch.optim.Optimizer]:
        """Optimisers over ``model``'s parameters (called after DDP/FSDP2 wrapping, so after sharding).
        Each param group's lr is ``lr * lr_scale``, set every step from the schedule."""
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        """What ``RUN_DIR/config.yaml`` holds."""
        raise NotImplementedError

    def start(self, step: int, ctx: RunContext) -> None:
        """Training begins (or resumes) at ``step``: build loaders and samplers from it."""

    def batch(self, step: int, micro: int) -> Any:
        """The batch of one micro-step."""
        raise NotImplementedError

    def loss(self, net: nn.Module, batch: Any, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss of the batch, numbers to log). Runs under autocast; ``net`` may be wrapped."""
        raise NotImplementedError

    def row(self, info: StepInfo) -> dict[str, Any]:
        """The metrics.jsonl row of a logged step (called on every rank; rank 0 writes it)."""
        return {"step": info.step, "loss": info.loss, "lr": info.lr, "grad_norm": info.grad_norm,
                "step_time_s": info.seconds}

    def progress_info(self, info: StepInfo) -> dict[str, float]:
        """Extra numbers beside loss and lr on the progress bar."""
        return {}

    def meta(self, final: bool) -> dict[str, Any]:
        """Checkpoint metadata; ``final`` for the checkpoint of the last step (a task may evaluate here).
        Called on every rank (rank 0 writes it), so an evaluation of an FSDP2-sharded model works."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Task state an exact resume needs beyond model, optimisers and RNG (tensors, plain containers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` from the training state of the checkpoint resumed from."""

    def on_end(self, summary: dict[str, Any]) -> dict[str, Any]:
        """After the last step (plots...); returns the run's summary."""
        return summary


def _optimizer_arg(optimizers: list[torch.optim.Optimizer]):
    return optimizers[0] if len(optimizers) == 1 else optimizers


def _task_state(task: TrainTask, world: int) -> dict[str, Any]:
    """The task's resume state; with ``per_rank_state`` under torchrun, every rank's (a collective)."""
    state = task.state_dict()
    if not task.per_rank_state or world == 1:
        return state
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, state)
    return {"per_rank": gathered}


def _own_task_state(task: TrainTask, state: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    if "per_rank" not in state:
        return state
    if len(state["per_rank"]) != world:
        raise VoxseqError(f"the checkpoint holds the batch state of {len(state['per_rank'])} processes: resume on as many, "
                          f"not {world}")
    return state["per_rank"][rank]


def fit(task: TrainTask, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Train ``task`` to ``cfg.max_steps``; returns a summary (run folder, steps, first/last loss, seconds,
    rank), or ``{"run_dir", "steps", "message": "already finished"}`` when resuming a finished run."""
    rank, world, _ = dist_utils.init_distributed()
    ctx = RunContext(Path(run_dir), cfg, rank, world, dist_utils.pick_device(cfg.device), resume, progress)
    main, device, run_dir = ctx.main, ctx.device, ctx.run_dir
    torch.manual_seed(cfg.seed + rank)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    task.setup(ctx)

    model = task.build_model(ctx).to(device)
    ck = checkpoint_to_resume(run_dir, resume)
    if ck is not None:  # full weights into the plain module, before DDP/FSDP2 wrap (and shard) it
        load_state_dict_checked(model, ck.state_dict, strict=True)
    net = dist_utils.wrap_model(model, cfg.distributed, device)
    optimizers = task.build_optimizers(model, ctx)  # after FSDP2's sharding
    start = ck.step if ck is not None else 0
    if ck is not None and start < cfg.max_steps:
        state = ck.training_state()
        dist_utils.load_full_optimizer_state(model, _optimizer_arg(optimizers), state["optimizer"])
        set_rng_state(state["rng"])
        task.load_state_dict(_own_task_state(task, state, rank, world))
    if main:
        save_yaml(task.config_dict(), run_dir / "config.yaml")
    if start >= cfg.max_steps:
        return {"run_dir": str(run_dir), "steps": start, "message": "already finished"}
    if cfg.compile:
        net = torch.compile(net)

    task.start(start, ctx)
    logger = MetricsLogger(run_dir, resume_step=start - 1 if resume else None, enabled=main)
    bar = Progress(cfg.max_steps, start, task.description(model), enabled=main and progress)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, run_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    accum = cfg.grad_accum
    first_loss = last_loss = None
    t_run = time.perf_counter()
    try:
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            lr = set_lr_all(optimizers, cfg.lr, warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
            loss_sum, logs = 0.0, []
            for micro in range(accum):
                batch = task.batch(step, micro)
                sync = micro == accum - 1 or not hasattr(net, "no_sync")
                with net.no_sync() if not sync else contextlib.nullcontext(), ctx.autocast():
                    loss, micro_logs = task.loss(net, batch, step, micro)
                (loss / accum).backward()
                loss_sum += loss.item()
                logs.append(micro_logs)
            grad_norm = clip_gradients(params, cfg.grad_clip)
            loss_val = float(dist_utils.all_reduce_mean(torch.tensor(loss_sum / accum)))
            info = StepInfo(step, loss_val, lr, grad_norm, time.perf_counter() - t0, world, logs)
            if guard.should_skip(step, loss_val, grad_norm):  # no update; the run stops after too many in a row
                logger.log({"step": step, "skipped": "non-finite loss or gradient", "lr": lr})
            else:
                for opt in optimizers:
                    opt.step()
                first_loss = loss_val if first_loss is None else first_loss
                last_loss = loss_val
                if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
                    logger.log(task.row(info))
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            bar.update(step + 1, loss=loss_val, lr=lr, **task.progress_info(info))
            done = step + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                dist_utils.save_training_checkpoint(run_dir, done, model, _optimizer_arg(optimizers), main=main,
                                                    meta=task.meta(done == cfg.max_steps),
                                                    keep_last=cfg.keep_checkpoints, extra_state=_task_state(task, world))
    finally:
        bar.close()
        logger.close()
    return task.on_end({"run_dir": str(run_dir), "steps": cfg.max_steps, "first_loss": first_loss,
                        "last_loss": last_loss, "seconds": time.perf_counter() - t_run, "rank": rank})


__all__ = ["RunContext", "StepInfo", "TrainConfig", "TrainTask", "fit"]
