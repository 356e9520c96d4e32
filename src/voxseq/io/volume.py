"""Reading and writing 3D volumes.

Canonical form (what every voxseq function downstream of IO assumes):

* ``Volume.array`` has axis order ``(Z, Y, X)`` for one channel or ``(C, Z, Y, X)`` for several,
  the order of ``SimpleITK.GetArrayFromImage`` and of torch's ``(C, D, H, W)``.
* The voxel grid is reoriented to **LPS** (DICOM/ITK patient convention): increasing X goes to the
  patient's Left, increasing Y to Posterior, increasing Z to Superior. Reorientation only permutes
  and flips axes (``SimpleITK.DICOMOrient``), so it is exact and invertible; ``Volume.to_source``
  maps an array in the canonical grid back onto the file's own grid.
* ``spacing``, ``origin`` are in millimetres in ITK's (x, y, z) order; ``direction`` is the 3x3
  direction matrix, row-major, as ITK stores it.

4-D files (for example the Decathlon's multi-contrast brain NIfTI, x*y*z*4) are read as channels:
``array`` becomes ``(C, Z, Y, X)``. Files with more than ``MAX_CHANNELS`` volumes along the fourth
axis (time series) are refused, since voxseq models treat channels as co-registered contrasts.

Arrays inside container files are addressed as ``<file>::<member>[<index>]`` (see
:func:`parse_volume_path`): ``case.h5::image``, ``case.h5::label`` (the LA challenge's HDF5 files
hold both), ``nodulemnist3d.npz::train_images[12]`` (one sample of a stacked array, so that a
dataset shipped as one file is never split into thousands). Such arrays carry no geometry: the
spacing comes from the caller (a manifest record's ``spacing``) or a ``spacing`` entry in the file,
and the grid is taken as already LPS. Axis order: numpy arrays are ``(Z, Y, X)``; HDF5 datasets are
``(X, Y, Z)``, the order in which the LA files (and MATLAB, nibabel, pynrrd) store volumes, unless the
dataset or file has an ``axes`` attribute ``"zyx"``.

Hostile or corrupt headers are refused before any voxel memory is allocated: a NIfTI/NRRD/MetaImage
header whose voxels would take more than ``MAX_VOLUME_BYTES`` (4 GiB; environment variable
``VOXSEQ_MAX_VOLUME_BYTES``), or more than ``MAX_COMPRESSION_RATIO`` times the bytes of a single-file
volume (deflate cannot compress beyond about 1032:1, so such a header lies), fails with a one-line
:class:`VolumeReadError`, as do complex or vector pixels. ITK's own warnings are not printed.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import re
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from voxseq import VoxseqError
from voxseq.files import atomic_write

MAX_CHANNELS = 16
MAX_VOLUME_BYTES = 4 << 30  # voxel bytes a header may claim (VOXSEQ_MAX_VOLUME_BYTES overrides)
MAX_COMPRESSION_RATIO = 1100  # claimed voxel bytes per file byte of a single-file volume (deflate: <= ~1032)
CANONICAL_ORIENTATION = "LPS"
ITK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")  # what write_volume writes
HDF5_SUFFIXES = (".h5", ".hdf5")
# How the NaN/Inf error says to replace them; the command line names its own flag in its place.
NONFINITE_ADVICE = "nonfinite='zero'"
_MEMBER = re.compile(r"^(?P<key>[^\[\]]+?)(?:\[(?P<index>-?\d+)\])?$")


class VolumeReadError(VoxseqError):
    """A file that cannot be read as a 3D volume; the message is ``<path>: <cause>``."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{path}: {cause}")


@dataclass
class Volume:
    """A 3D image (or a stack of co-registered channels) in canonical LPS, (Z, Y, X) form."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return 1 if self.array.ndim == 3 else self.array.shape[0]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[-3:])  # type: ignore[return-value]

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        z, y, x = self.shape_zyx
        return (x, y, z)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def orientation(self) -> str:
        return orientation_code(self.direction)

    def to_sitk(self, array: np.ndarray | None = None):
        """This volume's geometry around ``array`` (default: its own, first channel if several)."""
        import SimpleITK as sitk

        a = self.array if array is None else array
        if a.ndim == 4:
            a = a[0]
        img = sitk.GetImageFromArray(np.ascontiguousarray(a))
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        img.SetDirection([float(d) for d in self.direction])
        return img

    def to_source(self, array: np.ndarray):
        """Map a (Z, Y, X) array in this volume's canonical grid back onto the file's own grid.

        Returns a SimpleITK image with the source file's size, spacing, origin and direction, for
        writing predictions that line up with the input.
        """
        import SimpleITK as sitk

        img = self.to_sitk(array)
        src = self.meta.get("source_orientation", self.orientation)
        if src != self.orientation:
            img = sitk.DICOMOrient(img, src)
        return img


