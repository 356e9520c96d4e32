"""A full disk while a checkpoint is written: one clear line, the previous checkpoint intact, resume works."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from voxseq import VoxseqError
from voxseq.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _full_disk_after(n_bytes: int):
    """A writer that puts ``n_bytes`` into the file, then fails as a full disk does."""
    def write(*args, **kwargs):
        target = args[1] if len(args) > 1 else kwargs.get("filename") or kwargs.get("f")
        Path(target).write_bytes(b"\0" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


@pytest.mark.parametrize("what", ["weights", "training_state"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, what):
    model = torch.nn.Linear(4, 3)
    save_checkpoint(tmp_path, 10, model, training_state={"step": 10, "x": torch.ones(2)})
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with torch.no_grad():
        model.weight.add_(1.0)
    if what == "weights":
        monkeypatch.setattr("safetensors.torch.save_file", _full_disk_after(100))
    else:
        monkeypatch.setattr(torch, "save", _full_disk_after(100))
    with pytest.raises(VoxseqError) as e:
        save_checkpoint(tmp_path, 20, model, training_state={"step": 20, "x": torch.ones(2)})
    msg = str(e.value)
    assert "\n" not in msg and "no space left on device" in msg and "step 20" in msg
    assert "the previous checkpoint (step 10) is intact" in msg
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # no partial or orphan files
    ck = load_checkpoint(tmp_path)
    assert ck.step == 10 and latest_checkpoint(tmp_path).name == "model_00000010.json"
    monkeypatch.undo()
    save_checkpoint(tmp_path, 20, model, training_state={"step": 20})  # space again: the next save succeeds
    assert load_checkpoint(tmp_path).step == 20


def test_other_write_errors_say_what_failed(tmp_path, monkeypatch):
    monkeypatch.setattr("safetensors.torch.save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(VoxseqError, match=r"write failed \(OSError: \[Errno 5\] I/O error\) while writing the "
                                          r"checkpoint of step 3; no earlier checkpoint exists"):
        save_checkpoint(tmp_path, 3, torch.nn.Linear(2, 2))
    assert not list((tmp_path / "checkpoints").iterdir())


def test_pretraining_stopped_by_a_full_disk_resumes(tmp_path, monkeypatch, capsys):
    """`pretrain ar` hits a full disk at its second checkpoint: exit 2 with one line; --resume from the first
    checkpoint then finishes the run with the losses of an uninterrupted one."""
    import safetensors.torch

    from tests.tasks.test_pretrain_ar import CONFIG, TINY
    from voxseq.cli import main
    from voxseq.train.metrics import read_metrics

    cache = tmp_path / "cache"
    common = ["pretrain", "ar", "--config", str(CONFIG), *TINY, "max_steps=6", "checkpoint_every=3", f"data.cache={cache}"]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def fails_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            return _full_disk_after(1000)(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr("safetensors.torch.save_file", fails_second)
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "cut")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "no space left on device while writing the checkpoint of step 6" in err[0], err
    assert "the previous checkpoint (step 3) is intact" in err[0]
    assert load_checkpoint(tmp_path / "cut").step == 3
    monkeypatch.setattr("safetensors.torch.save_file", real)
    assert main([*common, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full")}
    cut = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "cut")}
    assert sorted(cut) == list(range(6)) and all(cut[s] == full[s] for s in range(6))
    assert load_checkpoint(tmp_path / "cut").step == 6
