"""The voxel cache: preprocess a corpus once, read crops from it fast and lazily for ever after.

Layout of a cache folder::

    CACHE/
      preprocess.yaml             the Preprocess config every volume went through
      volumes/<id>/image.npy      float16 (C, Z, Y, X), C-contiguous
      volumes/<id>/label.npy      uint8 (Z, Y, X), when the record has a label
      volumes/<id>/regions.npy    uint32 (Z, Y, X), when the record has region masks (RadGenome): bit r is
                                  set where region entry["regions"][r] is; regions may overlap
      volumes/<id>/entry.json     shape, spacing, geometry, intensity statistics, boxes in this grid (and as
                                  the record gives them),
                                  each file's byte size and sha256; written last: its presence marks a
                                  finished volume
      index.jsonl                 all finished entries, rebuilt at the end of every `prepare`
      skipped.jsonl               records that failed with --on-error skip, with the reason

Why plain ``.npy`` files read through ``np.load(mmap_mode="r")``: a random (Z, Y, X) crop of a
C-contiguous array is a few thousand contiguous row reads straight out of the page cache, with no
decompression and no per-chunk bookkeeping. Keeping each file's memory map open for the life of a
reader (a bounded LRU of maps) avoids re-mapping and page-faulting on every crop; on a 2-core CPU
that reads a 128x128x32 float16 crop in ~0.4 ms, about 4x faster than re-opening the file per crop and
far faster than chunked, compressed stores (zarr/HDF5), which decompress whole chunks per read. The
files are standard numpy: any tool can open them. Memory stays bounded by the open maps (pages
are evictable page cache), whatever the corpus size.

Writing is crash-safe: every file is written under a temporary name and renamed into place, and
``entry.json`` goes last, so a partial volume is never taken for a finished one; re-running
``prepare`` skips finished volumes and redoes the rest. A finished volume whose record has changed since
(its text, sentences, classes, extra fields or lesion boxes: a regenerated manifest) is prepared again, so
that new boxes or reports are never read beside an old entry.

Concurrency: ``prepare_cache`` holds an exclusive lock on ``<out_dir>/.lock`` (``filelock``, an OS file lock that
is released when the process ends, however it ends) from before ``overwrite`` to the last index write. A second
``prepare`` on the same folder waits for the first (saying so once on stderr) and then reuses what it finished;
after ``VOXSEQ_PREPARE_LOCK_TIMEOUT`` seconds (default: no limit) it stops with one line naming the folder.

Integrity: a finished volume whose files no longer match its ``entry.json`` (a truncated, replaced or
deleted ``.npy``, an unreadable ``entry.json``) is *broken*. Re-running ``prepare`` always checks byte
sizes (one ``stat`` per file) and, with ``verify=True``, every sha256; a broken volume stops the run
with one line naming the file, since rebuilding it silently would hide a failing disk or a stray
writer. ``repair=True`` verifies every checksum and rebuilds exactly the broken volumes, leaving the
intact ones untouched. Readers check sizes when they open a file and, with ``Cache(verify=True)``,
checksums too (see :meth:`Cache.check`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from voxseq import VoxseqError
from voxseq.config import from_dict, load_yaml, save_yaml, to_dict
from voxseq.files import atomic_write, sha256_file
from voxseq.data.manifest import Box, Record
from voxseq.data.preprocess import Preprocess, check_same_grid, preprocess
from voxseq.io.volume import Volume, VolumeReadError, read_volume

CACHE_VERSION = 1
ON_ERROR = ("stop", "skip")
MAX_REGIONS = 32  # bits of a uint32 regions.npy voxel


# ---------------------------------------------------------------------------- small file helpers


DISK_FULL = "no space left on device"  # in the message of every write that ran out of space
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(VoxseqError):
    """A write ran out of disk space (or quota): ``<path>: no space left on device ...``, one line."""


@contextlib.contextmanager
def _disk_full_is_one_line(path: Path, what: str = "") -> Iterator[None]:
    """A write that ran out of space becomes one :class:`DiskFull` line (the atomic write leaves nothing behind)."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise DiskFull(f"{path}: {DISK_FULL} while writing it{what} ({e.strerror or e}); "
                           "free space and run the command again to resume") from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _disk_full_is_one_line(path):
        atomic_write(path, lambda p: p.write_bytes(data))