def orientation_code(direction: Sequence[float]) -> str:
    """Three-letter ITK/DICOM orientation code (e.g. ``LPS``, ``RAS``) of a direction matrix."""
    import SimpleITK as sitk

    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(d) for d in direction])


def _path_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(VOLUME_FORMATS, key=len, reverse=True):  # .nii.gz before .gz
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VolumeReadError(path, "no such file or directory")
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise VolumeReadError(path, "permission denied (file is not readable)")
        if path.stat().st_size == 0:
            raise VolumeReadError(path, "file is empty (0 bytes)")


def _check_gzip(path: Path) -> int:
    """Read a gzip stream to its end; a truncated or corrupt one fails here with a clear cause.
    Returns the number of decompressed bytes."""
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(1 << 22):
                n += len(block)
    except (OSError, EOFError, zlib.error) as e:
        raise VolumeReadError(path, f"corrupt or truncated gzip data ({e})") from None
    return n


def _nifti_extent(header: bytes) -> tuple[int, int] | None:
    """(voxel data offset, voxel data bytes) from a NIfTI-1 or NIfTI-2 header; None when the header is
    not plain enough to tell (ITK then judges it)."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack_from(endian + "i", header, 0)[0] == 348:
            dims = struct.unpack_from(endian + "8h", header, 40)
            bitpix = struct.unpack_from(endian + "h", header, 72)[0]
            offset = struct.unpack_from(endian + "f", header, 108)[0]
            break
        if len(header) >= 540 and struct.unpack_from(endian + "i", header, 0)[0] == 540:
            dims = struct.unpack_from(endian + "8q", header, 16)
            bitpix = struct.unpack_from(endian + "h", header, 14)[0]
            offset = struct.unpack_from(endian + "q", header, 168)[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or any(d < 1 for d in dims[1:dims[0] + 1]) or bitpix < 1 or not np.isfinite(offset):
        return None
    return int(offset), int(np.prod(dims[1:dims[0] + 1], dtype=object)) * bitpix // 8


def _check_nifti_length(path: Path, data_length: int) -> None:
    """ITK reads a NIfTI file that ends before its voxels do without complaint (the rest is left as
    zeros or garbage); refuse it instead. ``data_length``: bytes of the (decompressed) file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        extent = _nifti_extent(f.read(540))
    if extent is not None and data_length < sum(extent):
        raise VolumeReadError(path, f"truncated NIfTI file: its header needs {sum(extent)} bytes "
                                    f"({extent[1]} of voxels from byte {extent[0]}), the file holds {data_length}")


def _from_sitk(img, path: Path, fmt: str, extra_meta: dict | None = None) -> Volume:
    import SimpleITK as sitk

    dim = img.GetDimension()
    if dim == 2 or (dim == 3 and img.GetSize()[2] == 1):
        raise VolumeReadError(path, f"is a 2-D image (size {img.GetSize()[:2]}); voxseq needs 3-D volumes")
    if dim > 4 or dim < 2:
        raise VolumeReadError(path, f"has {dim} dimensions; voxseq reads 3-D volumes (or 4-D as channels)")
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise VolumeReadError(path, "has vector/colour pixels; voxseq reads scalar 3-D volumes")
    source_orientation = None
    if dim == 4:
        n = img.GetSize()[3]
        if n > MAX_CHANNELS:
            raise VolumeReadError(
                path, f"is 4-D with {n} volumes; voxseq reads at most {MAX_CHANNELS} as channels (time series are not supported)"
            )
        channels = []
        for c in range(n):
            sub = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, c])
            source_orientation = orientation_code(sub.GetDirection())
            channels.append(sitk.DICOMOrient(sub, CANONICAL_ORIENTATION))
        ref = channels[0]
        array = np.stack([sitk.GetArrayFromImage(ch) for ch in channels])
        src_geom = sub
    else:
        source_orientation = orientation_code(img.GetDirection())
        ref = sitk.DICOMOrient(img, CANONICAL_ORIENTATION)
        array = sitk.GetArrayFromImage(ref)
        src_geom = img
    meta = {
        "path": str(path),
        "format": fmt,
        "source_orientation": source_orientation,
        "source_size_xyz": list(src_geom.GetSize()),
        "source_spacing_xyz": list(src_geom.GetSpacing()),
        "source_origin_xyz": list(src_geom.GetOrigin()),
        "source_direction": list(src_geom.GetDirection()),
        "source_dtype": str(array.dtype),
    }
    if extra_meta:
        meta.update(extra_meta)
    return Volume(array, tuple(ref.GetSpacing()), tuple(ref.GetOrigin()), tuple(ref.GetDirection()), meta)


