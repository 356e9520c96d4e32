"""Folders of 16-bit PNG slices, as DeepLesion distributes its CT (``Images_png/<series>/<slice>.png``).

Each PNG holds one axial slice with ``HU = value - 32768``; the spacing comes from the dataset's
``DL_info.csv`` (``Spacing_mm_px_``), so the caller passes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from voxseq.io.volume import CANONICAL_ORIENTATION, Volume, VolumeReadError, _first_itk_line, _quiet_itk


def is_png_series(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() == ".png" for p in folder.iterdir())


def read_png_series(folder: str | os.PathLike, spacing_xyz: Sequence[float] | None, hu_offset: int = 32768) -> Volume:
    """Stack the folder's PNG slices (sorted by their numeric names) into an int16 HU volume."""
    import SimpleITK as sitk

    folder = Path(folder)
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() == ".png"),
                   key=lambda p: (int(p.stem) if p.stem.isdigit() else 10**9, p.name))
    if len(files) < 2:
        raise VolumeReadError(folder, "a PNG slice series needs at least 2 slices")
    if spacing_xyz is None:
        raise VolumeReadError(folder, "PNG slice series carry no spacing: pass spacing (x, y, z) in mm")
    slices = []
    for f in files:
        try:
            with _quiet_itk():  # libpng prints its errors ("libpng error: Read Error") to stderr
                a = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        except RuntimeError as e:
            raise VolumeReadError(f, f"unreadable PNG slice ({_first_itk_line(e, f)})") from None
        if a.ndim != 2:
            raise VolumeReadError(f, f"expected a single-channel 2-D slice, got shape {a.shape}")
        slices.append(a)
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise VolumeReadError(folder, f"PNG slices of different sizes {sorted(shapes)}")
    hu = (np.stack(slices).astype(np.int32) - hu_offset).clip(-32768, 32767).astype(np.int16)  # (Z, Y, X)
    spacing = tuple(float(s) for s in spacing_xyz)
    meta = {"path": str(folder), "format": "PNG series", "source_orientation": CANONICAL_ORIENTATION,
            "source_size_xyz": [hu.shape[2], hu.shape[1], hu.shape[0]], "source_spacing_xyz": list(spacing),
            "source_origin_xyz": [0.0, 0.0, 0.0], "source_direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
            "source_dtype": "uint16", "slices": [f.name for f in files]}
    return Volume(hu, spacing, meta=meta)  # type: ignore[arg-type]
