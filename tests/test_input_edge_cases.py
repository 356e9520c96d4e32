"""Input edge cases a new user meets: absurd spacings, NaN/Inf voxels, broken files, typos in overrides.

Each is one line naming the file and the cause, exit code 2, or an option that gets past it. The
commands that need a model use a tiny untrained segmentation checkpoint (a UNETR whose encoder also
serves ``embed``) written here in a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.test_cli import run
from voxseq import VoxseqError
from voxseq.cli import main
from voxseq.data.preprocess import Preprocess, resample
from voxseq.io.volume import Volume, VolumeReadError, read_volume

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory) -> Path:
    """An untrained UNETR checkpoint whose preprocessing resamples to 3 mm (what `predict` and `embed` read)."""
    import torch

    from voxseq.config import to_dict
    from voxseq.models.unetr import UNETR3D, UNETRConfig
    from voxseq.models.vit3d import ViTConfig
    from voxseq.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    vit, unetr = ViTConfig(patch_size=4, embed_dim=16, depth=2, num_heads=2), UNETRConfig(out_channels=2, feature_size=4)
    pre = Preprocess(spacing_xyz=[3.0, 3.0, 3.0], intensity="none")
    run_dir = tmp_path_factory.mktemp("seg") / "run"
    save_checkpoint(run_dir, 1, UNETR3D(vit, unetr), meta={
        "task": "finetune-seg", "model_class": "UNETR3D", "model": to_dict(vit), "unetr": to_dict(unetr),
        "preprocess": to_dict(pre), "config": {"roi_zyx": [8, 8, 8], "overlap": 0.25}})
    return run_dir


@pytest.fixture()
def huge_spacing(tmp_path) -> Path:
    """64x64x16 voxels of 500x500x1000 mm (metres written as millimetres): 32 x 32 x 16 m."""
    return write(tmp_path / "huge.nii.gz", np.random.default_rng(0).normal(size=(16, 64, 64)).astype(np.float32),
                 (500.0, 500.0, 1000.0))


@pytest.fixture()
def nan_scan(tmp_path) -> Path:
    a = np.random.default_rng(1).normal(size=(12, 16, 16)).astype(np.float32)
    a[0, :5, :5] = np.nan
    a[-1, 0, :3] = np.inf
    return write(tmp_path / "nan.mha", a, (3.0, 3.0, 3.0))  # MetaImage keeps NaN (the NIfTI writer does not)


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.lstrip().startswith("prepare")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------- huge spacing


def test_resample_refuses_a_grid_too_large_before_allocating(huge_spacing, monkeypatch):
    vol = read_volume(huge_spacing)
    with pytest.raises(VolumeReadError) as e:
        resample(vol, [3.0, 3.0, 3.0])
    msg = str(e.value)
    assert msg.startswith(f"{huge_spacing}: spacing (500, 500, 1000) mm") and "(10667, 10667, 5333)" in msg
    assert "\n" not in msg and "VOXSEQ_MAX_VOLUME_BYTES" in msg
    small = Volume(np.zeros((8, 8, 8), np.float32), (1.0, 1.0, 1.0), meta={"path": "small.nii"})
    assert resample(small, [0.5, 0.5, 0.5]).shape_zyx == (16, 16, 16)  # 16 KiB: well within the bound
    monkeypatch.setenv("VOXSEQ_MAX_VOLUME_BYTES", "10000")  # the setting lowers the bound
    with pytest.raises(VolumeReadError, match=r"small\.nii: .*size \(16, 16, 16\)"):
        resample(small, [0.5, 0.5, 0.5])


def test_huge_spacing_is_one_line_exit_2_in_predict_embed_prepare(huge_spacing, seg_checkpoint, tmp_path, capsys):
    for args in (["predict", "--checkpoint", str(seg_checkpoint), "--out", str(tmp_path / "pred")],
                 ["embed", "--checkpoint", str(seg_checkpoint), "--out", str(tmp_path / "e.npz")],
                 ["prepare", "--out", str(tmp_path / "cache"), "--spacing", "3,3,3", "--workers", "1"]):
        capsys.readouterr()
        assert main([*args, str(huge_spacing)]) == 2, args[0]
        line = one_error_line(capsys.readouterr().err)
        assert str(huge_spacing) in line and "spacing (500, 500, 1000) mm" in line and "(10667, 10667, 5333)" in line


# ---------------------------------------------------------------------------- NaN / Inf voxels


def test_nonfinite_zero_on_predict_and_embed(nan_scan, seg_checkpoint, tmp_path, capsys):
    for args in (["predict", "--checkpoint", str(seg_checkpoint), "--out", str(tmp_path / "pred")],
                 ["embed", "--checkpoint", str(seg_checkpoint), "--out", str(tmp_path / "e.npz")]):
        capsys.readouterr()
        assert main([*args, str(nan_scan)]) == 2, args[0]
        line = one_error_line(capsys.readouterr().err)
        assert "nan.mha: contains 28 NaN/Inf voxels (use --nonfinite zero to replace them with 0)" in line, line
        assert main([*args, "--nonfinite", "zero", str(nan_scan)]) == 0, args[0]
    seg = sitk.ReadImage(str(tmp_path / "pred" / "nan_seg.nii.gz"))
    assert seg.GetSize() == (16, 16, 12)
    assert np.isfinite(np.load(tmp_path / "e.npz")["features"]).all()
    assert main(["embed", "--checkpoint", str(seg_checkpoint), "--out", str(tmp_path / "x.npz"), "--nonfinite", "nan",
                 str(nan_scan)]) == 2
    assert "--nonfinite must be error or zero" in capsys.readouterr().err


def test_nonfinite_advice_names_the_flag_in_prepare_skip_and_the_keyword_in_python(nan_scan, tmp_path):
    r = run("prepare", nan_scan, "--out", tmp_path / "c", "--on-error", "skip", "--workers", "1")
    assert r.returncode == 0 and "skipped nan: " in r.stdout and "use --nonfinite zero" in r.stdout, r.stdout
    with pytest.raises(VolumeReadError, match=r"use nonfinite='zero' to replace them"):
        read_volume(nan_scan)


def test_evaluate_subcommands_take_nonfinite():
    for sub in ("zero-shot", "retrieval"):
        r = run("evaluate", sub, "--help")
        assert r.returncode == 0 and "--nonfinite" in r.stdout


def test_info_human_form_shows_the_nonfinite_count(nan_scan, tmp_path):
    clean = write(tmp_path / "clean.mha", np.ones((4, 5, 6), np.float32))
    r = run("info", nan_scan, clean)
    assert r.returncode == 0, r.stderr
    nan_part, clean_part = r.stdout.split(str(clean))
    assert "NaN/Inf 28 (read as 0 in min/max/mean" in nan_part and "NaN/Inf 0" in clean_part
    d = json.loads(run("info", "--json", nan_scan).stdout)
    assert d["nonfinite_voxels"] == 28


# ---------------------------------------------------------------------------- rough edges


def test_info_json_includes_the_direction(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))  # LAS
    sitk.WriteImage(img, str(tmp_path / "las.nrrd"))
    d = json.loads(run("info", "--json", tmp_path / "las.nrrd").stdout)
    assert d["direction"] == [1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0] and d["orientation"] == "LAS"
    for key in ("path", "format", "size_xyz", "spacing_xyz", "origin_xyz", "orientation", "canonical_orientation",
                "channels", "dtype", "min", "max", "mean", "nonfinite_voxels"):
        assert key in d  # existing keys stay


def test_truncated_mha_error_has_no_stale_errno(tmp_path):
    ok = write(tmp_path / "ok.mha", np.zeros((8, 9, 10), np.int16))
    broken = tmp_path / "broken.mha"
    broken.write_bytes(ok.read_bytes()[:-800])
    r = run("info", broken)
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and "broken.mha: not a readable MetaImage file" in line
    assert "No such file or directory" not in line and "data not read completely" in line, line


def test_unknown_override_suggests_the_nearest_field(tmp_path, capsys):
    rc = main(["pretrain", "ar", "--config", str(ROOT / "configs" / "ar_tiny.yaml"), "--out", str(tmp_path / "r"),
               "model.depht=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown config field(s) model.depht; did you mean model.depth?" in err
    from voxseq.config import from_dict

    with pytest.raises(VoxseqError, match=r"unknown config field\(s\) windw; did you mean window\?"):
        from_dict(Preprocess, {"windw": "lung"})
    with pytest.raises(VoxseqError) as e:
        from_dict(Preprocess, {"qqqq": 1})
    assert "did you mean" not in str(e.value)


def test_resume_on_an_empty_run_folder_says_it_starts_fresh(tmp_path, monkeypatch, capsys):
    import voxseq.tasks.pretrain_ar as ar

    monkeypatch.setattr(ar, "run_pretrain_ar", lambda cfg, out, resume: {"steps": 0, "message": "stub"})
    args = ["pretrain", "ar", "--config", str(ROOT / "configs" / "ar_tiny.yaml"), "--out", str(tmp_path / "r")]
    assert main([*args, "--resume"]) == 0
    assert "holds no checkpoint to resume from; starting a fresh run" in capsys.readouterr().err
    assert main(args) == 0
    assert "fresh run" not in capsys.readouterr().err  # without --resume a fresh start is what was asked


def test_ct_window_on_mri_warns_naming_the_volumes(tmp_path):
    ct = write(tmp_path / "ct.nii.gz", np.full((6, 8, 8), -1000, np.int16))
    mri = write(tmp_path / "mri.nii.gz", np.arange(6 * 8 * 8, dtype=np.int16).reshape(6, 8, 8))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "images": {"image": str(p)}}) + "\n" for i, p in (("ct", ct), ("mri", mri))))
    r = run("prepare", manifest, "--out", tmp_path / "c", "--window", "lung", "--workers", "1")
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "1 of 2 volume(s)" in warn[0] and "--window lung" in warn[0] and warn[0].endswith(
        "without a CT window") and ": mri;" in warn[0], r.stderr
    r2 = run("prepare", manifest, "--out", tmp_path / "c2", "--workers", "1")  # percentile intensity: no CT window
    assert r2.returncode == 0 and "warning" not in r2.stderr


def test_training_commands_advise_the_data_nonfinite_override(nan_scan, tmp_path, capsys):
    from voxseq.data.cache import Cache
    from voxseq.tasks.data import DataConfig, ensure_cache

    rc = main(["pretrain", "ar", "--config", str(ROOT / "configs" / "ar_tiny.yaml"), "--out", str(tmp_path / "r"),
               f"data.source={nan_scan}", "data.workers=1"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "nan.mha: contains 28 NaN/Inf voxels (use data.nonfinite=zero to replace them with 0)" in line
    path = ensure_cache(DataConfig(source=str(nan_scan), nonfinite="zero", workers=1), tmp_path / "run", progress=False)
    assert len(Cache(path)) == 1 and np.isfinite(Cache(path).image(0)).all()
    with pytest.raises(VoxseqError, match="data.nonfinite must be error or zero"):
        DataConfig(nonfinite="nan")