@contextlib.contextmanager
def _quiet_itk() -> Iterator[list[str]]:
    """Silence ITK while voxseq reads, and yield the list that receives what it printed.

    ITK prints multi-line warnings (odd sform scales, Analyze headers) and the C libraries inside it
    (niftilib) print errors straight to the process's stderr; voxseq's promise is one line per problem.
    So warnings are switched off and file descriptor 2 points at a temporary file for the duration;
    its lines land in the yielded list when the block ends, for an error message to quote.
    """
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    printed: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        saved = None
    with tempfile.TemporaryFile() as sink:
        if saved is not None:
            os.dup2(sink.fileno(), 2)
        try:
            yield printed
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            sitk.ProcessObject.SetGlobalWarningDisplay(before)
            sink.seek(0)
            printed += [ln.strip() for ln in sink.read(1 << 16).decode(errors="replace").splitlines() if ln.strip()]


def max_volume_bytes() -> int:
    return int(os.environ.get("VOXSEQ_MAX_VOLUME_BYTES", MAX_VOLUME_BYTES))


def _check_header(reader, path: Path, fmt: str) -> None:
    """Refuse, from the header alone, what cannot be a scalar volume or would take absurd memory."""
    import SimpleITK as sitk

    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in pixel:
        raise VolumeReadError(path, f"has complex pixels ({pixel}); voxseq reads real-valued scalar volumes")
    if reader.GetNumberOfComponents() > 1 or "vector" in pixel:
        raise VolumeReadError(path, "has vector/colour pixels; voxseq reads scalar 3-D volumes")
    size = [int(n) for n in reader.GetSize()]
    if min(size, default=0) < 1:
        raise VolumeReadError(path, f"header gives size {tuple(size)}; every dimension must be at least 1")
    bits = re.search(r"(\d+)-bit", pixel)
    claimed = int(np.prod(size, dtype=object)) * (int(bits[1]) // 8 if bits else 8)
    if claimed > max_volume_bytes():
        raise VolumeReadError(path, f"header claims size {tuple(size)} of {pixel} ({claimed / 2**30:.3g} GiB), over "
                                    f"the {max_volume_bytes() / 2**30:g} GiB limit (VOXSEQ_MAX_VOLUME_BYTES)")
    detached = path.name.lower().endswith((".nhdr", ".mhd"))  # voxels live in another file
    if not detached and claimed > MAX_COMPRESSION_RATIO * path.stat().st_size + (1 << 16):
        raise VolumeReadError(path, f"header claims size {tuple(size)} of {pixel} ({claimed} bytes) but the file "
                                    f"holds only {path.stat().st_size} bytes: corrupt {fmt} header")


def _read_itk(path: Path, fmt: str) -> Volume:
    import SimpleITK as sitk

    length = _check_gzip(path) if path.name.lower().endswith(".gz") else path.stat().st_size
    if fmt == "NIfTI":
        _check_nifti_length(path, length)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    failure, stage = None, f"not a readable {fmt} file"
    with _quiet_itk() as printed:
        try:
            reader.ReadImageInformation()
            _check_header(reader, path, fmt)
            img = reader.Execute()
            stage = "cannot be used as a volume"  # e.g. a pixel type that ITK reads but cannot reorient
            volume = _from_sitk(img, path, fmt)
        except RuntimeError as e:
            failure = e
    if failure is not None:  # ITK's exception, and the last line its C libraries printed
        cause = _first_itk_line(failure, path) + (f"; {' '.join(printed[-2:])[:200]}" if printed else "")
        raise VolumeReadError(path, f"{stage} ({cause})") from None
    return volume


_ITK_PREFIX = re.compile(r"^ITK ERROR: \w+\(0x[0-9a-fA-F]+\):\s*")


def _first_itk_line(e: Exception, path: str | os.PathLike | None = None) -> str:
    """ITK exceptions span many lines; keep the one that says what went wrong.

    ITK ends some messages with ``Reason: <the C library's last errno text>``, left over from an
    unrelated call ("No such file or directory" about a file that is there): dropped when ``path`` exists.
    """
    lines = [_ITK_PREFIX.sub("", ln.strip()) for ln in str(e).splitlines() if ln.strip()]
    if path is not None and os.path.exists(path):
        lines = [ln for ln in lines if not ln.startswith("Reason:")] or lines
    for ln in lines:
        if "Description:" in ln:
            return ln.split("Description:", 1)[1].strip()
    for ln in reversed(lines):
        if not ln.startswith(("sitk::ERROR", "Exception thrown")):
            return ln[:200]
    return lines[-1][:200] if lines else "unknown error"


def list_dicom_series(folder: Path) -> list[tuple[str, list[str]]]:
    """All DICOM series in ``folder`` as (series UID, slice files sorted by position), largest first."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = []
    try:  # GDCM raises on some corrupt tags while it scans (e.g. Samples per Pixel 0)
        for uid in reader.GetGDCMSeriesIDs(str(folder)):
            files = reader.GetGDCMSeriesFileNames(str(folder), uid)
            series.append((uid, list(files)))
    except RuntimeError as e:
        raise VolumeReadError(folder, f"cannot scan the folder's DICOM files ({_first_itk_line(e, folder)})") from None
    series.sort(key=lambda s: -len(s[1]))
    return series


def _read_dicom_series(folder: Path, series_uid: str | None = None) -> Volume:
    """A DICOM series folder, with ITK's warnings silenced (GDCM prints a WARNING block about files that are
    not DICOM, and the series reader one about uneven slice spacing, which is checked here instead)."""
    with _quiet_itk():
        return _read_dicom_series_quietly(folder, series_uid)


def _slice_gaps(positions: list[tuple[float, ...]], normal: tuple[float, float, float]) -> list[float]:
    """Distances between consecutive slices along the slice normal, in position order."""
    along = sorted(float(np.dot(p, normal)) for p in positions)
    return [b - a for a, b in zip(along, along[1:])]


def _read_dicom_series_quietly(folder: Path, series_uid: str | None = None) -> Volume:
    import SimpleITK as sitk

    series = list_dicom_series(folder)
    if not series:
        raise VolumeReadError(folder, "folder holds no volume file and no DICOM series")
    if series_uid is not None:
        chosen = [s for s in series if s[0] == series_uid]
        if not chosen:
            raise VolumeReadError(folder, f"no DICOM series with UID {series_uid}")
        uid, files = chosen[0]
    else:
        uid, files = series[0]  # the largest series; others are listed in meta
    if len(files) < 2:
        raise VolumeReadError(folder, "DICOM series has a single slice; voxseq needs 3-D volumes")
    sizes, positions, normal = set(), [], None
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        try:
            r.ReadImageInformation()
        except RuntimeError as e:
            raise VolumeReadError(f, f"unreadable DICOM slice ({_first_itk_line(e, f)})") from None
        sizes.add(tuple(r.GetSize()[:2]))
        positions.append(tuple(r.GetOrigin()))
        normal = tuple(r.GetDirection()[2::3]) if normal is None else normal  # the third column: the slice normal
    if len(sizes) > 1:
        raise VolumeReadError(folder, f"DICOM series {uid} mixes slice sizes {sorted(sizes)}")
    if not all(np.isfinite(positions).flat) or normal is None or not np.isfinite(normal).all():
        raise VolumeReadError(folder, f"DICOM series {uid} has slices without a finite position or orientation")
    gaps = _slice_gaps(positions, normal)  # type: ignore[arg-type]
    step = float(np.median(gaps))
    if step <= 1e-6 or min(gaps) <= 1e-6:
        raise VolumeReadError(folder, f"DICOM series {uid} has {len(files)} slices but two or more share a position "
                                      "(duplicate slices, or a wrong Image Position / Orientation)")
    if max(gaps) - min(gaps) > max(1e-3, 0.1 * step):
        raise VolumeReadError(folder, f"DICOM series {uid} has missing slices or uneven spacing: gaps between slices "
                                      f"from {min(gaps):.4g} to {max(gaps):.4g} mm ({len(files)} slices)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)  # sorted by position along the slice normal by GDCM
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    try:
        img = reader.Execute()  # applies Rescale Slope / Intercept
    except RuntimeError as e:
        raise VolumeReadError(folder, f"cannot read DICOM series {uid} ({_first_itk_line(e, folder)})") from None
    tags = {}
    for key, name in (("0008|0060", "modality"), ("0020|000e", "series_uid"), ("0008|103e", "series_description")):
        if reader.HasMetaDataKey(0, key):
            tags[name] = reader.GetMetaData(0, key).strip()
    extra = {"dicom": tags, "dicom_files": len(files), "other_series": [(u, len(f)) for u, f in series if u != uid]}
    try:
        return _from_sitk(img, folder, "DICOM", extra)
    except RuntimeError as e:
        raise VolumeReadError(folder, f"cannot be used as a volume ({_first_itk_line(e, folder)})") from None


def parse_volume_path(path: str | os.PathLike) -> tuple[Path, str | None, int | None]:
    """Split ``<file>::<member>[<index>]`` into (file, member, index); a plain path gives (path, None, None).

    Only a ``.npz``/``.h5``/``.hdf5`` file before ``::`` starts a member, so that no other file name
    changes meaning. ``member`` may be an HDF5 group path (``scans/ct``); ``index`` picks one entry
    along the array's first axis (a sample of a stacked data set).
    """
    text = os.fspath(path)
    head, sep, member = text.rpartition("::")
    if not sep or not head.lower().endswith(tuple(s for s, f in VOLUME_FORMATS.items() if f.container)):
        return Path(text), None, None
    m = _MEMBER.match(member)
    if m is None:
        raise VolumeReadError(text, "expected '<file>::<array>' or '<file>::<array>[<index>]' after '::'")
    return Path(head), m["key"], None if m["index"] is None else int(m["index"])


def member_path(file: str | os.PathLike, member: str, index: int | None = None) -> str:
    """The ``<file>::<member>[<index>]`` string that :func:`read_volume` reads (inverse of :func:`parse_volume_path`)."""
    return f"{os.fspath(file)}::{member}" + ("" if index is None else f"[{index}]")


def _pick(array, index: int | None, where: str) -> np.ndarray:
    """``array[index]`` along the first axis (works on numpy arrays and lazily on HDF5 datasets)."""
    if index is None:
        return np.asarray(array[()])  # a fresh array: HDF5 datasets read into new memory
    n = array.shape[0] if array.shape else 0
    if not -n <= index < n:
        raise VolumeReadError(where, f"index {index} is out of range (the array holds {n} entries)")
    return np.array(array[index])


def checked_spacing(spacing: Any, where: str | os.PathLike) -> tuple[float, float, float]:
    """Three finite, positive spacings (x, y, z) in mm, or a one-line error naming ``where``."""
    try:
        values = tuple(float(s) for s in np.asarray(spacing, dtype=object).reshape(-1))
    except (TypeError, ValueError):
        raise VolumeReadError(where, f"spacing {spacing!r} is not three numbers (x, y, z) in mm") from None
    if len(values) != 3 or not all(np.isfinite(values)) or min(values) <= 0:
        raise VolumeReadError(where, f"spacing {list(values)} must be three finite, positive numbers (x, y, z) in mm")
    return values  # type: ignore[return-value]


def _check_array_bytes(shape: Sequence[int], itemsize: int, where: str, stored: int | None = None) -> None:
    """Refuse, before reading, an array whose shape claims more than the volume byte limit (or, for a
    compressed member of ``stored`` bytes, more than deflate can expand it to)."""
    claimed = int(np.prod([int(n) for n in shape], dtype=object)) * int(itemsize)
    if claimed > max_volume_bytes():
        raise VolumeReadError(where, f"array of shape {tuple(shape)} would take {claimed / 2**30:.3g} GiB, over the "
                                     f"{max_volume_bytes() / 2**30:g} GiB limit (VOXSEQ_MAX_VOLUME_BYTES)")
    if stored is not None and claimed > MAX_COMPRESSION_RATIO * stored + (1 << 16):
        raise VolumeReadError(where, f"array header claims shape {tuple(shape)} ({claimed} bytes) but the file holds "
                                     f"only {stored} bytes of it: corrupt header")


def _npz_check_member(z, key: str, where: str) -> None:
    """Read the .npy header of one npz member and check the size it claims (numpy allocates it first)."""
    name = key if key in z.zip.namelist() else f"{key}.npy"
    try:
        info = z.zip.getinfo(name)
        with z.zip.open(name) as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
    except (KeyError, ValueError, OSError, EOFError) as e:
        raise VolumeReadError(where, f"not a readable numpy array ({type(e).__name__}: {e})") from None
    _check_array_bytes(shape, dtype.itemsize, where, info.compress_size)


def _array_volume(array: np.ndarray, spacing: Sequence[float] | None, where: str, fmt: str, axes: str = "zyx") -> Volume:
    """A Volume from a bare array: (Z, Y, X) or (C, Z, Y, X), or with ``axes="xyz"`` (X, Y, Z) / (C, X, Y, Z)."""
    if spacing is None:
        raise VolumeReadError(where, f"{fmt} volumes need an explicit spacing (x, y, z) in mm (pass spacing=...)")
    spacing = checked_spacing(spacing, where)
    if array.ndim == 2:
        raise VolumeReadError(where, f"is a 2-D array {array.shape}; voxseq needs 3-D volumes")
    if array.ndim not in (3, 4):
        raise VolumeReadError(where, f"has {array.ndim} dimensions; expected (Z, Y, X) or (C, Z, Y, X)")
    if array.dtype.kind not in "biuf":
        raise VolumeReadError(where, f"has dtype {array.dtype}; expected a numeric array")
    if array.size == 0:
        raise VolumeReadError(where, f"is an empty array {array.shape}")
    if axes == "xyz":
        array = np.ascontiguousarray(np.swapaxes(array, -1, -3))
    meta = {"path": where, "format": fmt, "source_orientation": CANONICAL_ORIENTATION,
            "source_size_xyz": list(array.shape[-3:][::-1]), "source_spacing_xyz": [float(s) for s in spacing],
            "source_origin_xyz": [0.0, 0.0, 0.0], "source_direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
            "source_dtype": str(array.dtype), "source_axes": axes}
    return Volume(array, tuple(float(s) for s in spacing), meta=meta)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=2)
def _npz_member(path: str, key: str, mtime_ns: int, size: int) -> np.ndarray:
    """One array of an ``.npz``, kept for the next call: reading the samples of a stacked data set one
    by one would otherwise decompress the whole array once per sample. ``mtime_ns``/``size`` make a
    rewritten file a new cache key. Read-only, so that no caller can change what the next one sees."""
    with np.load(path, allow_pickle=False) as z:
        array = z[key]
    array.flags.writeable = False
    return array


def _read_numpy(path: Path, spacing: Sequence[float] | None, key: str | None = None, index: int | None = None) -> Volume:
    """``.npy`` holds a (Z, Y, X) or (C, Z, Y, X) array; ``.npz`` an ``image`` (or single) array, or the
    one ``key`` names (entry ``index`` of it when given), and optionally a ``spacing`` array in (x, y, z)
    order. Spacing must come from the file or the caller."""
    where = member_path(path, key, index) if key else str(path)
    try:
        if path.suffix.lower() != ".npz":
            array = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                key = key or _default_member(z.files, path, "npz has arrays")
                if key not in z.files:
                    raise VolumeReadError(where, f"no array {key!r} in the npz (has {z.files})")
                if spacing is None and "spacing" in z.files:
                    spacing = checked_spacing(z["spacing"], where)
                _npz_check_member(z, key, where)
                array = z[key] if index is None else None
            if index is not None:
                st = path.stat()
                array = _pick(_npz_member(str(path), key, st.st_mtime_ns, st.st_size), index, where)
    except VolumeReadError:
        raise
    except Exception as e:  # numpy raises ValueError/OSError/EOFError/BadZipFile on bad files
        raise VolumeReadError(path, f"not a readable numpy file ({type(e).__name__}: {e})") from None
    return _array_volume(array, spacing, where, "numpy")


def _default_member(names: list[str], path: Path, what: str) -> str:
    """The array a container file means when none is named: ``image``, else its only one."""
    if "image" in names:
        return "image"
    if len(names) == 1:
        return names[0]
    raise VolumeReadError(path, f"{what} {names}; expected one named 'image' (or name one: {path.name}::<name>)")


def _hdf5_datasets(f) -> list[str]:
    import h5py

    names: list[str] = []
    f.visititems(lambda name, node: names.append(name) if isinstance(node, h5py.Dataset) else None)
    return names


def _hdf5_attr(node, f, name: str):
    """An attribute of the dataset, else of the file (where a whole-file convention would be written)."""
    return node.attrs.get(name, f.attrs.get(name))


def _read_hdf5(path: Path, spacing: Sequence[float] | None, key: str | None = None, index: int | None = None) -> Volume:
    """A dataset of an HDF5 file: the one ``key`` names, else ``image``, else the only one. Spacing from
    the caller or a ``spacing`` attribute; (X, Y, Z) axis order unless an ``axes`` attribute says ``zyx``."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise VolumeReadError(path, f"not a readable HDF5 file ({e})") from None
    try:
        with f:
            return _read_hdf5_open(f, path, spacing, key, index)
    except VolumeReadError:
        raise
    except Exception as e:  # h5py raises RuntimeError/OSError/KeyError/ValueError on corrupt structures
        raise VolumeReadError(path, f"not a readable HDF5 file ({type(e).__name__}: {e})") from None


