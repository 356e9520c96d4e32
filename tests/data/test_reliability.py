"""The cache under stress: corrupted files found and repaired, `voxseq prepare` killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from voxseq import VoxseqError
from voxseq.data.cache import Cache, prepare_cache
from voxseq.data.manifest import read_manifest
from voxseq.data.phantoms import write_phantoms
from voxseq.data.preprocess import Preprocess

VOXSEQ = [sys.executable, "-m", "voxseq.cli"]
N_VOLUMES = 8


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Eight CT phantoms (with labels) and their manifest."""
    return write_phantoms(tmp_path_factory.mktemp("phantoms"), n_ct=N_VOLUMES, n_mri=0, seed=3)


@pytest.fixture(scope="module")
def reference(phantoms, tmp_path_factory) -> dict[str, dict]:
    """An uninterrupted build of the same corpus: id -> sha256 of each file."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    prepare_cache(read_manifest(phantoms), out, Preprocess(), workers=2, progress=False)
    return {e["id"]: e["sha256"] for e in Cache(out).entries}


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*VOXSEQ, *map(str, args)], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=300)


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.glob("volumes/*/*"))}


def _assert_complete_and_intact(out: Path, reference: dict[str, dict]) -> None:
    """Every volume exactly once, nothing half-written left, every checksum verified, same bytes as an
    uninterrupted build."""
    ids = [json.loads(line)["id"] for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(reference) and len(ids) == len(set(ids))
    assert sorted(p.name for p in (out / "volumes").iterdir()) == sorted(reference)
    assert not list(out.rglob(".tmp-*"))
    cache = Cache(out, verify=True)
    for i in range(len(cache)):
        cache.check(i)
        assert cache.image(i).dtype == np.float16
        assert cache.entry(i)["sha256"] == reference[cache.entry(i)["id"]]


# ---------------------------------------------------------------------------- integrity and repair


def test_corrupt_and_truncated_volumes_are_found_and_only_they_are_rebuilt(tmp_path, phantoms, reference):
    out = tmp_path / "cache"
    r = _cli("prepare", phantoms, "--out", out, "-j", "2")
    assert r.returncode == 0, r.stderr
    flipped = out / "volumes" / "ct_002" / "image.npy"
    truncated = out / "volumes" / "ct_005" / "image.npy"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, same size: only the sha256 sees it
    flipped.write_bytes(bytes(data))
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size - 4096)
    before = _mtimes(out)

    # a reader notices: the size on opening, the checksum with verify=True, each naming the file
    cache = Cache(out)
    with pytest.raises(VoxseqError, match=r"ct_005/image\.npy: \d+ bytes, entry.json records"):
        cache.image(cache.ids.index("ct_005"))
    cache.image(cache.ids.index("ct_002"))  # same size: only a checksum finds a flipped bit
    with pytest.raises(VoxseqError, match=r"ct_002/image\.npy: sha256 does not match"):
        Cache(out, verify=True).image(cache.ids.index("ct_002"))
    assert cache.verify(cache.ids.index("ct_002")) == ["image.npy"] and cache.verify(0) == []

    # a plain re-run stops with one line naming the truncated file (sizes are always checked) ...
    r = _cli("prepare", phantoms, "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "ct_005/image.npy" in r.stderr and "--repair" in r.stderr
    # ... and --verify also finds the flipped bit
    r = _cli("prepare", phantoms, "--out", out, "--verify")
    assert r.returncode == 2 and "ct_002/image.npy" in r.stderr and "(and 1 more)" in r.stderr
    assert _mtimes(out) == before  # refusing changed nothing

    r = _cli("prepare", phantoms, "--out", out, "--repair")
    assert r.returncode == 0, r.stderr
    assert f"prepared 2 volume(s), reused {N_VOLUMES - 2}, repaired 2," in r.stdout
    assert "repaired ct_002" in r.stdout and "repaired ct_005" in r.stdout
    after = _mtimes(out)
    changed = {k.split("/")[1] for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed == {"ct_002", "ct_005"}  # intact volumes untouched
    _assert_complete_and_intact(out, reference)


def test_repair_rebuilds_missing_files_and_unreadable_entries(tmp_path, phantoms, reference):
    out = tmp_path / "cache"
    prepare_cache(read_manifest(phantoms), out, Preprocess(), workers=2, progress=False)
    (out / "volumes" / "ct_001" / "label.npy").unlink()
    (out / "volumes" / "ct_004" / "entry.json").write_text('{"id": "ct_0')  # not JSON any more
    with pytest.raises(VoxseqError, match=r"ct_001/label\.npy: missing \(entry.json lists it\) \(and 1 more\)"):
        prepare_cache(read_manifest(phantoms), out, Preprocess(), progress=False)
    s = prepare_cache(read_manifest(phantoms), out, Preprocess(), repair=True, progress=False)
    assert sorted(s.repaired) == ["ct_001", "ct_004"] and s.done == 2 and s.reused == N_VOLUMES - 2
    _assert_complete_and_intact(out, reference)
    s = prepare_cache(read_manifest(phantoms), out, Preprocess(), repair=True, progress=False)
    assert s.repaired == [] and s.done == 0 and s.reused == N_VOLUMES


# ---------------------------------------------------------------------------- kill -9 and resume


def _kill_and_resume(out: Path, manifest: Path, n_volumes: int, kills: int, workers: int, seed: int) -> list[tuple[int, int]]:
    """Start `voxseq prepare`, SIGKILL its process group (the command and its workers, as an OOM killer
    or a lost node would) at a random moment, `kills` times; then let it finish. A kill comes after 0 or
    1 more volumes are finished (random) plus a random fraction of a volume's time, so most land while
    volumes are being written and each run tends to get a little further. Returns (finished volumes,
    temporary files left) at each kill."""
    rng = np.random.default_rng(seed)
    at_kill: list[tuple[int, int]] = []
    startup = None  # seconds from launch to the first write (imports), measured on the first run
    finished = lambda: len(list(out.glob("volumes/*/entry.json")))  # noqa: E731
    while len(at_kill) < kills:
        t0 = time.monotonic()
        proc = subprocess.Popen([*VOXSEQ, "prepare", str(manifest), "--out", str(out), "-j", str(workers)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        target = finished() + int(rng.integers(0, 2))
        while proc.poll() is None and time.monotonic() - t0 < 60:
            started = (out / "preprocess.yaml").exists() if startup is None else time.monotonic() - t0 >= startup
            if started and finished() >= target:
                break
            time.sleep(0.005)
        startup = startup or time.monotonic() - t0
        time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is not None:  # finished before the kill: the cache is complete, nothing to resume
            assert proc.returncode == 0, proc.stderr.read()
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        at_kill.append((finished(), len(list(out.rglob(".tmp-*")))))
    assert finished() <= n_volumes
    r = _cli("prepare", manifest, "--out", out, "-j", str(workers), "--verify")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return at_kill


def test_prepare_survives_kill_9_and_resumes(tmp_path, phantoms, reference):
    kills = _kill_and_resume(tmp_path / "cache", phantoms, N_VOLUMES, kills=2, workers=2, seed=0)
    print(f"kills: (finished volumes, temp files) at each kill {kills}")
    assert len(kills) >= 1 and min(n for n, _ in kills) < N_VOLUMES  # at least one kill landed mid-run
    _assert_complete_and_intact(tmp_path / "cache", reference)


@pytest.fixture(scope="module")
def many_phantoms(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """Sixteen small CT phantoms, and the checksums of an uninterrupted build."""
    manifest = write_phantoms(tmp_path_factory.mktemp("many"), n_ct=16, n_mri=0, seed=5, size_xy=64, max_slices=64)
    out = tmp_path_factory.mktemp("many_ref") / "cache"
    prepare_cache(read_manifest(manifest), out, Preprocess(), workers=2, progress=False)
    return manifest, {e["id"]: e["sha256"] for e in Cache(out).entries}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_prepare_survives_many_kills(tmp_path, many_phantoms, seed):
    manifest, reference = many_phantoms
    kills = _kill_and_resume(tmp_path / "cache", manifest, 16, kills=6, workers=1 + seed % 2, seed=seed)
    print(f"kills: (finished volumes, temp files) at each kill {kills}")
    assert len(kills) >= 5, kills
    _assert_complete_and_intact(tmp_path / "cache", reference)


def _descendants(pid: int, depth: int) -> list[int]:
    """Processes ``depth`` generations below ``pid`` (through /proc)."""
    level = [pid]
    for _ in range(depth):
        nxt = []
        for p in level:
            try:
                nxt += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
            except OSError:
                pass
        level = nxt
    return level


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc")
def test_a_killed_prepare_worker_is_an_error_not_a_hang(tmp_path, phantoms, reference):
    """The OOM killer takes one worker while the parent lives: `prepare` stops with one line naming the
    volumes in flight (no hang), keeps the finished ones, and a re-run completes the cache."""
    out = tmp_path / "cache"
    proc = subprocess.Popen([*VOXSEQ, "prepare", str(phantoms), "--out", str(out), "-j", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        t0, workers = time.monotonic(), []
        while proc.poll() is None and time.monotonic() - t0 < 120:
            workers = _descendants(proc.pid, 2)  # prepare -> forkserver -> workers
            if len(workers) == 2 and (out / "preprocess.yaml").exists():
                break
            time.sleep(0.01)
        assert proc.poll() is None and workers, "prepare ended before a worker could be killed"
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # a hang fails here
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "a prepare worker died" in err and "ct_00" in err and "re-run to resume" in err
    finished = len(list(out.glob("volumes/*/entry.json")))
    r = _cli("prepare", phantoms, "--out", out, "-j", "2", "--verify")
    assert r.returncode == 0, r.stderr
    assert f"reused {finished}" in r.stdout
    _assert_complete_and_intact(out, reference)