def atomic_save_npy(path: Path, array: np.ndarray) -> str:
    """Save an array as .npy under a temporary name, fsync, rename; returns its sha256."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)

    with _disk_full_is_one_line(path):
        atomic_write(path, write)
    return sha256_file(path)


def safe_id(record_id: str) -> str:
    """A record id as a folder name (ids may contain slashes, e.g. relative paths)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in record_id).strip(".") or "_"


# ---------------------------------------------------------------------------- one volume


def load_record(record: Record, nonfinite: str = "error") -> tuple[Volume, Volume | None]:
    """Read a record's image(s) as one (C, Z, Y, X) volume (channels in ``images`` order) and its label."""
    vols = []
    for name, path in record.images.items():
        v = read_volume(path, spacing=record.spacing, nonfinite=nonfinite)
        if vols:
            check_same_grid(vols[0], v)  # co-registered modalities must share one grid
        vols.append(v)
    if len(vols) == 1:
        image = vols[0]
        if image.array.ndim == 3:
            image.array = image.array[None]
    else:
        arrays = [v.array if v.array.ndim == 4 else v.array[None] for v in vols]
        image = Volume(np.concatenate(arrays), vols[0].spacing, vols[0].origin, vols[0].direction, dict(vols[0].meta))
    names = list(record.images)
    if len(vols) == 1 and image.channels > 1:  # one 4-D file: its channels are unnamed
        names = [f"{names[0]}_{c}" for c in range(image.channels)]
    image.meta["modalities"] = names
    label = None
    if record.label:
        label = read_volume(record.label, spacing=record.spacing, nonfinite=nonfinite)
        if label.array.ndim != 3:
            raise VolumeReadError(record.label, "a label must be a single 3-D volume")
    return image, label


def _index_to_physical(idx_xyz: np.ndarray, origin, spacing, direction) -> np.ndarray:
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    return np.asarray(origin, float) + (d @ (np.asarray(idx_xyz, float) * np.asarray(spacing, float)).T).T


def _physical_to_index(phys: np.ndarray, origin, spacing, direction) -> np.ndarray:
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    return (np.linalg.solve(d, (np.asarray(phys, float) - np.asarray(origin, float)).T).T) / np.asarray(spacing, float)


def box_to_grid(box: Box, source_meta: dict, grid: Volume) -> list[int]:
    """A box in the source file's voxel grid (x, y, z) -> [z0, y0, x0, z1, y1, x1] in ``grid``.

    Maps both corners through physical space, so reorientation, resampling and cropping are all
    accounted for; the result is clamped to the grid.
    """
    b = np.asarray(box.bbox_xyz, float)
    corners = np.array([[b[i] if (k >> j) & 1 == 0 else b[i + 3] for j, i in enumerate(range(3))] for k in range(8)])
    corners = corners - 0.5  # voxel edges: index i spans [i - 0.5, i + 0.5]
    phys = _index_to_physical(corners, source_meta["source_origin_xyz"], source_meta["source_spacing_xyz"],
                              source_meta["source_direction"])
    idx = _physical_to_index(phys, grid.origin, grid.spacing, grid.direction) + 0.5
    lo = np.floor(idx.min(0) + 1e-6).astype(int)
    hi = np.ceil(idx.max(0) - 1e-6).astype(int)
    size = np.array(grid.size_xyz)
    lo, hi = np.clip(lo, 0, size), np.clip(hi, 0, size)
    return [int(lo[2]), int(lo[1]), int(lo[0]), int(hi[2]), int(hi[1]), int(hi[0])]