def _read_hdf5_open(f, path: Path, spacing: Sequence[float] | None, key: str | None, index: int | None) -> Volume:
    import h5py

    names = _hdf5_datasets(f)
    key = key or _default_member(names, path, "HDF5 file has datasets")
    where = member_path(path, key, index)
    node = f.get(key)
    if not isinstance(node, h5py.Dataset):
        raise VolumeReadError(where, f"no dataset {key!r} in the HDF5 file (has {names})")
    if spacing is None and _hdf5_attr(node, f, "spacing") is not None:
        spacing = checked_spacing(_hdf5_attr(node, f, "spacing"), where)
    if node.dtype.kind not in "biuf":
        raise VolumeReadError(where, f"has dtype {node.dtype}; expected a numeric array")
    _check_array_bytes(node.shape[1:] if index is not None else node.shape, node.dtype.itemsize, where)
    axes = _hdf5_attr(node, f, "axes")
    axes = axes.decode() if isinstance(axes, bytes) else str(axes or "xyz")
    if axes not in ("xyz", "zyx"):
        raise VolumeReadError(where, f"axes attribute must be 'xyz' or 'zyx', not {axes!r}")
    try:
        array = _pick(node, index, where)
    except (OSError, TypeError) as e:
        raise VolumeReadError(where, f"cannot read the dataset ({e})") from None
    return _array_volume(array, spacing, where, "HDF5", axes)


