"""Fine-tuning on the training engine: `voxseq finetune seg|cls --resume` continues a run cut after a
mid-run checkpoint with exactly the uninterrupted run's metrics and final scores, checkpoints carry the
optimiser state, `finetune seg` SIGKILLed at random moments and resumed matches an uninterrupted run, and
so does a 2-process (DDP, FSDP2) `finetune seg` cut and resumed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.tasks.test_kill_resume import _assert_same_run, _finish, kill_and_resume
from voxseq.cli import main
from voxseq.train.checkpoint import load_checkpoint
from voxseq.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SEG = ROOT / "configs" / "seg_phantom_tiny.yaml"
CLS = ROOT / "configs" / "cls_phantom_tiny.yaml"
SMALL = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "data.phantoms.size_xy=48",
         "data.phantoms.max_slices=48", "data.preprocess.spacing_xyz=[6,6,6]", "data.preprocess.min_shape_zyx=[32,32,32]",
         "data.workers=1"]
SEG_TINY = [*SMALL, "unetr.feature_size=4", "roi_zyx=[16,16,16]", "batch_size=1", "warmup_steps=1",
            "data.phantoms.n_ct=4"]
CLS_TINY = [*SMALL, "input_zyx=[32,32,32]", "batch_size=2", "warmup_steps=1", "data.phantoms.n_ct=12",
            "label_key=liver lesion"]


def _rows(run: Path) -> list[dict]:
    return read_metrics(run)


def _cut_after(run: Path, step: int, max_steps: int, every: int) -> None:
    """As if killed after the checkpoint of ``step``: later checkpoints never completed, the log got one step further."""
    for s in range(step + every, max_steps + 1, every):
        (run / "checkpoints" / f"model_{s:08d}.json").unlink()
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows[: step + 1]) + "\n")


@pytest.fixture(scope="module")
def seg_cache(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("seg_prep")
    assert main(["finetune", "seg", "--config", str(SEG), "--out", str(run / "r"), *SEG_TINY, "max_steps=1",
                 f"data.cache={run / 'cache'}"]) == 0
    return run / "cache"


def test_finetune_seg_class_balanced_batch_dice_resumes_bit_for_bit(tmp_path, seg_cache):
    """Class-balanced crop centres are drawn from per-class voxel samples kept with the checkpoint."""
    common = ["finetune", "seg", "--config", str(SEG), *SEG_TINY, "max_steps=6", "checkpoint_every=3",
              "crop_sampling=class_balanced", "pos_fraction=1.0", "dice_batch=true", "dice_background=false",
              f"data.cache={seg_cache}"]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--out", str(tmp_path / "cut")]) == 0
    _cut_after(tmp_path / "cut", 3, 6, 3)
    assert main([*common, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")
    state = load_checkpoint(tmp_path / "cut").training_state()
    assert state["fg_classes"] and all(v.shape[1] == 3 for v in state["fg_classes"].values())


def test_finetune_seg_resume_is_bit_for_bit(tmp_path, seg_cache, capsys):
    common = ["finetune", "seg", "--config", str(SEG), *SEG_TINY, "max_steps=8", "checkpoint_every=4", "eval_every=4",
              f"data.cache={seg_cache}"]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--out", str(tmp_path / "cut")]) == 0
    _cut_after(tmp_path / "cut", 4, 8, 4)
    assert main([*common, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, cut = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(8)) and cut == full  # loss, lr and the mid-run Dice, bit for bit
    assert "val_mean_dice" in cut[3] and set(cut[0]) == {"step", "loss", "lr"}
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert a.meta["val"] == b.meta["val"] and all(a.state_dict[k].equal(v) for k, v in b.state_dict.items())
    assert set(b.training_state()) >= {"optimizer", "rng", "step", "batch_rng", "fg_sample"}  # checkpoints resume
    assert (tmp_path / "cut" / "checkpoints" / "optim_00000004.pt").is_file()
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "cut"), "--resume"]) == 0  # a finished run: nothing to do
    assert f"validation mean Dice {a.meta['val']['mean_dice']:.4f}" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "cut")]) == 2  # never overwritten without --resume
    assert "pass --resume" in capsys.readouterr().err


def test_finetune_cls_resume_is_bit_for_bit(tmp_path):
    common = ["finetune", "cls", "--config", str(CLS), *CLS_TINY, "max_steps=6", "checkpoint_every=3"]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    cache = f"data.cache={tmp_path / 'full' / 'cache'}"
    assert main([*common, cache, "--out", str(tmp_path / "cut")]) == 0
    _cut_after(tmp_path / "cut", 3, 6, 3)
    assert main([*common, cache, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert a.meta["eval"] == b.meta["eval"] and set(a.meta["eval"]) == {"auc", "acc", "sensitivity", "specificity"}
    assert (tmp_path / "cut" / "checkpoints" / "optim_00000003.pt").is_file()


def _seg_cmd(cache: Path, out: Path, max_steps: int) -> list[str]:
    return [sys.executable, "-m", "voxseq.cli", "finetune", "seg", "--config", str(SEG), "--out", str(out), *SEG_TINY,
            "checkpoint_every=2", "keep_checkpoints=2", f"max_steps={max_steps}", f"data.cache={cache}"]


@pytest.mark.parametrize("kills,max_steps,seed", [
    (2, 20, 0),  # the last kill must land before the final step, however fast the steps run
    pytest.param(6, 40, 1, marks=pytest.mark.slow),  # steps are short: room for 6 kills before the last one
])
def test_finetune_seg_survives_kill_9(tmp_path, seg_cache, kills, max_steps, seed):
    _finish(_seg_cmd(seg_cache, tmp_path / "full", max_steps))
    at_kill = kill_and_resume(_seg_cmd(seg_cache, tmp_path / "cut", max_steps), tmp_path / "cut", kills, seed)
    print(f"(furthest logged step, checkpoint) at each kill: {at_kill}")
    assert len(at_kill) == kills and at_kill[-1][0] < max_steps - 1
    _assert_same_run(tmp_path / "cut", tmp_path / "full", max_steps)
    assert load_checkpoint(tmp_path / "cut").meta["val"] == load_checkpoint(tmp_path / "full").meta["val"]


def _torchrun_seg(cache: Path, out: Path, strategy: str, port: int, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           *_seg_cmd(cache, out, 4)[1:], "eval_every=2", f"distributed={strategy}", *extra]
    _finish(cmd)


@pytest.mark.parametrize("strategy,port", [("ddp", 29577), ("fsdp2", 29587)])
def test_finetune_seg_on_two_gloo_processes_resumes_exactly(tmp_path, seg_cache, strategy, port):
    """Each rank draws its own crops (rank 0 the one-process stream) and the checkpoint keeps every
    rank's generator, so a 2-process run resumes exactly; the validation Dice is computed on every rank."""
    _torchrun_seg(seg_cache, tmp_path / "full", strategy, port)
    _torchrun_seg(seg_cache, tmp_path / "cut", strategy, port)
    (tmp_path / "cut" / "checkpoints" / "model_00000004.json").unlink()
    _torchrun_seg(seg_cache, tmp_path / "cut", strategy, port, "--resume")
    full, cut = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r["step"] for r in full] == list(range(4)) and cut == full and "val_mean_dice" in full[1]
    assert load_checkpoint(tmp_path / "cut").meta["val"] == load_checkpoint(tmp_path / "full").meta["val"]
    assert len(load_checkpoint(tmp_path / "cut").training_state()["per_rank"]) == 2
