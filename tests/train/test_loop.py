"""The training engine on a toy task: gradient accumulation equals a larger batch, ``no_sync`` on all
but the last micro-step, exact resume, the flat task configs read through TrainConfig.of."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn

from voxseq.config import to_dict
from voxseq.train.checkpoint import load_checkpoint
from voxseq.train.loop import StepInfo, TrainConfig, TrainTask, fit
from voxseq.train.metrics import read_metrics
from voxseq.train.optim import build_optimizer, param_groups

N = 64


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.sync_off = []  # (entered no_sync) per micro-step

    @contextlib.contextmanager
    def no_sync(self):  # what DDP offers; here it records when the engine asks for it
        self.sync_off.append(True)
        yield

    def forward(self, x):
        return self.net(x)[:, 0]


class ToyTask(TrainTask):
    """Regression on fixed data; the micro-batch of (step, micro) is a slice, so accumulating
    ``a`` micro-batches of ``b`` rows reads the rows of one batch of ``a * b``."""

    def __init__(self, cfg: TrainConfig, batch_size: int):
        self.cfg, self.batch_size = cfg, batch_size
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(N, 6, generator=g)
        self.y = torch.sin(self.x.sum(1)) + 0.1 * torch.randn(N, generator=g)

    def build_model(self, ctx):
        self.model = Toy()
        return self.model

    def build_optimizers(self, model, ctx):
        return [build_optimizer(param_groups(model, self.cfg.weight_decay), self.cfg.lr, self.cfg.betas)]

    def config_dict(self):
        return to_dict(self.cfg)

    def meta(self, final):
        return {"task": "toy"}

    def batch(self, step, micro):
        start = (step * self.cfg.grad_accum + micro) * self.batch_size % N
        idx = torch.arange(start, start + self.batch_size) % N
        return self.x[idx], self.y[idx]

    def loss(self, net, batch, step, micro):
        x, y = batch
        return ((net(x) - y) ** 2).mean(), {"rows": len(x)}

    def row(self, info: StepInfo):
        return {**super().row(info), "rows": info.total("rows")}


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=8, lr=0.02, warmup_steps=2, min_lr_ratio=0.1, grad_clip=0.5, checkpoint_every=4,
                device="cpu", precision="fp32", seed=3)
    return TrainConfig(**{**base, **kw})


def _run(tmp_path: Path, name: str, accum: int, batch: int, **kw) -> tuple[ToyTask, Path]:
    cfg = _cfg(grad_accum=accum, **kw)
    task = ToyTask(cfg, batch)
    fit(task, cfg, tmp_path / name, progress=False)
    return task, tmp_path / name


def test_accumulating_two_micro_batches_equals_one_batch_twice_as_large(tmp_path):
    big, big_dir = _run(tmp_path, "big", accum=1, batch=8)
    acc, acc_dir = _run(tmp_path, "acc", accum=2, batch=4)
    rows_big, rows_acc = read_metrics(big_dir), read_metrics(acc_dir)
    assert [r["step"] for r in rows_acc] == list(range(8)) and all(r["rows"] == 8 for r in rows_acc + rows_big)
    for a, b in zip(rows_acc, rows_big):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-6)
        assert a["lr"] == b["lr"]
    for (k, a), (_, b) in zip(acc.model.state_dict().items(), big.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5), k
    # no gradient sync on the first of each step's two micro-steps, and only there
    assert len(acc.model.sync_off) == 8 and not big.model.sync_off
    saved = load_checkpoint(acc_dir).state_dict
    assert all(torch.equal(saved[k], v) for k, v in acc.model.state_dict().items())


def test_resume_continues_exactly(tmp_path):
    full, full_dir = _run(tmp_path, "full", accum=2, batch=4)
    _run(tmp_path, "cut", accum=2, batch=4)
    (tmp_path / "cut" / "checkpoints" / "model_00000008.json").unlink()  # as if killed after step 4's checkpoint
    cfg = _cfg(grad_accum=2)
    resumed = ToyTask(cfg, 4)
    summary = fit(resumed, cfg, tmp_path / "cut", resume=True, progress=False)
    assert summary["steps"] == 8
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_time_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "cut")) == strip(read_metrics(full_dir))
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()))
    again = fit(ToyTask(cfg, 4), cfg, tmp_path / "cut", resume=True, progress=False)
    assert again["message"] == "already finished"


def test_train_config_reads_the_flat_task_configs():
    from voxseq.tasks.finetune_cls import ClsConfig
    from voxseq.tasks.finetune_seg import SegConfig
    from voxseq.tasks.pretrain_ar import ARPretrainConfig

    ar = TrainConfig.of(ARPretrainConfig(max_steps=7, lr=0.5, grad_accum=3))
    assert (ar.max_steps, ar.lr, ar.grad_accum, ar.keep_checkpoints) == (7, 0.5, 3, 3)
    seg = TrainConfig.of(SegConfig(), betas=[0.9, 0.999])
    assert (seg.lr, seg.warmup_steps, seg.betas, seg.weight_decay) == (3e-4, 50, [0.9, 0.999], 0.05)
    cls = TrainConfig.of(ClsConfig())
    assert (cls.min_lr_ratio, cls.grad_clip, cls.max_steps) == (0.0, 1.0, 300)
