"""AR pretraining end to end on tiny phantoms: run folder, exact resume, DDP with 2 gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from voxseq.cli import main
from voxseq.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "ar_tiny.yaml"
TINY = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "batch_size=2", "warmup_steps=2",
        "data.phantoms.n_ct=4", "data.phantoms.n_mri=2", "data.phantoms.size_xy=48", "data.phantoms.max_slices=48",
        "data.samples=false", "data.workers=1", "data.preprocess.spacing_xyz=[6,6,6]", "log_every=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One prepared phantom cache shared by the tests of this module."""
    run = tmp_path_factory.mktemp("prep")
    assert main(["pretrain", "ar", "--config", str(CONFIG), "--out", str(run / "r"), *TINY, "max_steps=1",
                 f"data.cache={run / 'cache'}"]) == 0
    return run / "cache"


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def test_run_folder_contents_and_learning(tmp_path, cache):
    out = tmp_path / "run"
    common = ["pretrain", "ar", "--config", str(CONFIG), *TINY, "max_steps=30", "checkpoint_every=10", f"data.cache={cache}"]
    assert main([*common, "--out", str(out), "lr=0.003"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(30))
    assert all(k in rows[-1] for k in ("step", "loss", "lr", "tokens_per_s"))
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == ["model_00000010.json", "model_00000020.json",
                                                                             "model_00000030.json"]
    assert (out / "plots" / "loss_curve.png").stat().st_size > 5000
    assert (out / "plots" / "reconstruction.png").stat().st_size > 5000
    meta = json.loads((out / "checkpoints" / "model_00000030.json").read_text())
    assert meta["preprocess"]["spacing_xyz"] == [6.0, 6.0, 6.0] and meta["model"]["embed_dim"] == 32
    # the same batches and prefixes without learning (lr=0): training must beat it on the last steps
    assert main([*common, "--out", str(tmp_path / "frozen"), "lr=0.0"]) == 0
    trained, frozen = losses(out), losses(tmp_path / "frozen")
    late = range(20, 30)
    assert sum(trained[s] for s in late) < 0.9 * sum(frozen[s] for s in late)


def test_resume_reproduces_uninterrupted_losses(tmp_path, cache):
    common = ["pretrain", "ar", "--config", str(CONFIG), *TINY, "checkpoint_every=4", f"data.cache={cache}"]
    assert main([*common, "--out", str(tmp_path / "full"), "max_steps=10"]) == 0
    assert main([*common, "--out", str(tmp_path / "cut"), "max_steps=10"]) == 0  # checkpoints at 4, 8, 10
    for step in (8, 10):  # as if killed after the checkpoint of step 4: later ones never completed
        (tmp_path / "cut" / "checkpoints" / f"model_{step:08d}.json").unlink()
    rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "cut" / "metrics.jsonl").write_text("\n".join(rows[:6]) + "\n")  # the log got to step 5
    assert main([*common, "--out", str(tmp_path / "cut"), "max_steps=10", "--resume"]) == 0
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(10))
    for s in range(10):
        assert cut[s] == full[s], s  # bit-for-bit the same losses after resuming from step 4


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, cache, capsys):
    args = ["pretrain", "ar", "--config", str(CONFIG), "--out", str(tmp_path / "r"), *TINY, "max_steps=2",
            f"data.cache={cache}"]
    assert main(args) == 0
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    rc = main(["pretrain", "ar", "--config", str(CONFIG), "--out", str(tmp_path / "r"), "model.depht=3"])
    assert rc == 2 and "unknown config field(s) model.depht" in capsys.readouterr().err


