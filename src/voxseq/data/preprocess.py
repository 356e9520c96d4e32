"""One preprocessing definition for training and inference.

A :class:`Preprocess` config is saved with every cache and every checkpoint and re-applied by
``embed``/``evaluate``/``predict``/``finetune``, so that inference never drifts from training.
Steps, in order: reorient -> resample -> intensity (CT window or MRI percentile) -> foreground crop
-> pad to a minimum shape. Geometric steps run through SimpleITK, so origin and direction stay
exact and any prediction can be mapped back to the source file's grid.

Axis conventions: spacings are (x, y, z) mm as in ITK; shapes are (Z, Y, X) as in the arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from voxseq import VoxseqError
from voxseq.io.volume import Volume, VolumeReadError, max_volume_bytes, orientation_code

# HU windows per task (REFERENCE.md): name -> (low, high).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "liver": (-21.0, 189.0),
    "lung": (-1000.0, 1000.0),
    "pancreas": (-87.0, 199.0),
    "hepatic_vessel": (0.0, 230.0),
    "spleen": (-57.0, 175.0),
    "colon": (-57.0, 175.0),
    "ct": (-1000.0, 1000.0),  # SigVLP: [-1000, 1000] HU
    "abdomen": (-175.0, 250.0),
}
INTENSITY_MODES = ("window", "percentile", "none")


@dataclass
class Preprocess:
    """How a raw volume becomes model input. Serialised to YAML with caches and checkpoints.

    intensity: ``window`` maps ``hu_range`` (or the named ``window`` preset) linearly onto
    ``out_range``, or each of several ``hu_windows`` onto a channel of its own (one CT becomes, say, a
    lung, a soft-tissue and a bone channel: a model then sees a 0.8 cm lung nodule, which a soft-tissue
    window clips to air, and a 45 HU liver lesion, which a lung window flattens); ``percentile`` maps the
    per-channel ``percentiles`` onto ``out_range`` (MRI, and AR-SSL4M pretraining); ``none`` keeps raw
    values. ``clip`` clips to ``out_range``.
    """

    orientation: str = "LPS"
    spacing_xyz: list[float] | None = None  # target spacing (mm); None keeps the file's
    intensity: str = "percentile"
    window: str | None = None  # a CT_WINDOWS preset name
    hu_range: list[float] | None = None  # explicit [low, high] HU; overrides `window`
    hu_windows: list[list[float]] | None = None  # several [low, high] HU windows, one output channel each; overrides both
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    out_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    clip: bool = True
    crop_foreground: bool = False
    foreground_threshold: float = 0.0  # in output units: voxels above it are foreground
    foreground_margin: int = 2
    min_shape_zyx: list[int] | None = None  # pad (centred) to at least this shape
    pad_value: float | None = None  # None: out_range[0]

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_MODES:
            raise VoxseqError(f"preprocess.intensity must be one of {INTENSITY_MODES}, not {self.intensity!r}")
        if self.window is not None and self.window not in CT_WINDOWS:
            raise VoxseqError(f"unknown CT window preset {self.window!r} (known: {', '.join(CT_WINDOWS)})")
        if self.hu_windows is not None and (not self.hu_windows or any(
                len(w) != 2 or not float(w[0]) < float(w[1]) for w in self.hu_windows)):
            raise VoxseqError(f"preprocess.hu_windows must be a list of [low, high] HU pairs with low < high, "
                              f"not {self.hu_windows}")
        if self.intensity == "window" and self.window is None and self.hu_range is None and self.hu_windows is None:
            raise VoxseqError("preprocess.intensity=window needs `window` (a preset name), `hu_range` or `hu_windows`")
        if self.spacing_xyz is not None and (len(self.spacing_xyz) != 3 or min(self.spacing_xyz) <= 0):
            raise VoxseqError(f"preprocess.spacing_xyz must be three positive numbers, not {self.spacing_xyz}")
        if len(self.orientation) != 3:
            raise VoxseqError(f"preprocess.orientation must be a 3-letter code like LPS, not {self.orientation!r}")

    @property
    def window_range(self) -> tuple[float, float] | None:
        if self.hu_range is not None:
            return (float(self.hu_range[0]), float(self.hu_range[1]))
        return CT_WINDOWS[self.window] if self.window else None

    def __call__(self, image: Volume, label: Volume | None = None) -> tuple[Volume, Volume | None]:
        return preprocess(image, label, self)


# ---------------------------------------------------------------------------- geometric steps (SimpleITK)


def _channels_sitk(vol: Volume) -> list:
    arrays = [vol.array] if vol.array.ndim == 3 else list(vol.array)
    return [vol.to_sitk(a) for a in arrays]


def _from_channels(imgs: list, like: Volume) -> Volume:
    import SimpleITK as sitk

    arrays = [sitk.GetArrayFromImage(i) for i in imgs]
    array = arrays[0] if like.array.ndim == 3 else np.stack(arrays)
    ref = imgs[0]
    return Volume(array, tuple(ref.GetSpacing()), tuple(ref.GetOrigin()), tuple(ref.GetDirection()), dict(like.meta))


def reorient(vol: Volume, code: str = "LPS") -> Volume:
    """Permute/flip axes so the grid has orientation ``code`` (exact, no interpolation)."""
    import SimpleITK as sitk

    if vol.orientation == code:
        return vol
    return _from_channels([sitk.DICOMOrient(i, code) for i in _channels_sitk(vol)], vol)


def resample(vol: Volume, spacing_xyz: list[float] | tuple[float, ...], is_label: bool = False) -> Volume:
    """Resample to ``spacing_xyz``: linear for images, nearest neighbour for labels.

    The physical extent is kept: the new size is ``round(old_size * old_spacing / new_spacing)``.
    """
    import SimpleITK as sitk

    if np.allclose(vol.spacing, spacing_xyz, rtol=1e-4):
        return vol
    old_size = np.array(vol.size_xyz, dtype=float)
    new_size = [max(1, int(round(s))) for s in old_size * np.array(vol.spacing) / np.array(spacing_xyz)]
    check_resampled_size(vol, spacing_xyz, new_size, vol.array.itemsize if is_label else 4)
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    out = []
    for img in _channels_sitk(vol):
        if not is_label and img.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
            img = sitk.Cast(img, sitk.sitkFloat32)
        out.append(sitk.Resample(img, new_size, sitk.Transform(), interp, img.GetOrigin(), list(spacing_xyz),
                                 img.GetDirection(), 0, img.GetPixelID()))
    return _from_channels(out, vol)


def resample_limit_bytes() -> int:
    """The most bytes a resampled volume may take: the ``VOXSEQ_MAX_VOLUME_BYTES`` setting (4 GiB, the
    bound on what a file header may claim), or half the memory available now if that is less."""
    limit = max_volume_bytes()
    try:
        import psutil

        limit = min(limit, psutil.virtual_memory().available // 2)
    except Exception:  # noqa: BLE001 - no memory figure: the setting alone
        pass
    return int(limit)


def check_resampled_size(vol: Volume, spacing_xyz, new_size_xyz: list[int], itemsize: int) -> None:
    """Refuse, before ITK allocates it, a resampled grid too large for memory (a file whose header gives
    metres where millimetres were meant, say): one line naming the file, its spacing and the size."""
    nbytes = int(np.prod(new_size_xyz, dtype=object)) * vol.channels * itemsize
    limit = resample_limit_bytes()
    if nbytes <= limit:
        return
    path = vol.meta.get("path", "volume")
    mm = lambda xs: "(" + ", ".join(f"{float(x):g}" for x in xs) + ")"  # noqa: E731
    raise VolumeReadError(path, f"spacing {mm(vol.spacing)} mm, size {vol.size_xyz}: resampling to {mm(spacing_xyz)} mm "
                                f"would need size {tuple(new_size_xyz)} ({nbytes / 2**30:.4g} GiB), over the "
                                f"{limit / 2**30:.3g} GiB limit (VOXSEQ_MAX_VOLUME_BYTES, or half the available "
                                f"memory); check the file's spacing, or choose a coarser target spacing")


def crop_zyx(vol: Volume, start_zyx: list[int], stop_zyx: list[int]) -> Volume:
    """Crop to [start, stop) along (Z, Y, X); the origin moves so physical positions are unchanged."""
    import SimpleITK as sitk

    size = [int(stop_zyx[i] - start_zyx[i]) for i in (2, 1, 0)]
    index = [int(start_zyx[i]) for i in (2, 1, 0)]
    return _from_channels([sitk.RegionOfInterest(i, size, index) for i in _channels_sitk(vol)], vol)


def pad_to_shape(vol: Volume, min_shape_zyx: list[int], value: float) -> tuple[Volume, list[int]]:
    """Pad (centred) to at least ``min_shape_zyx``; returns the volume and the (z, y, x) padding before."""
    import SimpleITK as sitk

    shape = vol.shape_zyx
    extra = [max(0, int(m) - s) for m, s in zip(min_shape_zyx, shape)]
    if not any(extra):
        return vol, [0, 0, 0]
    before = [e // 2 for e in extra]
    after = [e - b for e, b in zip(extra, before)]
    imgs = [sitk.ConstantPad(i, before[::-1], after[::-1], float(value)) for i in _channels_sitk(vol)]
    return _from_channels(imgs, vol), before


def foreground_box(array: np.ndarray, threshold: float, margin: int) -> tuple[list[int], list[int]]:
    """(start, stop) in (Z, Y, X) of voxels above ``threshold`` in any channel, grown by ``margin``."""
    fg = array > threshold
    if fg.ndim == 4:
        fg = fg.any(axis=0)
    if not fg.any():
        return [0, 0, 0], list(fg.shape)
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(fg.any(axis=other))
        start.append(max(0, int(idx[0]) - margin))
        stop.append(min(fg.shape[axis], int(idx[-1]) + 1 + margin))
    return start, stop


# ---------------------------------------------------------------------------- intensity steps (numpy)


def window_intensity(array: np.ndarray, low: float, high: float, out_range=(0.0, 1.0), clip: bool = True) -> np.ndarray:
    """Map the HU window [low, high] linearly onto ``out_range`` (float32)."""
    lo, hi = out_range
    a = (array.astype(np.float32) - low) * ((hi - lo) / (high - low)) + lo
    return np.clip(a, lo, hi, out=a) if clip else a


def percentile_intensity(array: np.ndarray, percentiles=(0.5, 99.5), out_range=(0.0, 1.0), clip: bool = True) -> np.ndarray:
    """Map each channel's [p_low, p_high] percentiles onto ``out_range`` (float32)."""
    if array.ndim == 4:
        return np.stack([percentile_intensity(c, percentiles, out_range, clip) for c in array])
    a = array.astype(np.float32)
    p_lo, p_hi = np.percentile(a[:: max(1, a.shape[0] // 64)], percentiles) if a.size > 4_000_000 else np.percentile(a, percentiles)
    if p_hi <= p_lo:  # constant image: map to the low end
        return np.full_like(a, out_range[0])
    return window_intensity(a, float(p_lo), float(p_hi), out_range, clip)


def normalize_intensity(array: np.ndarray, cfg: Preprocess) -> np.ndarray:
    if cfg.intensity == "window" and cfg.hu_windows is not None:
        if array.ndim == 4 and array.shape[0] != 1:
            raise VoxseqError(f"preprocess.hu_windows turns one CT channel into {len(cfg.hu_windows)}; "
                              f"this image has {array.shape[0]} channels")
        ct = array[0] if array.ndim == 4 else array
        return np.stack([window_intensity(ct, float(lo), float(hi), cfg.out_range, cfg.clip) for lo, hi in cfg.hu_windows])
    if cfg.intensity == "window":
        low, high = cfg.window_range  # type: ignore[misc]
        return window_intensity(array, low, high, cfg.out_range, cfg.clip)
    if cfg.intensity == "percentile":
        return percentile_intensity(array, cfg.percentiles, cfg.out_range, cfg.clip)
    return array.astype(np.float32)


# ---------------------------------------------------------------------------- the pipeline


def check_same_grid(image: Volume, label: Volume, tol: float = 1e-3) -> None:
    """Refuse a label whose grid (size, spacing, origin, direction) differs from its image's."""
    problems = []
    if image.shape_zyx != label.shape_zyx:
        problems.append(f"size {label.size_xyz} != image {image.size_xyz}")
    if not np.allclose(image.spacing, label.spacing, rtol=tol, atol=tol):
        problems.append(f"spacing {tuple(round(s, 4) for s in label.spacing)} != image {tuple(round(s, 4) for s in image.spacing)}")
    if not np.allclose(image.origin, label.origin, atol=max(tol, 1e-2 * min(image.spacing))):
        problems.append("origin differs from the image's")
    if not np.allclose(image.direction, label.direction, atol=tol):
        problems.append("direction differs from the image's")
    if problems:
        raise VolumeReadError(label.meta.get("path", "label"), "label geometry does not match its image: " + "; ".join(problems))


def preprocess(image: Volume, label: Volume | None, cfg: Preprocess) -> tuple[Volume, Volume | None]:
    """Apply ``cfg`` to an image (and its label). Returns float32 image, uint8 label.

    ``image.meta["preprocess"]`` records what was done (crop box, padding), and the returned
    volumes carry exact geometry, so a prediction in the output grid maps back to the source file.
    """
    if label is not None:
        check_same_grid(image, label)
    image = reorient(image, cfg.orientation)
    label = reorient(label, cfg.orientation) if label is not None else None
    if cfg.spacing_xyz is not None:
        image = resample(image, cfg.spacing_xyz)
        label = resample(label, cfg.spacing_xyz, is_label=True) if label is not None else None
    image = Volume(normalize_intensity(image.array, cfg), image.spacing, image.origin, image.direction, dict(image.meta))
    record: dict = {}
    if cfg.crop_foreground:
        start, stop = foreground_box(image.array, cfg.foreground_threshold, cfg.foreground_margin)
        if (start, stop) != ([0, 0, 0], list(image.shape_zyx)):
            image = crop_zyx(image, start, stop)
            label = crop_zyx(label, start, stop) if label is not None else None
        record["crop_start_zyx"], record["crop_stop_zyx"] = start, stop
    if cfg.min_shape_zyx is not None:
        pad_value = cfg.out_range[0] if cfg.pad_value is None else cfg.pad_value
        image, before = pad_to_shape(image, cfg.min_shape_zyx, pad_value)
        if label is not None:
            label, _ = pad_to_shape(label, cfg.min_shape_zyx, 0)
        record["pad_before_zyx"] = before
    image.meta["preprocess"] = record
    if label is not None:
        label.array = label.array.astype(np.uint8) if label.array.max(initial=0) < 256 else label.array
        if label.array.dtype != np.uint8:
            raise VolumeReadError(label.meta.get("path", "label"), f"label values up to {label.array.max()} do not fit uint8")
    image.array = np.ascontiguousarray(image.array, dtype=np.float32)
    return image, label


def to_source_grid(prediction: np.ndarray, grid: Volume, source: Volume, is_label: bool = True) -> "object":
    """Resample a (Z, Y, X) array on ``grid`` (a preprocessed volume) onto the grid of the file that
    ``source`` was read from. Returns a SimpleITK image with the file's size/spacing/origin/direction."""
    import SimpleITK as sitk

    img = grid.to_sitk(prediction)
    ref = source.to_sitk(source.array if source.array.ndim == 3 else source.array[0])
    src_orient = source.meta.get("source_orientation", source.orientation)
    if src_orient != orientation_code(ref.GetDirection()):
        ref = sitk.DICOMOrient(ref, src_orient)
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(img, ref, sitk.Transform(), interp, 0, img.GetPixelID())
