"""Where a training task's volumes come from: an existing cache, a manifest/dataset folder, synthetic
phantoms and/or the bundled real samples, prepared once into a cache that later runs reuse."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from voxseq import VoxseqError
from voxseq.data.cache import Cache, prepare_cache
from voxseq.data.manifest import Record
from voxseq.data.preprocess import Preprocess

SAMPLE_NAMES = ("lung1", "brain1", "breast1")


@dataclass
class PhantomConfig:
    n_ct: int = 0
    n_mri: int = 0
    seed: int = 0
    size_xy: int = 128
    max_slices: int = 160
    version: int = 1  # phantom generation (voxseq.data.phantoms): 2 = overlapping intensities, textures
    findings: str = "basic"  # CT findings: basic (six) or ct-rate (the CT-RATE labels a phantom models, at its rates)

    def __post_init__(self) -> None:
        from voxseq.data.phantoms import FINDING_SETS

        if self.findings not in FINDING_SETS:
            raise VoxseqError(f"data.phantoms.findings must be one of {', '.join(FINDING_SETS)}, not {self.findings!r}")


@dataclass
class DataConfig:
    """``cache``: a cache folder to use (built here when missing); default ``RUN_DIR/cache``.
    ``source``: a manifest (.jsonl), CSV or dataset folder to prepare; ``phantoms`` and ``samples``
    add synthetic phantoms and the bundled real sample volumes. ``nonfinite``: ``error`` refuses volumes
    with NaN/Inf voxels, ``zero`` replaces those voxels with 0 (as ``prepare --nonfinite``)."""

    cache: str | None = None
    source: str | None = None
    phantoms: PhantomConfig = field(default_factory=PhantomConfig)
    samples: bool = False
    split: str | None = None  # read only this split of the cache (None: all)
    preprocess: Preprocess = field(default_factory=Preprocess)
    workers: int = 2  # prepare processes
    loader_workers: int = 0  # DataLoader worker processes
    nonfinite: str = "error"  # NaN/Inf voxels: error (refuse the volume) or zero (replace them with 0)
    # relabel when labels are read, {value: new value}, to merge or drop classes; values not listed become 0
    label_map: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nonfinite not in ("error", "zero"):
            raise VoxseqError(f"data.nonfinite must be error or zero, not {self.nonfinite!r}")
        try:  # keys come back as strings from JSON checkpoint metadata
            self.label_map = {int(k): int(v) for k, v in self.label_map.items()}
        except (TypeError, ValueError):
            raise VoxseqError(f"data.label_map must map label values to label values, not {self.label_map!r}") from None
        if any(not 0 <= v <= 255 for kv in self.label_map.items() for v in kv):
            raise VoxseqError(f"data.label_map values must be label values 0..255, not {self.label_map!r}")


def repo_path(relative: str) -> Path:
    """A file or folder shipped in the voxseq repository (``data/samples``, ``configs/...``)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / relative).exists() and (parent / "pyproject.toml").is_file():
            return parent / relative
    raise VoxseqError(f"{relative} is not found: it ships with the voxseq repository; install voxseq from a clone "
                      "(pip install -e .)")


def bundled_samples_dir() -> Path:
    """The real sample volumes shipped in the repository (``data/samples``)."""
    return repo_path("data/samples")


def sample_records() -> list[Record]:
    d = bundled_samples_dir()
    return [Record(id=f"sample_{n}", images={"image": str(d / f"{n}_image.nrrd")}, label=str(d / f"{n}_label.nrrd"))
            for n in SAMPLE_NAMES]


def gather_records(cfg: DataConfig, work_dir: Path, progress: bool = True) -> list[Record]:
    from voxseq.tasks.prepare import load_records

    records: list[Record] = []
    if cfg.source:
        records += load_records(cfg.source)
    if cfg.phantoms.n_ct or cfg.phantoms.n_mri:
        from voxseq.data.manifest import read_manifest
        from voxseq.data.phantoms import write_phantoms

        pc = cfg.phantoms
        folder = work_dir / (f"phantoms_ct{pc.n_ct}_mri{pc.n_mri}_seed{pc.seed}_{pc.size_xy}"
                             + (f"_v{pc.version}" if pc.version > 1 else "")
                             + (f"_{pc.findings.replace('-', '')}" if pc.findings != "basic" else ""))
        manifest = folder / "manifest.jsonl"
        if not manifest.is_file():
            write_phantoms(folder, n_ct=pc.n_ct, n_mri=pc.n_mri, seed=pc.seed, size_xy=pc.size_xy,
                           max_slices=pc.max_slices, progress=progress, version=pc.version, findings=pc.findings)
        records += read_manifest(manifest)
    if cfg.samples:
        records += sample_records()
    if not records:
        raise VoxseqError("no training data: set data.cache to a prepared cache, data.source to a manifest or "
                          "dataset folder, data.phantoms, or data.samples=true")
    return records


def ensure_cache(cfg: DataConfig, run_dir: Path, progress: bool = True) -> Path:
    """The cache folder to train from, preparing (or completing) it first when needed."""
    path = Path(cfg.cache) if cfg.cache else run_dir / "cache"
    if (path / "index.jsonl").is_file() and not (cfg.source or cfg.samples or cfg.phantoms.n_ct or cfg.phantoms.n_mri):
        return path  # a ready cache, nothing to add
    records = gather_records(cfg, path.parent, progress)
    index = path / "index.jsonl"
    if index.is_file():  # completing a cache rewrites its index with these records: never drop what it lists
        listed = {json.loads(line)["id"] for line in index.read_text(encoding="utf-8").splitlines() if line.strip()}
        extra = sorted(listed - {r.id for r in records})
        if extra:
            raise VoxseqError(
                f"{path} lists {len(extra)} volume(s) that the configured data does not ({', '.join(extra[:3])}"
                f"{', ...' if len(extra) > 3 else ''}); preparing it again would drop them from its index. To train on "
                "the cache as it is, set data.phantoms.n_ct=0 data.phantoms.n_mri=0 data.samples=false data.source=null; "
                "or give another data.cache folder")
    prepare_cache(records, path, cfg.preprocess, workers=cfg.workers, nonfinite=cfg.nonfinite, progress=progress)
    return path


def open_cache(path: Path, split: str | None, label_map: dict[int, int] | None = None) -> Cache:
    """The cache at ``path`` (one split or all); ``label_map`` relabels what ``label(i)`` returns."""
    cache = Cache(path, split=split, label_map=label_map)
    if len(cache) == 0:
        raise VoxseqError(f"{path}: no volumes{f' in split {split!r}' if split else ''}")
    return cache


def training_cache(cfg: DataConfig, run_dir: Path, split: str | None, *, main: bool = True, progress: bool = True) -> Cache:
    """The cache a training run reads: the main process prepares (or completes) it, the others wait for it
    (under torchrun), then every process opens it."""
    from voxseq.train.distributed import barrier

    if main:
        ensure_cache(cfg, run_dir, progress)
    barrier()
    return open_cache(Path(cfg.cache) if cfg.cache else run_dir / "cache", split, cfg.label_map)
