"""MAE pretraining end to end on tiny phantoms: learning, exact resume, and its encoder used downstream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from voxseq.cli import main
from voxseq.tasks.encoders import encoder_from_checkpoint
from voxseq.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "mae_tiny.yaml"
TINY = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "decoder.embed_dim=16", "decoder.depth=1",
        "decoder.num_heads=2", "batch_size=2", "warmup_steps=2", "data.phantoms.n_ct=4", "data.phantoms.n_mri=0",
        "data.phantoms.size_xy=48", "data.phantoms.max_slices=48", "data.samples=false", "data.workers=1",
        "data.preprocess.spacing_xyz=[6,6,6]", "data.preprocess.min_shape_zyx=[32,32,32]", "sequence.crop_zyx=[32,32,32]",
        "sequence.subvolume_zyx=[32,32,32]"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def test_mae_learns_resumes_exactly_and_feeds_downstream(tmp_path, samples):
    cache = tmp_path / "cache"
    common = ["pretrain", "mae", "--config", str(CONFIG), *TINY, "checkpoint_every=10", f"data.cache={cache}"]
    assert main([*common, "--out", str(tmp_path / "full"), "max_steps=30", "lr=0.003"]) == 0
    full = losses(tmp_path / "full")
    assert sorted(full) == list(range(30))
    # the same sequences and masks without learning (lr=0): training must beat it on the last steps
    assert main([*common, "--out", str(tmp_path / "frozen"), "max_steps=30", "lr=0.0"]) == 0
    frozen = losses(tmp_path / "frozen")
    assert sum(full[s] for s in range(20, 30)) < 0.95 * sum(frozen[s] for s in range(20, 30))  # 0.91 measured
    meta = json.loads((tmp_path / "full" / "checkpoints" / "model_00000030.json").read_text())
    assert meta["task"] == "pretrain-mae" and meta["model_class"] == "MAEViT3D" and meta["config"]["mask_ratio"] == 0.75
    assert (tmp_path / "full" / "plots" / "loss_curve.png").stat().st_size > 5000
    # exact resume: as if killed after the checkpoint of step 10, resumed to 30: the same losses bit for bit
    cut = tmp_path / "cut"
    assert main([*common, "--out", str(cut), "max_steps=30", "lr=0.003"]) == 0
    for step in (20, 30):
        (cut / "checkpoints" / f"model_{step:08d}.json").unlink()
    rows = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(rows[:12]) + "\n")  # the log got to step 11
    assert main([*common, "--out", str(cut), "max_steps=30", "lr=0.003", "--resume"]) == 0
    assert losses(cut) == full
    # the encoder loads like an AR run's (decoder and mask token reported as not encoder), embeds at its last layer
    enc, pre, meta, report = encoder_from_checkpoint(tmp_path / "full")
    assert report.loaded and not report.missing and not report.unexpected and enc.cfg.embed_dim == 32
    assert main(["embed", "--checkpoint", str(tmp_path / "full"), "--per-token", "--out", str(tmp_path / "e.npz"),
                 str(samples / "brain1_image.nrrd")]) == 0
    assert np.load(tmp_path / "e.npz")["features"].shape[1] == 32