def _check_finite(volume: Volume, path: str | Path, nonfinite: str) -> None:
    a = volume.array
    if a.dtype.kind != "f":
        return
    bad = ~np.isfinite(a)
    n = int(bad.sum())
    if n == 0:
        return
    if nonfinite == "error":
        raise VolumeReadError(path, f"contains {n} NaN/Inf voxels (use {NONFINITE_ADVICE} to replace them with 0)")
    a = np.array(a, copy=True)
    a[bad] = 0
    volume.array = a
    volume.meta["nonfinite_replaced"] = n


# ---------------------------------------------------------------------------- volume formats (a registry)


@dataclass(frozen=True)
class VolumeFormat:
    name: str
    read: Callable[..., Volume]  # (path, format name, spacing, member, index) -> Volume
    container: bool = False  # its arrays are addressed as `<file>::<member>[<index>]`
    listed: bool = True  # in VOLUME_SUFFIXES (files that folder scans and manifests take for volumes)


VOLUME_FORMATS: dict[str, VolumeFormat] = {}  # file suffix -> format


def register_volume_format(name: str, *suffixes: str, container: bool = False, listed: bool = True):
    """Register ``read(path, name, spacing, member, index) -> Volume`` for files ending with ``suffixes``."""
    def register(read: Callable[..., Volume]) -> Callable[..., Volume]:
        for suffix in suffixes:
            VOLUME_FORMATS[suffix] = VolumeFormat(name, read, container, listed)
        return read
    return register


