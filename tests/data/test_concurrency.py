"""Two `voxseq prepare` on one cache folder, and a full disk while a cache volume is written."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from voxseq import VoxseqError
from voxseq.data.cache import Cache, cache_lock, prepare_cache
from voxseq.data.manifest import read_manifest
from voxseq.data.phantoms import write_phantoms
from voxseq.data.preprocess import Preprocess

VOXSEQ = [sys.executable, "-m", "voxseq.cli"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("phantoms"), n_ct=4, n_mri=0, seed=5, size_xy=64, max_slices=48,
                          progress=False)


def _prepare(manifest: Path, out: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([*VOXSEQ, "prepare", str(manifest), "--out", str(out), "-j", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                            env={**os.environ, **(env or {})})


def test_two_prepares_on_one_folder_take_turns(tmp_path, phantoms):
    """Both started while the folder is locked, then released together: one builds the cache and the other
    waits, then reuses every volume: both exit 0, each volume is written once and verifies, nothing
    half-written is left. (Holding the lock first makes them contend however slowly they start.)"""
    out = tmp_path / "cache"
    out.mkdir()
    with cache_lock(out):
        procs = [_prepare(phantoms, out), _prepare(phantoms, out)]
        first_lines = [p.stderr.readline() for p in procs]  # each says once that it waits, then blocks
    assert all("waiting for another voxseq prepare" in line for line in first_lines), first_lines
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    summaries = sorted(next(ln for ln in o.splitlines() if ln.startswith("prepared ")) for o, _ in results)
    assert summaries[0].startswith("prepared 0 volume(s), reused 4") and summaries[1].startswith("prepared 4 volume(s), reused 0")
    assert not any("waiting for another voxseq prepare" in e for _, e in results)  # one note each, not repeated
    ids = [json.loads(ln)["id"] for ln in (out / "index.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 4 and not list(out.rglob(".tmp-*"))
    cache = Cache(out, verify=True)
    for i in range(len(cache)):
        cache.check(i)


def test_a_held_lock_times_out_with_one_line(tmp_path, phantoms):
    out = tmp_path / "cache"
    out.mkdir()
    with cache_lock(out):
        p = _prepare(phantoms, out, {"VOXSEQ_PREPARE_LOCK_TIMEOUT": "1"})
        _, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 2, err
    assert lines[0] == f"voxseq: waiting for another voxseq prepare writing {out} to finish"
    assert len(lines) == 2 and lines[1].startswith(f"voxseq: error: {out}: the cache folder is locked by another voxseq prepare")
    assert not (out / "index.jsonl").exists()  # the waiting one wrote nothing


def test_overwrite_keeps_the_lock_and_rebuilds(tmp_path, phantoms):
    out = tmp_path / "cache"
    prepare_cache(read_manifest(phantoms), out, Preprocess(), progress=False)
    s = prepare_cache(read_manifest(phantoms), out, Preprocess(), overwrite=True, progress=False)
    assert s.done == 4 and s.reused == 0 and (out / ".lock").exists()


def test_full_disk_while_a_volume_is_written(tmp_path, phantoms, monkeypatch):
    """ENOSPC in the middle of the second volume: one line naming the file, even with --on-error skip; the first
    volume stays finished, no temporary file is left, and a re-run with space finishes the cache."""
    import voxseq.data.cache as cache_mod

    real = np.save

    def save(f, array, *a, **k):
        if f.name.endswith("image.npy") and "/ct_001/" in f.name:
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, array, *a, **k)

    monkeypatch.setattr(cache_mod.np, "save", save)
    out = tmp_path / "cache"
    records = read_manifest(phantoms)
    pre = Preprocess(spacing_xyz=[4.0, 4.0, 4.0])
    with pytest.raises(VoxseqError) as e:
        prepare_cache(records, out, pre, on_error="skip", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "no space left on device while writing it" in msg and "/ct_001/image.npy: " in msg
    assert "run the command again to resume" in msg
    assert not list(out.rglob(".tmp-*"))
    assert len((out / "index.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(cache_mod.np, "save", real)
    s = prepare_cache(records, out, pre, progress=False)
    assert (s.reused, s.done) == (1, 3)
    cache = Cache(out, verify=True)
    for i in range(len(cache)):
        cache.check(i)