def intensity_stats(array: np.ndarray) -> list[dict[str, float]]:
    """Per-channel mean, std, min, max and 1/50/99 percentiles (on a strided subsample for speed)."""
    stats = []
    for c in array:
        sub = c[:: max(1, c.shape[0] // 32)].astype(np.float32)
        p1, p50, p99 = np.percentile(sub, [1, 50, 99])
        stats.append({"mean": float(c.mean(dtype=np.float64)), "std": float(sub.std()), "min": float(c.min()),
                      "max": float(c.max()), "p1": float(p1), "p50": float(p50), "p99": float(p99)})
    return stats


def mask_on_grid(mask: Volume, grid: Volume) -> np.ndarray:
    """A mask resampled (nearest neighbour) onto a preprocessed volume's grid: (Z, Y, X) bool.

    Through physical space, so whatever ``preprocess`` did to the image (reorientation, resampling,
    foreground crop, padding) the mask follows; outside the mask's own extent it is empty.
    """
    import SimpleITK as sitk

    src = mask.to_sitk((mask.array > 0).astype(np.uint8))  # (first channel of a 4-D mask)
    ref = grid.to_sitk(np.zeros(grid.shape_zyx, np.uint8))
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out) > 0


def region_bits(record: Record, grid: Volume, nonfinite: str = "error") -> tuple[np.ndarray, list[str]]:
    """A record's region masks packed as bits on ``grid``: uint32 (Z, Y, X), bit r = region ``names[r]``.

    One bit-packed array instead of a file per region: RadGenome regions overlap (a lobe inside a lung),
    and a chunk's regions are then one read of the chunk.
    """
    names = list(record.masks)
    if len(names) > MAX_REGIONS:
        raise VoxseqError(f"{record.id}: {len(names)} region masks, but at most {MAX_REGIONS} fit in regions.npy")
    bits = np.zeros(grid.shape_zyx, np.uint32)
    for r, name in enumerate(names):
        mask = read_volume(record.masks[name], spacing=record.spacing, nonfinite=nonfinite)
        bits |= mask_on_grid(mask, grid).astype(np.uint32) << np.uint32(r)
    return bits, names


def prepare_one(record: Record, cfg: Preprocess, out_dir: Path, nonfinite: str = "error") -> dict[str, Any]:
    """Preprocess one record into ``out_dir/volumes/<id>/``; returns its entry (also written as entry.json)."""
    t0 = time.perf_counter()
    image, label = load_record(record, nonfinite)
    raw_min, raw_max = float(image.array.min()), float(image.array.max())
    source_meta = image.meta
    image, label = preprocess(image, label, cfg)
    folder = out_dir / "volumes" / safe_id(record.id)
    folder.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {
        "id": record.id,
        "folder": f"volumes/{safe_id(record.id)}",
        "split": record.split,
        "modalities": source_meta["modalities"],
        "shape_zyx": list(image.shape_zyx),
        "channels": image.channels,
        "spacing_xyz": [float(s) for s in image.spacing],
        "origin_xyz": [float(o) for o in image.origin],
        "direction": [float(d) for d in image.direction],
        "source": {k: source_meta[k] for k in ("path", "format", "source_orientation", "source_size_xyz",
                                               "source_spacing_xyz") if k in source_meta},
        "raw_range": [raw_min, raw_max],
        "stats": intensity_stats(image.array),
        "preprocess": image.meta.get("preprocess", {}),
        "classes": record.classes,
        "text": record.text,
        "sentences": record.sentences,
        "boxes": [{"category": b.category, "bbox_zyx": box_to_grid(b, source_meta, image),
                   "bbox_xyz": [int(v) for v in b.bbox_xyz],  # as the record gives it (see record_changed)
                   **({"organ": b.organ} if b.organ else {}), **({"text": b.text} if b.text else {})}
                  for b in record.boxes],
        "has_label": label is not None,
        "extra": record.extra,
    }
    entry["sha256"] = {"image.npy": atomic_save_npy(folder / "image.npy", image.array.astype(np.float16))}
    if label is not None:
        entry["label_values"] = [int(v) for v in np.unique(label.array)]
        entry["sha256"]["label.npy"] = atomic_save_npy(folder / "label.npy", label.array)
    if record.masks:
        bits, entry["regions"] = region_bits(record, image, nonfinite)
        entry["sha256"]["regions.npy"] = atomic_save_npy(folder / "regions.npy", bits)
    entry["bytes"] = {name: (folder / name).stat().st_size for name in entry["sha256"]}
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_bytes(folder / "entry.json", json.dumps(entry).encode())
    return entry


def file_problem(folder: Path, entry: dict, name: str, full: bool) -> str | None:
    """What is wrong with one of a finished volume's files, as ``"<path>: <cause>"``; None when it matches
    ``entry.json`` (its byte size always, its sha256 too when ``full``)."""
    path = folder / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing (entry.json lists it)"
    want = entry.get("bytes", {}).get(name)
    if want is not None and size != want:
        return f"{path}: {size} bytes, entry.json records {want} (truncated or overwritten)"
    if full and sha256_file(path) != entry.get("sha256", {}).get(name):
        return f"{path}: sha256 does not match entry.json (corrupt)"
    return None


def volume_problems(folder: Path, entry: dict, full: bool) -> list[str]:
    """Problems of every file of a finished volume (empty when intact); see :func:`file_problem`."""
    problems = (file_problem(folder, entry, name, full) for name in entry.get("sha256", {}))
    return [p for p in problems if p is not None]


# ---------------------------------------------------------------------------- the whole corpus


@dataclass
class PrepareSummary:
    out_dir: str
    done: int = 0
    reused: int = 0
    repaired: list[str] = field(default_factory=list)  # ids of broken volumes deleted and rebuilt
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    bytes_written: int = 0
    warnings: list[str] = field(default_factory=list)  # one line each, for the user to see

    @property
    def volumes_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / self.seconds if self.seconds > 0 else 0.0


def _worker(args: tuple[Record, Preprocess, str, str]) -> tuple[str, dict | None, str | None]:
    record, cfg, out_dir, nonfinite = args
    try:
        return record.id, prepare_one(record, cfg, Path(out_dir), nonfinite), None
    except (VoxseqError, OSError, ValueError, RuntimeError, MemoryError) as e:
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:  # a write outside the atomic helpers
            return record.id, None, f"{out_dir}: {DISK_FULL} while writing volume {record.id} ({e.strerror or e})"
        return record.id, None, str(e) if isinstance(e, VoxseqError) else f"{record.id}: {type(e).__name__}: {e}"


def _check_or_write_preprocess(out_dir: Path, cfg: Preprocess) -> None:
    path = out_dir / "preprocess.yaml"
    wanted = {"cache_version": CACHE_VERSION, "preprocess": to_dict(cfg)}
    if path.exists():
        have = load_yaml(path)
        if have != wanted:
            raise VoxseqError(f"{out_dir}: this cache was built with a different preprocessing "
                              f"({path}); use another --out folder or --overwrite")
    else:
        save_yaml(wanted, path)


def _finished_entry(out_dir: Path, record: Record, full: bool = False) -> tuple[dict | None, list[str]]:
    """(entry, []) for an intact finished volume, (None, []) for one not finished yet (no entry.json, or
    the folder of another id), (None, problems) for a broken one (see the module docstring)."""
    path = out_dir / "volumes" / safe_id(record.id) / "entry.json"
    if not path.is_file():
        return None, []
    try:
        entry = json.loads(path.read_text())
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), dict):
            raise ValueError("not a volume entry")
    except (ValueError, OSError) as e:  # written atomically, so never a crash's leftover
        return None, [f"{path}: unreadable entry.json ({type(e).__name__})"]
    if entry.get("id") != record.id:
        return None, []
    problems = volume_problems(path.parent, entry, full)
    if problems:
        return None, problems
    return (None, []) if record_changed(entry, record) else (entry, [])


