"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_dicom_series

VOXSEQ = [sys.executable, "-m", "voxseq.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*VOXSEQ, *map(str, args)], capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=cwd, timeout=300)


def test_help_is_fast_and_imports_no_torch():
    t = time.perf_counter()
    r = run("--help")
    assert r.returncode == 0 and "prepare" in r.stdout and "info" in r.stdout
    assert time.perf_counter() - t < 5  # generous bound for loaded CI machines; interactive use is ~0.2 s
    probe = subprocess.run([sys.executable, "-c", "import sys, voxseq.cli, voxseq.io.inspect; print('torch' in sys.modules, 'monai' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.split() == ["False", "False"]


def test_info_json_on_real_samples(samples):
    r = run("info", "--json", samples / "lung1_image.nrrd", samples / "brain1_image.nrrd")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows[0]["size_xyz"] == [384, 384, 48] and np.allclose(rows[0]["spacing_xyz"], [0.5703125, 0.5703125, 5.0])
    assert rows[0]["orientation"] == "LPS" and rows[0]["dtype"] == "int16" and rows[0]["min"] == -1024 and rows[0]["max"] == 3071
    assert rows[1]["size_xyz"] == [256, 256, 25] and rows[1]["orientation"] == "LAS"
    for key in ("path", "size_xyz", "spacing_xyz", "orientation", "dtype", "min", "max"):
        assert key in rows[0]


def test_info_on_dicom_series(tmp_path, samples):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(samples / "breast1_image.nrrd"))
    write_dicom_series(img, tmp_path / "series", "1.2.3.4")
    r = run("info", "--json", tmp_path / "series")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["size_xyz"] == [45, 120, 21] and np.allclose(d["spacing_xyz"], [0.664062, 0.664062, 2.1], atol=1e-4)
    assert d["format"] == "DICOM"


BAD_INPUTS = {
    "empty.nrrd": (lambda p, s: p.write_bytes(b""), "file is empty"),
    "truncated.nii.gz": (lambda p, s: p.write_bytes((s / "breast1_image.nrrd").read_bytes()[:300]), "gzip"),
    "text.nrrd": (lambda p, s: p.write_text("not an image\n" * 10), "not a readable NRRD"),
    "missing.nii.gz": (lambda p, s: None, "no such file"),
    "flat.mha": (lambda p, s: __import__("SimpleITK").WriteImage(
        __import__("SimpleITK").GetImageFromArray(np.zeros((5, 6), np.int16)), str(p)), "2-D"),
    "nan.mha": (lambda p, s: __import__("SimpleITK").WriteImage(
        __import__("SimpleITK").GetImageFromArray(np.full((3, 4, 5), np.nan, np.float32)), str(p)), "NaN/Inf"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_error(tmp_path, samples, name):
    make, cause = BAD_INPUTS[name]
    p = tmp_path / name
    make(p, samples)
    out = tmp_path / "cache"
    r = run("prepare", p if name != "missing.nii.gz" else p, "--out", out) if name == "nan.mha" else run("info", p)
    if name == "nan.mha":  # info reports NaNs (replaced), prepare refuses them by default
        r_info = run("info", "--json", p)
        assert r_info.returncode == 0 and json.loads(r_info.stdout)["nonfinite_voxels"] == 60
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and name in lines[0] and cause in lines[0], r.stderr


def test_debug_shows_traceback(tmp_path):
    p = tmp_path / "empty.nrrd"
    p.write_bytes(b"")
    r = run("--debug", "info", p)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_prepare_folder_on_error_skip(tmp_path, samples):
    data = tmp_path / "scans"
    data.mkdir()
    for n in ("breast1_image.nrrd", "breast1_label.nrrd"):
        (data / n).write_bytes((samples / n).read_bytes())
    (data / "zz_broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    manifest = tmp_path / "m.jsonl"
    recs = [{"id": "breast1", "images": {"image": str(data / "breast1_image.nrrd")}, "label": str(data / "breast1_label.nrrd")},
            {"id": "zz_broken", "images": {"image": str(data / "zz_broken.nii.gz")}}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = run("prepare", manifest, "--out", tmp_path / "c", "--on-error", "skip", "--window", "lung")
    assert r.returncode == 0, r.stderr
    assert "prepared 1 volume(s)" in r.stdout and "skipped zz_broken" in r.stdout
    r2 = run("prepare", manifest, "--out", tmp_path / "c", "--on-error", "skip", "--window", "lung")
    assert "reused 1" in r2.stdout
    r3 = run("prepare", manifest, "--out", tmp_path / "c", "--window", "lung")
    assert r3.returncode == 2 and "zz_broken.nii.gz" in r3.stderr and "Traceback" not in r3.stderr


def test_prepare_manifest_row_with_missing_file(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "images": {"image": "nowhere/a.nii.gz"}}) + "\n")
    r = run("prepare", manifest, "--out", tmp_path / "c")
    assert r.returncode == 2 and "a.nii.gz: no such file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without permission bits")
def test_unreadable_file(tmp_path, samples):
    p = tmp_path / "locked.nrrd"
    p.write_bytes((samples / "breast1_label.nrrd").read_bytes())
    p.chmod(0)
    r = run("info", p)
    assert r.returncode == 2 and "permission denied" in r.stderr


def test_phantoms_command_writes_a_manifest(tmp_path):
    r = run("phantoms", "--out", tmp_path / "ph", "--n-ct", "1", "--n-mri", "1", "--size-xy", "40", "--max-slices", "30")
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "ph" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["ct_000", "mri_000"]
    info = json.loads(run("info", "--json", tmp_path / "ph" / "ct_000_image.nii.gz").stdout)
    assert info["dtype"] == "int16" and info["size_xyz"][:2] == [40, 40] and 24 <= info["size_xyz"][2] <= 30