@register_volume_format("gzip", ".gz", listed=False)  # a .gz that is not .nii.gz: ITK names what is wrong
@register_volume_format("MetaImage", ".mha", ".mhd")
@register_volume_format("NRRD", ".nrrd", ".nhdr")
@register_volume_format("NIfTI", ".nii", ".nii.gz")
def _itk_file(path: Path, name: str, spacing, member, index) -> Volume:
    return _read_itk(path, name)


@register_volume_format("NumPy", ".npz", container=True)
@register_volume_format("NumPy", ".npy")
def _numpy_file(path: Path, name: str, spacing, member, index) -> Volume:
    return _read_numpy(path, spacing, member, index)


@register_volume_format("HDF5", *HDF5_SUFFIXES, container=True)
def _hdf5_file(path: Path, name: str, spacing, member, index) -> Volume:
    return _read_hdf5(path, spacing, member, index)


@register_volume_format("DICOM", ".dcm", listed=False)  # one slice stands for its folder's series
def _dicom_file(path: Path, name: str, spacing, member, index) -> Volume:
    return _read_dicom_series(path.parent)


VOLUME_SUFFIXES = tuple(s for s, f in VOLUME_FORMATS.items() if f.listed)


def read_volume(path: str | os.PathLike, *, spacing: Sequence[float] | None = None,
                series_uid: str | None = None, nonfinite: str = "error") -> Volume:
    """Read a 3D volume in canonical (Z, Y, X), LPS form.

    Formats: ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd``, a folder holding a DICOM
    series (the largest series when there are several, unless ``series_uid`` names one; slices sorted
    by position; rescale slope/intercept applied), a folder of 16-bit PNG slices (DeepLesion; needs
    ``spacing``), ``.npy``/``.npz`` (already (Z, Y, X), with ``spacing`` in (x, y, z) mm), ``.h5``/
    ``.hdf5`` ((X, Y, Z), with ``spacing``), and one array of a container file as
    ``<file>::<member>[<index>]`` (module docstring). ``nonfinite``: ``"error"`` (default) refuses
    NaN/Inf voxels, ``"zero"`` replaces them with 0.

    Raises :class:`VolumeReadError` (``"<path>: <cause>"``) for anything that is not a valid volume.
    """
    spec = os.fspath(path)
    path, member, index = parse_volume_path(path)  # a member only ever follows a .npz/.h5 file
    _check_file(path)
    if path.is_dir():
        from voxseq.io.png_series import is_png_series, read_png_series

        volume = read_png_series(path, spacing) if is_png_series(path) else _read_dicom_series(path, series_uid)
    else:
        suffix = _path_suffix(path)
        fmt = VOLUME_FORMATS.get(suffix)
        if fmt is None:
            raise VolumeReadError(path, f"unknown volume format '{suffix or path.name}' "
                                        f"(voxseq reads {', '.join(VOLUME_SUFFIXES)} and DICOM folders)")
        volume = fmt.read(path, fmt.name, spacing, member, index)
    if nonfinite not in ("error", "zero"):
        raise VoxseqError(f"nonfinite must be 'error' or 'zero', not {nonfinite!r}")
    _check_finite(volume, spec, nonfinite)
    return volume


