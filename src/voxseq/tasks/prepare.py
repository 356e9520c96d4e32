"""`voxseq prepare`: a manifest, CSV or dataset folder -> a voxel cache."""

from __future__ import annotations

import json
from pathlib import Path

from voxseq import VoxseqError
from voxseq.config import apply_overrides, from_dict, load_yaml
from voxseq.data.cache import PrepareSummary, prepare_cache
from voxseq.data.manifest import Record, read_manifest
from voxseq.data.preprocess import Preprocess
from voxseq.io.volume import VOLUME_SUFFIXES


def load_records(source: str | Path, adapter: str | None = None) -> list[Record]:
    """Records from a manifest (.jsonl), a single volume file, or a dataset folder / CSV (through an adapter)."""
    source = Path(source)
    if not source.exists():
        raise VoxseqError(f"{source}: no such file or directory")
    if source.is_file() and source.suffix == ".jsonl":
        return read_manifest(source)
    if source.is_file() and source.name.lower().endswith(VOLUME_SUFFIXES):  # a single scan
        stem = source.name.split(".")[0]
        return [Record(id=stem, images={"image": str(source)})]
    from voxseq.data.adapters import build_manifest, detect_dataset

    return build_manifest(adapter or detect_dataset(source), source)


def build_preprocess(config: str | Path | None = None, window: str | None = None, spacing: str | None = None,
                     overrides: list[str] | None = None) -> Preprocess:
    """A Preprocess from an optional YAML (top level or a `preprocess:` section) plus CLI shortcuts."""
    data = load_yaml(config) if config else {}
    data = dict(data.get("preprocess", data))
    if window:
        data.update(intensity="window", window=window)
    if spacing:
        try:
            data["spacing_xyz"] = [float(s) for s in spacing.split(",")]
        except ValueError:
            raise VoxseqError(f"--spacing {spacing!r}: expected three numbers 'x,y,z'") from None
    apply_overrides(data, list(overrides or []))
    return from_dict(Preprocess, data)


def run_prepare(source: str | Path, out: str | Path, *, config=None, adapter=None, window=None, spacing=None,
                workers: int = 2, on_error: str = "stop", nonfinite: str = "error", overwrite: bool = False,
                verify: bool = False, repair: bool = False, overrides: list[str] | None = None,
                progress: bool = True) -> PrepareSummary:
    cfg = build_preprocess(config, window, spacing, overrides)
    records = load_records(source, adapter)
    if not records:
        raise VoxseqError(f"{source}: no volumes found")
    summary = prepare_cache(records, out, cfg, workers=workers, on_error=on_error, nonfinite=nonfinite,
                            overwrite=overwrite, verify=verify, repair=repair, progress=progress)
    if cfg.intensity == "window":
        summary.warnings += window_warnings(Path(out), cfg)
    return summary


def window_warnings(out: Path, cfg: Preprocess) -> list[str]:
    """A CT window applied to volumes that are not CT in HU (no voxel below 0: MRI, most likely) turns them
    into noise; name them, since the window is the user's choice for the whole folder."""
    index = out / "index.jsonl"
    entries = [json.loads(line) for line in index.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if index.is_file() else []
    odd = [e["id"] for e in entries if e.get("raw_range") and e["raw_range"][0] >= 0]
    if not odd:
        return []
    what = f"--window {cfg.window}" if cfg.window and cfg.hu_range is None and cfg.hu_windows is None else "the CT window"
    names = ", ".join(odd[:5]) + (f", ... ({len(odd) - 5} more)" if len(odd) > 5 else "")
    return [f"{len(odd)} of {len(entries)} volume(s) have no voxel below 0, so are not CT in HU (MRI?), yet "
            f"{what} (a CT window) was applied to them: {names}; give them a cache of their own, without a CT window"]
