"""Shared fixtures: the bundled real samples (data/samples) and small synthetic files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


def write_dicom_series(img, folder: Path, series_uid: str, *, intercept: float = -1024.0, slope: float = 1.0,
                       series_number: int = 1, shuffle_names: bool = True) -> list[Path]:
    """Write a 3-D SimpleITK image as a DICOM series (one file per slice) with position tags and a
    rescale intercept, the way scanners store CT: stored = (HU - intercept) / slope as uint16."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    stored = np.round((arr - intercept) / slope).astype(np.uint16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = img.GetDirection()
    n = img.GetSize()[2]
    order = np.random.default_rng(0).permutation(n) if shuffle_names else np.arange(n)
    paths = []
    for i in range(n):
        s = sitk.GetImageFromArray(stored[i])
        s.SetSpacing(img.GetSpacing()[:2])
        pos = img.TransformIndexToPhysicalPoint((0, 0, i))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{i + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0011": str(series_number),
            "0020|0013": str(i + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in pos),
            "0020|0037": "\\".join(f"{d:.6f}" for d in (direction[0], direction[3], direction[6],
                                                           direction[1], direction[4], direction[7])),
            "0018|0050": f"{img.GetSpacing()[2]:.6f}",
            "0028|1052": f"{intercept:g}",
            "0028|1053": f"{slope:g}",
            "0028|0030": f"{img.GetSpacing()[1]:.6f}\\{img.GetSpacing()[0]:.6f}",
        }
        for k, v in tags.items():
            s.SetMetaData(k, v)
        path = folder / f"IM{series_number}_{order[i]:04d}.dcm"  # names not in slice order
        writer.SetFileName(str(path))
        writer.Execute(s)
        paths.append(path)
    _set_stored_pixels(paths, stored, intercept, slope)
    return paths


def _set_stored_pixels(paths: list[Path], stored: np.ndarray, intercept: float, slope: float) -> None:
    """The GDCM writer picks its own pixel encoding and rescale tags; store the scanner's instead:
    unsigned 16-bit values plus Rescale Intercept/Slope, which a reader must apply."""
    import pydicom

    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(stored[i]).tobytes()
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleSlope = f"{slope:g}"
        ds.save_as(path)
