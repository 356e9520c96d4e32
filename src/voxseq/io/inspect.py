"""What `voxseq info` reports about a volume file or DICOM folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from voxseq.io.volume import VOLUME_SUFFIXES, read_volume


def _is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def expand_inputs(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files as given; a folder holding volume files yields those files (sorted), any other folder
    (a DICOM series, or a missing path) is yielded as is for ``read_volume`` to judge."""
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if _is_volume_file(f))
            if files:
                yield from files
                continue
        yield p


def volume_info(path: str | os.PathLike) -> dict[str, Any]:
    """Geometry and intensity summary of one input, in the file's own terms (size and orientation
    of the file's grid; ``voxseq`` reads it into canonical LPS, which ``canonical_orientation`` names)."""
    v = read_volume(path, nonfinite="zero")
    a = v.array
    m = v.meta
    return {
        "path": str(path),
        "format": m.get("format"),
        "size_xyz": [int(s) for s in m.get("source_size_xyz", v.size_xyz)],
        "spacing_xyz": [float(s) for s in m.get("source_spacing_xyz", v.spacing)],
        "origin_xyz": [float(o) for o in m.get("source_origin_xyz", v.origin)],
        "direction": [float(x) for x in m.get("source_direction", v.direction)],  # 3x3, row-major, as ITK stores it
        "orientation": m.get("source_orientation", v.orientation),
        "canonical_orientation": v.orientation,
        "channels": v.channels,
        "dtype": str(a.dtype),
        "min": float(a.min()),
        "max": float(a.max()),
        "mean": float(a.mean(dtype=np.float64)),
        "nonfinite_voxels": int(m.get("nonfinite_replaced", 0)),
        **({"dicom": m["dicom"], "other_series": m.get("other_series", [])} if "dicom" in m else {}),
    }