def record_changed(entry: dict, record: Record) -> bool:
    """Whether a finished volume's entry was written from a different version of its record's text, sentences,
    classes, extra or lesion boxes (a regenerated manifest): the volume is then prepared again, so that a cache
    never pairs new images or reports with old boxes or text. Compared through JSON, as the entry stores them; boxes
    by category, organ, text and their record coordinates (an entry written before it kept those is prepared
    again)."""
    def norm(x: Any) -> str:
        return json.dumps(x, sort_keys=True)

    boxes = [[b.get("category"), b.get("organ"), b.get("text"), b.get("bbox_xyz")] for b in entry.get("boxes") or []]
    return (norm([entry.get("text"), entry.get("sentences"), entry.get("classes"), entry.get("extra"), boxes])
            != norm([record.text, record.sentences, record.classes, record.extra,
                     [[b.category, b.organ, b.text, [int(v) for v in b.bbox_xyz]] for b in record.boxes]]))


def _clean_partial(out_dir: Path) -> None:
    """Remove temporary files that an interrupted run left behind."""
    for tmp in [*out_dir.glob(".tmp-*"), *out_dir.glob("volumes/*/.tmp-*")]:
        tmp.unlink(missing_ok=True)


def prepare_cache(records: Iterable[Record], out_dir: str | os.PathLike, cfg: Preprocess, *, workers: int = 1,
                  on_error: str = "stop", nonfinite: str = "error", overwrite: bool = False,
                  verify: bool = False, repair: bool = False, progress: bool = True) -> PrepareSummary:
    """Preprocess ``records`` into a cache at ``out_dir`` (see the module docstring).

    Volumes already finished (``entry.json`` present, files of the recorded sizes, and with ``verify``
    or ``repair`` of the recorded sha256) are reused; the rest run in ``workers`` processes, one
    volume each at a time, so memory stays bounded by ``workers`` volumes. A broken finished volume
    raises a one-line :class:`VoxseqError` naming the file, unless ``repair`` (then it is deleted and
    rebuilt, and listed in ``summary.repaired``). With ``on_error="skip"`` a failing record is logged in
    ``skipped.jsonl`` and the run goes on; with ``"stop"`` the run stops at the first failure, keeping
    everything finished before it.
    """
    if on_error not in ON_ERROR:
        raise VoxseqError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with cache_lock(out_dir):
        return _prepare_locked(records, out_dir, cfg, workers=workers, on_error=on_error, nonfinite=nonfinite,
                               overwrite=overwrite, verify=verify, repair=repair, progress=progress)