def torchrun(out: Path, cache: Path, strategy: str, port: int, *extra: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "voxseq.cli", "pretrain", "ar", "--config", str(CONFIG), "--out", str(out), *TINY,
           "checkpoint_every=2", f"data.cache={cache}", f"distributed={strategy}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("strategy,port", [("ddp", 29517), ("fsdp2", 29527)])
def test_two_gloo_processes_train_and_resume_exactly(tmp_path, cache, strategy, port):
    torchrun(tmp_path / "full", cache, strategy, port, "max_steps=6")
    rows = read_metrics(tmp_path / "full")
    assert [x["step"] for x in rows] == list(range(6))  # rank 0 logs once per step
    assert (tmp_path / "full" / "plots" / "reconstruction.png").is_file()
    # a run killed after its step-2 checkpoint, resumed on two processes again
    torchrun(tmp_path / "cut", cache, strategy, port, "max_steps=6")
    for step in (4, 6):
        (tmp_path / "cut" / "checkpoints" / f"model_{step:08d}.json").unlink()
    torchrun(tmp_path / "cut", cache, strategy, port, "max_steps=6", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_nonfinite_steps_are_skipped_and_too_many_stop_the_run(tmp_path, cache, monkeypatch):
    import math

    import torch

    import voxseq.tasks.pretrain_ar as par
    from voxseq import VoxseqError
    from voxseq.train.checkpoint import load_checkpoint

    real, calls, bad = par.norm_pixel_loss, {"n": 0}, {3, 4}

    def flaky(pred, target, mask, **kw):  # one call per step (grad_accum 1): NaN on the chosen steps
        i, calls["n"] = calls["n"], calls["n"] + 1
        loss = real(pred, target, mask, **kw)
        return loss * float("nan") if i in bad else loss

    monkeypatch.setattr(par, "norm_pixel_loss", flaky)
    common = [*TINY, "checkpoint_every=2", f"data.cache={cache}", "max_nonfinite_steps=2"]
    par.run_pretrain_ar(par.load_ar_config(CONFIG, [*common, "max_steps=8"]), tmp_path / "ok", progress=False)
    rows = read_metrics(tmp_path / "ok")
    assert [r["step"] for r in rows if "skipped" in r] == [3, 4]
    assert [r["step"] for r in rows if "loss" in r] == [0, 1, 2, 5, 6, 7] and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert load_checkpoint(tmp_path / "ok").step == 8

    calls["n"] = 0
    bad.clear()
    bad.update({4, 5, 6})  # three in a row with a limit of two
    bad_cfg = par.load_ar_config(CONFIG, [*common, "max_steps=8"])
    with pytest.raises(VoxseqError, match="3 non-finite losses or gradients in a row.*model_00000006"):
        par.run_pretrain_ar(bad_cfg, tmp_path / "stop", progress=False)
    four, six = load_checkpoint(tmp_path / "stop" / "checkpoints" / "model_00000004.json"), load_checkpoint(tmp_path / "stop")
    assert six.step == 6  # the last good checkpoint is intact: skipped steps 4 and 5 changed no weight
    assert all(torch.equal(four.state_dict[k], v) for k, v in six.state_dict.items())
    assert all(torch.isfinite(v).all() for v in six.state_dict.values())


def test_norm_pix_false_regresses_raw_voxels(tmp_path, cache, monkeypatch):
    import voxseq.tasks.pretrain_ar as par

    real, seen = par.norm_pixel_loss, []

    def spy(pred, target, mask, **kw):
        seen.append(kw.get("normalize", True))
        return real(pred, target, mask, **kw)

    monkeypatch.setattr(par, "norm_pixel_loss", spy)
    for flag in ("true", "false"):
        par.run_pretrain_ar(par.load_ar_config(CONFIG, [*TINY, f"data.cache={cache}", "max_steps=2", f"norm_pix={flag}"]),
                            tmp_path / flag, progress=False)
    assert seen == [True, True, False, False]
    raw = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "false")}
    normed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "true")}
    assert raw[0] != normed[0]  # the same first batch, another target


def test_two_hu_windows_as_channels_pretrain_and_embed(tmp_path, samples):
    """A CT prepared with two HU windows: two-channel tokens, per-channel targets, a run `embed` reads."""
    import numpy as np

    from voxseq.checkpoint import load_checkpoint

    out = tmp_path / "run"
    two = [*TINY, "data.phantoms.n_mri=0", "data.preprocess.intensity=window", "model.in_chans=2",
           "data.preprocess.hu_windows=[[-1000,400],[-175,250]]", "sequence.kind_weights.contrast=0", "max_steps=30"]
    assert main(["pretrain", "ar", "--config", str(CONFIG), "--out", str(out), *two, "lr=0.003"]) == 0
    ck = load_checkpoint(out)
    assert ck.meta["model"]["in_chans"] == 2 and ck.meta["preprocess"]["hu_windows"] == [[-1000, 400], [-175, 250]]
    assert ck.state_dict["encoder.patch_embed.weight"].shape[1] == 2
    assert ck.state_dict["head.weight"].shape[0] == 2 * 8**3  # predicts both channels of the next token
    # it learns: the same batches without updates end higher
    assert main(["pretrain", "ar", "--config", str(CONFIG), "--out", str(tmp_path / "frozen"), *two, "lr=0.0",
                 f"data.cache={out / 'cache'}"]) == 0
    trained, frozen = losses(out), losses(tmp_path / "frozen")
    assert sum(trained[s] for s in range(20, 30)) < 0.9 * sum(frozen[s] for s in range(20, 30))
    # a scan is embedded with the run's own two windows
    assert main(["embed", "--checkpoint", str(out), "--per-token", "-o", str(tmp_path / "e.npz"),
                 str(samples / "lung1_image.nrrd")]) == 0
    feats = np.load(tmp_path / "e.npz")
    assert feats["features"].shape[1] == 32 and np.isfinite(feats["features"]).all()
    # 16-slice slabs at stride 8: half the rows of every later slab's tokens were in the slab before
    import importlib.util

    spec = importlib.util.spec_from_file_location("ar_overlap_loss", ROOT / "examples" / "ar_overlap_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    overlap = module.main(["--run", str(out), "--sequences", "2"])
    assert sorted(overlap) == ["slab 1", "slab 2", "slab 3"]
    assert all(v["seen_voxels"] == v["new_voxels"] > 0 and 0 < v["seen"] < 10 for v in overlap.values())


def test_copy_check_sequences_repeat_exactly_the_tokens_marked_seen():
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("ar_copy_check", ROOT / "examples" / "ar_copy_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokens, pos, seen = module.copy_batch(np.random.default_rng(0), 2)
    assert tokens.shape == (2, 128, 64) and pos.shape == (2, 128, 4) and int(seen.sum()) == 3 * 16
    for i in range(128):
        same = (tokens[0] == tokens[0, i]).all(-1) & (pos[0, :, 1:] == pos[0, i, 1:]).all(-1)
        same[i] = False
        earlier = same[:i].any()  # an earlier token of the same place and voxels: one slab back
        assert bool(earlier) == bool(seen[i]), i
        if seen[i]:
            j = int(same[:i].nonzero()[0])
            assert pos[0, j, 0] == pos[0, i, 0] - 1
    result = module.main(["--steps", "2", "--batch", "2", "--every", "1", "--depth", "1"])
    assert result["sequences"] == 4 and 0.5 < result["seen"] < 5 and 0.5 < result["new"] < 5
    assert result["learned_at"] is None  # two steps cannot find the copy