def write_volume(volume: Volume | np.ndarray, path: str | os.PathLike, *, like: Volume | None = None,
                 in_source_grid: bool = False) -> Path:
    """Write a volume as NIfTI (``.nii``/``.nii.gz``), NRRD or MetaImage, atomically.

    ``volume`` may be a :class:`Volume` or a (Z, Y, X) array in the canonical grid of ``like``.
    With ``in_source_grid=True`` the array is mapped back to the file grid ``like`` was read from
    (same size, spacing, origin and direction as that file).
    """
    import SimpleITK as sitk

    path = Path(path)
    if _path_suffix(path) not in ITK_SUFFIXES:
        raise VoxseqError(f"{path}: write_volume writes .nii, .nii.gz, .nrrd, .mha; not {path.suffix}")
    if isinstance(volume, np.ndarray):
        if like is None:
            raise VoxseqError("write_volume(array, ...) needs like=<Volume> for the geometry")
        geom, array = like, volume
    else:
        geom, array = volume, volume.array
    if array.ndim == 4:
        imgs = [geom.to_source(a) if in_source_grid else geom.to_sitk(a) for a in array]
        img = sitk.JoinSeries(imgs)
    else:
        img = geom.to_source(array) if in_source_grid else geom.to_sitk(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    compress = path.name.lower().endswith((".gz", ".nrrd", ".mha"))
    return atomic_write(path, lambda tmp: sitk.WriteImage(img, str(tmp), useCompression=compress))