LOCK_NAME = ".lock"


@contextlib.contextmanager
def cache_lock(out_dir: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the cache folder's exclusive lock; wait for another holder (one note on stderr), at most ``timeout``
    seconds (default: ``VOXSEQ_PREPARE_LOCK_TIMEOUT``, else no limit), then a one-line :class:`VoxseqError`."""
    from filelock import FileLock, Timeout

    if timeout is None:
        timeout = float(os.environ.get("VOXSEQ_PREPARE_LOCK_TIMEOUT", -1))
    lock = FileLock(str(out_dir / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"voxseq: waiting for another voxseq prepare writing {out_dir} to finish", file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise VoxseqError(f"{out_dir}: the cache folder is locked by another voxseq prepare (still running after "
                              f"{timeout:g} s of waiting; VOXSEQ_PREPARE_LOCK_TIMEOUT); wait for it or use another "
                              "--out") from None
    try:
        yield
    finally:
        lock.release()


def _prepare_locked(records: Iterable[Record], out_dir: Path, cfg: Preprocess, *, workers: int, on_error: str,
                    nonfinite: str, overwrite: bool, verify: bool, repair: bool, progress: bool) -> PrepareSummary:
    if overwrite:  # everything but the lock this process holds
        for child in out_dir.iterdir():
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    _check_or_write_preprocess(out_dir, cfg)
    _clean_partial(out_dir)
    t0 = time.perf_counter()
    summary = PrepareSummary(str(out_dir))
    records = list(records)  # records are small (paths and text); the volumes are never all in memory
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise VoxseqError(f"duplicate record ids in the input: {dup}")
    finished: dict[str, dict] = {}
    todo, broken = [], []
    for r in records:
        entry, problems = _finished_entry(out_dir, r, full=verify or repair)
        if entry is not None:
            finished[r.id] = entry
            summary.reused += 1
        else:
            todo.append(r)
            broken += [(r.id, p) for p in problems]
    if broken and not repair:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise VoxseqError(f"{broken[0][1]}{more}; re-run with --repair to rebuild the broken volume(s), leaving "
                          f"intact ones as they are")
    for rid in dict(broken):
        shutil.rmtree(out_dir / "volumes" / safe_id(rid), ignore_errors=True)
        summary.repaired.append(rid)
    with _progress(progress, len(todo), "prepare") as advance:
        results = _run(todo, cfg, out_dir, nonfinite, workers)
        for rid, entry, error in _with_index_on_failure(results, out_dir, records, finished, summary):
            if error is None:
                finished[rid] = entry
                summary.done += 1
                summary.bytes_written += sum(entry["bytes"].values())
            else:
                if DISK_FULL in error:  # not the volume's fault: stop whatever --on-error says, keep what is finished
                    with contextlib.suppress(VoxseqError):
                        _write_index(out_dir, records, finished, summary)
                    raise DiskFull(error if "run the command again" in error else
                                   f"{error}; free space and run the command again to resume")
                summary.skipped.append({"id": rid, "error": error})
                if on_error == "stop":
                    _write_index(out_dir, records, finished, summary)
                    raise VoxseqError(error)
            advance()
    summary.seconds = time.perf_counter() - t0
    _write_index(out_dir, records, finished, summary)
    return summary


def _with_index_on_failure(results: Iterator, out_dir: Path, records, finished, summary) -> Iterator:
    """Pass the results through; when the workers fail, write the index of what is finished before raising."""
    try:
        yield from results
    except WorkerDied:
        _write_index(out_dir, records, finished, summary)
        raise


class WorkerDied(VoxseqError):
    """A prepare worker process ended without a result (killed by the OS, out of memory, a crash in a reader)."""


def _run(todo: list[Record], cfg: Preprocess, out_dir: Path, nonfinite: str, workers: int) -> Iterator:
    jobs = ((r, cfg, str(out_dir), nonfinite) for r in todo)
    if workers <= 1 or len(todo) <= 1:
        yield from map(_worker, jobs)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # forkserver workers start clean (no copy of the parent's threads) and are replaced every 16 volumes, so a
    # reader that leaks cannot grow a worker for ever; a worker that dies breaks the pool, which is noticed
    ctx = mp.get_context("spawn" if os.environ.get("VOXSEQ_MP_SPAWN") else "forkserver")
    pending: dict = {}
    jobs = iter(jobs)
    with ProcessPoolExecutor(workers, mp_context=ctx, max_tasks_per_child=16) as pool:
        def submit() -> None:  # keep 2 volumes per worker in flight: the parent never holds the whole to-do list
            for job in jobs:
                pending[pool.submit(_worker, job)] = job[0].id
                if len(pending) >= 2 * workers:
                    return

        submit()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                rid = pending.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    ids = sorted([rid, *pending.values()])
                    raise WorkerDied(f"a prepare worker died without a result (killed by the OS? out of memory?) while "
                                     f"preparing one of {', '.join(ids[:6])}{' ...' if len(ids) > 6 else ''}; the "
                                     "finished volumes are kept: re-run to resume, -j 1 to find the volume") from None
            submit()


class _progress:
    """A rich progress bar that degrades to nothing when disabled (tests, non-interactive logs)."""

    def __init__(self, enabled: bool, total: int, description: str):
        self.enabled, self.total, self.description = enabled and total > 0, total, description

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
        self.bar.__enter__()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


def _write_index(out_dir: Path, records: list[Record], finished: dict[str, dict], summary: PrepareSummary) -> None:
    """index.jsonl lists finished volumes in input order; skipped.jsonl the failures of this run."""
    lines = [json.dumps(finished[r.id]) for r in records if r.id in finished]
    atomic_write_bytes(out_dir / "index.jsonl", ("\n".join(lines) + ("\n" if lines else "")).encode())
    skipped = "".join(json.dumps(s) + "\n" for s in summary.skipped)
    atomic_write_bytes(out_dir / "skipped.jsonl", skipped.encode())


# ---------------------------------------------------------------------------- reading


class Cache:
    """Read side of a cache; implements the ``VolumeSource`` protocol of ``voxseq.sequence``.

    ``image(i)`` is a read-only float16 memmap (C, Z, Y, X): slicing it reads only the crop.
    Open maps are kept in an LRU of ``max_open`` files, so a worker's memory does not grow with the
    corpus. Safe to pickle into DataLoader workers (maps are reopened in each process).

    Opening a file checks its byte size against ``entry.json`` (a ``stat``); with ``verify=True`` the
    first opening of each file also checks its sha256. A file that does not match raises a
    :class:`VoxseqError` naming it, instead of numpy's error or silently wrong voxels.
    """

    def __init__(self, path: str | os.PathLike, split: str | None = None, max_open: int = 64, verify: bool = False,
                 label_map: dict[int, int] | None = None):
        self.path = Path(path)
        self._label_lut = None  # uint8 look-up table: label value -> mapped value (values not listed -> 0)
        if label_map:
            self._label_lut = np.zeros(256, np.uint8)
            for k, v in label_map.items():
                self._label_lut[int(k)] = int(v)
        index = self.path / "index.jsonl"
        if not index.is_file():
            raise VoxseqError(f"{self.path}: not a voxseq cache (no index.jsonl); build one with `voxseq prepare`")
        entries = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
        if split is not None:
            entries = [e for e in entries if e["split"] == split]
        self.entries = entries
        self.split = split
        self.max_open = max_open
        self.verify_checksums = verify
        self._verified: set[tuple[int, str]] = set()  # files whose sha256 matched (hashed once per reader)
        self._maps: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        data = load_yaml(self.path / "preprocess.yaml")
        self.preprocess = from_dict(Preprocess, data.get("preprocess", {}))

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        return state

    def _map(self, i: int, name: str) -> np.ndarray:
        key = (i, name)
        arr = self._maps.get(key)
        if arr is None:
            full = self.verify_checksums and key not in self._verified
            problem = file_problem(self.path / self.entries[i]["folder"], self.entries[i], name, full)
            if problem is not None:
                raise VoxseqError(f"{problem}; rebuild it with `voxseq prepare ... --repair`")
            if full:
                self._verified.add(key)
            arr = np.load(self.path / self.entries[i]["folder"] / name, mmap_mode="r")
            self._maps[key] = arr
            if len(self._maps) > self.max_open:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(key)
        return arr

    def image(self, i: int) -> np.ndarray:
        return self._map(i, "image.npy")

    def label(self, i: int) -> np.ndarray | None:
        """uint8 (Z, Y, X) labels (a memmap; an array when relabelled through ``label_map``), or None."""
        if not self.entries[i].get("has_label"):
            return None
        lab = self._map(i, "label.npy")
        return lab if self._label_lut is None else self._label_lut[lab]

    def regions(self, i: int) -> np.ndarray | None:
        """uint32 (Z, Y, X) memmap of region bits (bit r = region ``entry(i)["regions"][r]``), or None."""
        return self._map(i, "regions.npy") if self.entries[i].get("regions") else None

    def entry(self, i: int) -> dict:
        return self.entries[i]

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.entries]

    def verify(self, i: int) -> list[str]:
        """Names of this volume's files whose size or checksum does not match (empty when intact)."""
        e = self.entries[i]
        return [name for name in e.get("sha256", {}) if file_problem(self.path / e["folder"], e, name, True)]

    def check(self, i: int, full: bool = True) -> None:
        """Raise a one-line :class:`VoxseqError` naming the first file of volume ``i`` that does not match
        its ``entry.json`` (sizes; sha256 too when ``full``)."""
        problems = volume_problems(self.path / self.entries[i]["folder"], self.entries[i], full)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise VoxseqError(f"{problems[0]}{more}; rebuild it with `voxseq prepare ... --repair`")
