"""Dataset adapters: public datasets in their usual layout -> voxseq manifest records.

=============  ==============================================================================
adapter        layout it reads
=============  ==============================================================================
msd            Medical Segmentation Decathlon: ``dataset.json`` + ``imagesTr/ labelsTr/ imagesTs/``
brats          one folder per case: ``<case>-t1n.nii.gz, -t1c, -t2w, -t2f [, -seg]`` (BraTS 2023) or
               ``<case>_t1, _t1ce, _t2, _flair [, _seg]`` (BraTS 2021)
deeplesion     ``DL_info.csv`` + ``Images_png/<patient>_<study>_<series>/<slice>.png``
ctrate         ``dataset/{train,valid}/<split>_<p>/<split>_<p>_<s>/<...>_<recon>.nii.gz`` + reports CSV
               (``VolumeName, Findings_EN, Impressions_EN``) + ``multi_abnormality_labels`` CSV
radgenome      CT-RATE volumes + region report CSV (``Volumename, Anatomy, Sentence``) + region masks
               ``<masks>/<volume name>/<region>.nii.gz``
la             2018 Left Atrium challenge as the semi-supervised segmentation works ship it: one HDF5 per
               case (``<case>/mri_norm2.h5`` or ``<case>.h5``) with datasets ``image`` and ``label``, stored
               (X, Y, Z) at 0.625 mm; optional ``train.list``/``test.list`` beside the case folders
ricord         RICORD COVID-19 CT: NIfTI files or DICOM folders + a labels CSV (an id/file column and a
               binary covid/label column, optional ``split``) -> ``classes={"covid": 0/1}``
nodulemnist3d  MedMNIST ``nodulemnist3d.npz``: ``{train,val,test}_images`` (N, 28, 28, 28) uint8 and
               ``{train,val,test}_labels`` (N, 1) -> one record per sample, ``classes={"malignant": 0/1}``
folder         any folder of volumes; labels paired by ``imagesTr/labelsTr`` or ``_image/_label|_seg|_mask``
csv            columns ``id``, ``image`` (or ``image_<modality>``), optional ``label``, ``split``, ``text``;
               other numeric columns become class labels
=============  ==============================================================================

Splits follow the dataset where it has them (DeepLesion, CT-RATE, NoduleMNIST3D, LA lists, a RICORD
``split`` column); otherwise a fixed-seed 7:1:2 split by sorted id (:func:`split_ids`), as the
AR-SSL4M downstream protocol uses for the MSD. Arrays inside HDF5/npz files are addressed as
``<file>::<array>[<index>]`` (:func:`voxseq.io.volume.member_path`), so no data set is rewritten.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from voxseq import VoxseqError
from voxseq.data.manifest import Box, Record
from voxseq.io.volume import HDF5_SUFFIXES, VOLUME_SUFFIXES, member_path

DEEPLESION_TYPES = {1: "bone", 2: "abdomen", 3: "mediastinum", 4: "liver", 5: "lung", 6: "kidney", 7: "soft tissue",
                    8: "pelvis", -1: "unknown"}
CTRATE_ABNORMALITIES = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)
BRATS_2023 = ("t1n", "t1c", "t2w", "t2f")
BRATS_2021 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}


def split_ids(ids: Iterable[str], ratios=(0.7, 0.1, 0.2), seed: int = 0) -> dict[str, str]:
    """Deterministic train/val/test assignment: sort the ids, permute with ``seed``, cut by ``ratios``."""
    ids = sorted(set(ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train = int(round(ratios[0] * len(ids)))
    n_val = int(round(ratios[1] * len(ids)))
    out = {}
    for rank, i in enumerate(order):
        out[ids[i]] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out


def label_subset(ids: Iterable[str], ratio: float, seed: int = 0) -> set[str]:
    """The fixed-seed subset of ``ids`` used when training on a fraction ``ratio`` of the labels
    (at least one case); the same ids for the same seed, whatever the input order."""
    if not 0 < ratio <= 1:
        raise VoxseqError(f"label_ratio must be in (0, 1], not {ratio}")
    ids = sorted(set(ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[i] for i in order[: max(1, int(round(ratio * len(ids))))]}


def _need(path: Path, what: str, check: bool) -> str:
    if check and not path.exists():
        raise VoxseqError(f"{path}: {what} listed by the dataset is missing")
    return str(path)


def _strip_volume_suffix(name: str) -> str:
    for suf in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _stem(path: Path) -> str:
    stripped = _strip_volume_suffix(path.name)
    return stripped if stripped != path.name else path.stem


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise VoxseqError(f"{path}: CSV file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _require_columns(rows: list[dict], path: Path, columns: Iterable[str]) -> None:
    have = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in have]
    if rows and missing:
        raise VoxseqError(f"{path}: missing columns {missing} (has {sorted(have)})")


# ---------------------------------------------------------------------------- MSD


# ---------------------------------------------------------------------------- dataset layouts (a registry)


@dataclass(frozen=True)
class DatasetLayout:
    build: Callable[..., list[Record]]  # (root, **options) -> records
    detect: Callable[[Path], bool] | None  # is this file or folder in this layout? (None: only by name)
    order: int  # detectors run from the lowest order up; the first that says yes names the layout


DATASET_LAYOUTS: dict[str, DatasetLayout] = {}


def register_dataset(name: str, detect: Callable[[Path], bool] | None = None, order: int = 100):
    """Register ``build(root, **options) -> list[Record]`` as the dataset layout ``name`` (``--adapter``), with
    the ``detect`` rule that :func:`detect_dataset` tries in ``order``."""
    def register(build: Callable[..., list[Record]]) -> Callable[..., list[Record]]:
        DATASET_LAYOUTS[name] = DatasetLayout(build, detect, order)
        return build
    return register


def _is_dir_with(*names: str) -> Callable[[Path], bool]:
    return lambda root: root.is_dir() and any((root / n).is_file() for n in names)


def _ctrate_layout(root: Path) -> bool:
    return root.is_dir() and (root / "dataset").is_dir() and any((root / "dataset" / s).is_dir() for s in ("train", "valid"))


def _brats_layout(root: Path) -> bool:
    cases = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return bool(cases) and all(any(f.name.startswith(c.name) and re.search(r"[-_](t1n|t1c|t1ce|flair)\.nii\.gz$", f.name)
                                   for f in c.iterdir()) for c in cases[:3])


def _nodulemnist3d_layout(root: Path) -> bool:
    if root.is_file():
        return root.name.lower().startswith("nodulemnist3d") and root.suffix.lower() == ".npz"
    return root.is_dir() and any(root.glob("nodulemnist3d*.npz"))


# ---------------------------------------------------------------------------- adapters


@register_dataset("msd", _is_dir_with("dataset.json"), order=10)
def msd(root: str | Path, seed: int = 0, include_test: bool = False, check_files: bool = True) -> list[Record]:
    """Medical Segmentation Decathlon task folder: labelled cases split 7:1:2 with a fixed seed;
    ``include_test`` adds the unlabelled ``imagesTs`` cases with split ``test`` and no label."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise VoxseqError(f"{root}: no dataset.json (not a Decathlon task folder)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise VoxseqError(f"{meta_path}: not valid JSON ({e.msg})") from None
    modalities = [meta.get("modality", {}).get(str(i)) for i in range(len(meta.get("modality", {})))]
    extra = {"task": meta.get("name", root.name), "modalities": modalities, "labels": meta.get("labels", {})}
    cases = meta.get("training", [])
    ids = [_stem(Path(c["image"])) for c in cases]
    splits = split_ids(ids, seed=seed)
    records = []
    for case, cid in zip(cases, ids):
        records.append(Record(id=cid, images={"image": _need(root / case["image"], "image", check_files)},
                              label=_need(root / case["label"], "label", check_files), split=splits[cid], extra=dict(extra)))
    if include_test:
        for rel in meta.get("test", []):
            rel = rel["image"] if isinstance(rel, dict) else rel
            cid = _stem(Path(rel))
            records.append(Record(id=cid, images={"image": _need(root / rel, "image", check_files)}, split="test",
                                  extra=dict(extra)))
    return records


# ---------------------------------------------------------------------------- BraTS


@register_dataset("brats", _brats_layout, order=80)
def brats(root: str | Path, seed: int = 0, check_files: bool = True) -> list[Record]:
    """BraTS-style case folders; channels in the order t1n, t1c, t2w, t2f (2021 names mapped)."""
    root = Path(root)
    records = []
    for case in sorted(p for p in root.iterdir() if p.is_dir()):
        files = {f.name: f for f in case.iterdir()}
        images, label = {}, None
        for mod in BRATS_2023:
            f = files.get(f"{case.name}-{mod}.nii.gz")
            if f:
                images[mod] = str(f)
        if images:
            seg = files.get(f"{case.name}-seg.nii.gz")
        else:
            for old, new in BRATS_2021.items():
                f = files.get(f"{case.name}_{old}.nii.gz")
                if f:
                    images[new] = str(f)
            seg = files.get(f"{case.name}_seg.nii.gz")
        if not images:
            continue
        if len(images) != 4:
            if check_files:
                raise VoxseqError(f"{case}: found contrasts {sorted(images)}, expected t1n, t1c, t2w, t2f")
            continue
        label = str(seg) if seg else None
        records.append(Record(id=case.name, images={m: images[m] for m in BRATS_2023}, label=label))
    if not records:
        raise VoxseqError(f"{root}: no BraTS case folders (<case>/<case>-t1n.nii.gz ...)")
    splits = split_ids([r.id for r in records], seed=seed)
    for r in records:
        r.split = splits[r.id]
    return records


# ---------------------------------------------------------------------------- DeepLesion


def _floats(text: str) -> list[float]:
    return [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]


@register_dataset("deeplesion", _is_dir_with("DL_info.csv"), order=20)
def deeplesion(root: str | Path, check_files: bool = True) -> list[Record]:
    """One record per CT series with all its lesions as boxes in the series' voxel grid.

    A lesion's box spans its 2-D bounding box on the key slice and, along z, its long-axis
    diameter (mm) converted to slices and centred on the key slice: DeepLesion marks lesions on one
    slice only, and a lesion is roughly as deep as it is wide.
    """
    root = Path(root)
    info = root / "DL_info.csv"
    rows = _read_csv(info)
    _require_columns(rows, info, ["File_name", "Key_slice_index", "Bounding_boxes", "Coarse_lesion_type",
                                  "Slice_range", "Spacing_mm_px_", "Train_Val_Test", "Lesion_diameters_Pixel_"])
    series: dict[str, dict] = {}
    split_names = {"1": "train", "2": "val", "3": "test"}
    for row in rows:
        name = row["File_name"].rsplit("_", 1)[0]  # 000001_01_01_109.png -> 000001_01_01
        folder = root / "Images_png" / name
        s = series.setdefault(name, {"folder": folder, "rows": []})
        s["rows"].append(row)
    records = []
    for name, s in sorted(series.items()):
        folder = s["folder"]
        if check_files and not folder.is_dir():
            raise VoxseqError(f"{folder}: series folder listed in DL_info.csv is missing")
        first = s["rows"][0]
        sx, sy, sz = _floats(first["Spacing_mm_px_"])[:3]
        slices = sorted(int(p.stem) for p in folder.glob("*.png")) if folder.is_dir() else []
        z_first = slices[0] if slices else int(_floats(first["Slice_range"])[0])
        z_count = len(slices) if slices else int(_floats(first["Slice_range"])[1]) - z_first + 1
        boxes = []
        for row in s["rows"]:
            x0, y0, x1, y1 = _floats(row["Bounding_boxes"])[:4]
            long_px = max(_floats(row["Lesion_diameters_Pixel_"]) or [max(x1 - x0, y1 - y0)])
            half_z = max(1, int(round(long_px * sx / sz / 2)))
            kz = int(float(row["Key_slice_index"])) - z_first
            category = DEEPLESION_TYPES.get(int(float(row["Coarse_lesion_type"])), "unknown")
            boxes.append(Box(category, [int(np.floor(x0)), int(np.floor(y0)), max(0, kz - half_z),
                                        int(np.ceil(x1)) + 1, int(np.ceil(y1)) + 1, min(z_count, kz + half_z + 1)]))
        records.append(Record(id=name, images={"image": str(folder)}, boxes=boxes, spacing=[sx, sy, sz],
                              split=split_names.get(first["Train_Val_Test"].strip(), "train"),
                              extra={"first_slice": z_first}))
    return records


# ---------------------------------------------------------------------------- CT-RATE / RadGenome


def _ctrate_volumes(root: Path) -> dict[str, tuple[Path, str]]:
    """VolumeName -> (path, split) for dataset/{train,valid}/... ; ``root`` may be the dataset folder itself."""
    base = root / "dataset" if (root / "dataset").is_dir() else root
    out = {}
    for split_dir, split in (("train", "train"), ("valid", "val")):
        d = base / split_dir
        if d.is_dir():
            for f in sorted(d.glob("*/*/*.nii.gz")):
                out[f.name] = (f, split)
    if not out:
        raise VoxseqError(f"{root}: no CT-RATE volumes under dataset/{{train,valid}}/<patient>/<scan>/*.nii.gz")
    return out


def _find_csv(root: Path, patterns: tuple[str, ...]) -> Path | None:
    for pat in patterns:
        hits = sorted(root.rglob(pat))
        if hits:
            return hits[0]
    return None


def _csvs_under(root: Path, *words: str) -> list[Path]:
    """CSV files whose path (folder or name) mentions one of ``words`` (CT-RATE ships train and valid files)."""
    return sorted(p for p in root.rglob("*.csv") if any(w in str(p.relative_to(root)).lower() for w in words))


@register_dataset("ctrate", _ctrate_layout, order=31)
def ctrate(root: str | Path, reports: list[str | Path] | None = None, labels: list[str | Path] | None = None) -> list[Record]:
    """CT-RATE: volumes with their report text and 18 abnormality labels (when the CSVs are present:
    ``*reports*.csv`` and ``multi_abnormality_labels/*.csv`` anywhere under ``root``, or given)."""
    root = Path(root)
    volumes = _ctrate_volumes(root)
    texts: dict[str, str] = {}
    for rep in map(Path, reports or _csvs_under(root, "reports")):
        rows = _read_csv(rep)
        _require_columns(rows, rep, ["VolumeName", "Findings_EN", "Impressions_EN"])
        texts.update({r["VolumeName"]: " ".join(t.strip() for t in (r["Findings_EN"], r["Impressions_EN"]) if t and t.strip())
                      for r in rows})
    classes: dict[str, dict[str, float]] = {}
    for lab in map(Path, labels or _csvs_under(root, "multi_abnormality_labels", "abnormality")):
        rows = _read_csv(lab)
        _require_columns(rows, lab, ["VolumeName"])
        for r in rows:
            classes[r["VolumeName"]] = {k: float(v) for k, v in r.items() if k != "VolumeName" and v not in ("", None)}
    return [Record(id=name.replace(".nii.gz", ""), images={"image": str(path)}, text=texts.get(name, ""),
                   classes=classes.get(name, {}), split=split) for name, (path, split) in volumes.items()]


@register_dataset("radgenome", lambda root: _ctrate_layout(root) and _find_csv(root, ("*region*report*.csv",)) is not None,
                  order=30)
def radgenome(root: str | Path, region_reports: str | Path | None = None, masks: str | Path | None = None) -> list[Record]:
    """RadGenome-ChestCT on CT-RATE volumes: organ/region-wise sentences and region masks."""
    root = Path(root)
    records = {r.id: r for r in ctrate(root)}
    rep = Path(region_reports) if region_reports else _find_csv(root, ("*region*report*.csv", "*radgenome*.csv"))
    if rep is None:
        raise VoxseqError(f"{root}: no region report CSV (Volumename, Anatomy, Sentence) found; pass region_reports=")
    rows = _read_csv(rep)
    _require_columns(rows, rep, ["Volumename", "Anatomy", "Sentence"])
    for r in rows:
        rid = r["Volumename"].replace(".nii.gz", "")
        if rid not in records:
            continue
        anatomy = (r["Anatomy"] or "").strip()
        if anatomy:
            rec = records[rid]
            rec.sentences[anatomy] = (rec.sentences.get(anatomy, "") + " " + r["Sentence"].strip()).strip()
        elif not records[rid].text:
            records[rid].text = r["Sentence"].strip()  # the whole-report row
    mask_root = Path(masks) if masks else next((p for p in (root / "masks", root / "region_masks") if p.is_dir()), None)
    if mask_root is not None:
        for rid, rec in records.items():
            folder = mask_root / rid
            if folder.is_dir():
                rec.masks = {_stem(f): str(f) for f in sorted(folder.glob("*.nii.gz"))}
    return list(records.values())


# ---------------------------------------------------------------------------- LA (left atrium MRI)


LA_SPACING = [0.625, 0.625, 0.625]  # the 2018 challenge's isotropic MRI; the HDF5 files do not store it


def _la_files(root: Path) -> dict[str, Path]:
    """Case id -> HDF5 file: ``<case>/mri_norm2.h5`` (or the folder's one ``.h5``) and ``<case>.h5``."""
    files = {}
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            h5 = sorted(f for f in entry.iterdir() if f.is_file() and f.name.lower().endswith(HDF5_SUFFIXES))
            if h5:
                files[entry.name] = next((f for f in h5 if f.name == "mri_norm2.h5"), h5[0])
        elif entry.name.lower().endswith(HDF5_SUFFIXES):
            files[_stem(entry)] = entry
    return files


def _require_datasets(path: Path, names: Iterable[str]) -> None:
    """Name a missing dataset now (metadata only) rather than deep inside `voxseq prepare`."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            have = sorted(f.keys())
    except OSError as e:
        raise VoxseqError(f"{path}: not a readable HDF5 file ({e})") from None
    missing = [n for n in names if n not in have]
    if missing:
        raise VoxseqError(f"{path}: no dataset {missing[0]!r} (has {have})")


def _la_splits(root: Path, ids: list[str], seed: int) -> dict[str, str]:
    """The semi-supervised works' ``test.list`` (beside the case folders or one level up) is the test
    split, and one in eight of the other cases is held out for validation; without it, 7:1:2."""
    listed = next((p for p in (root / "test.list", root.parent / "test.list") if p.is_file()), None)
    if listed is None:
        return split_ids(ids, seed=seed)
    test = {line.strip() for line in listed.read_text().splitlines() if line.strip()}
    out = split_ids([i for i in ids if i not in test], (0.875, 0.125, 0.0), seed=seed)
    out.update({i: "test" for i in ids if i in test})
    return out


@register_dataset("la", lambda root: root.is_dir() and bool(_la_files(root)), order=70)
def la(root: str | Path, seed: int = 0, check_files: bool = True) -> list[Record]:
    """2018 Left Atrium segmentation challenge in the HDF5 form the semi-supervised works distribute.

    ``image`` and ``label`` are datasets of one file, read through ``<file>::image`` / ``<file>::label``
    in (X, Y, Z) order (:mod:`voxseq.io.volume`); spacing 0.625 mm isotropic from the record.
    """
    root = Path(root)
    if not root.is_dir():
        raise VoxseqError(f"{root}: not a folder")
    files = _la_files(root)
    if not files:
        raise VoxseqError(f"{root}: no LA cases (<case>/mri_norm2.h5 or <case>.h5)")
    if check_files:
        for path in files.values():
            _require_datasets(path, ("image", "label"))
    splits = _la_splits(root, list(files), seed)
    return [Record(id=cid, images={"image": member_path(path, "image")}, label=member_path(path, "label"),
                   split=splits[cid], spacing=list(LA_SPACING), extra={"dataset": "LA"})
            for cid, path in files.items()]


# ---------------------------------------------------------------------------- RICORD (COVID-19 CT)


# Accepted header names, compared without case and punctuation ("Patient ID" == "patient_id").
RICORD_ID_COLUMNS = ("id", "case_id", "patient_id", "patient", "case", "filename", "file", "image", "path",
                     "volume", "volume_name", "series_uid", "name")
RICORD_LABEL_COLUMNS = ("covid", "covid19", "covid_positive", "label", "positive", "target", "class")
_POSITIVE = {"1", "1.0", "true", "yes", "positive", "pos", "covid", "covid19", "covid-19"}
_NEGATIVE = {"0", "0.0", "false", "no", "negative", "neg", "non-covid", "noncovid", "normal"}
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test", "testing": "test"}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _column(columns: Iterable[str], candidates: Iterable[str]) -> str | None:
    """The first of ``candidates`` present among ``columns``, matched by :func:`_norm`."""
    by_norm = {_norm(c): c for c in columns}
    return next((by_norm[_norm(c)] for c in candidates if _norm(c) in by_norm), None)


def _ricord_csv(root: Path) -> Path | None:
    """The labels CSV beside the volumes: a top-level CSV, one named *ricord*/*label* first."""
    csvs = sorted(root.glob("*.csv"), key=lambda p: (not re.search("ricord|label", p.name.lower()), p.name))
    return csvs[0] if csvs else None


def _binary(value: str, where: str) -> float:
    v = (value or "").strip().lower()
    if v in _POSITIVE or v in _NEGATIVE:
        return 1.0 if v in _POSITIVE else 0.0
    raise VoxseqError(f"{where}: label {value!r} is not binary (0/1, true/false, positive/negative)")


def _volume_index(root: Path) -> dict[str, Path]:
    """Volume files by name without suffix, and DICOM folders by their own and their ancestors' names
    (the largest series under a patient folder, as ``read_volume`` picks the largest series)."""
    files: dict[str, Path] = {}
    dicom: dict[str, tuple[int, Path]] = {}
    for p in sorted(root.rglob("*")):
        if _is_volume(p):
            files.setdefault(_stem(p), p)
        elif p.is_dir() and (n := sum(f.suffix.lower() == ".dcm" for f in p.iterdir())):
            for name in [p.name, *(a.name for a in p.relative_to(root).parents if a.name)]:
                if n > dicom.get(name, (0, p))[0]:
                    dicom[name] = (n, p)
    return {**{k: p for k, (_, p) in dicom.items()}, **files}


def _ricord_split(row: dict, column: str | None, where: str) -> str:
    value = (row.get(column) or "").strip().lower() if column else ""
    if value and value not in _SPLIT_NAMES:
        raise VoxseqError(f"{where}: split must be train, val or test, not {value!r}")
    return _SPLIT_NAMES.get(value, "")


@register_dataset("ricord", lambda root: root.is_dir() and _is_ricord(root), order=60)
def ricord(root: str | Path, labels: str | Path | None = None, seed: int = 0, check_files: bool = True) -> list[Record]:
    """RICORD COVID-19 CT classification: NIfTI files or DICOM folders under ``root`` + a labels CSV
    (``labels``, else a top-level CSV). An id/file column (:data:`RICORD_ID_COLUMNS`) names each volume
    by path, file name or DICOM folder; a label column (:data:`RICORD_LABEL_COLUMNS`) holds 0/1 (or
    true/false, positive/negative). A ``split`` column is used where filled; else 7:1:2 fixed seed."""
    root = Path(root)
    path = Path(labels) if labels else _ricord_csv(root)
    if path is None:
        raise VoxseqError(f"{root}: no labels CSV (an id/file column and a covid/label column); pass labels=")
    rows = _read_csv(path)
    cols = list(rows[0]) if rows else []
    id_col, label_col = _column(cols, RICORD_ID_COLUMNS), _column(cols, RICORD_LABEL_COLUMNS)
    if id_col is None or label_col is None:
        raise VoxseqError(f"{path}: needs an id column ({', '.join(RICORD_ID_COLUMNS)}) and a label column "
                          f"({', '.join(RICORD_LABEL_COLUMNS)}); has {cols}")
    split_col = _column(cols, ("split",))
    index = _volume_index(root)
    records = []
    for n, row in enumerate(rows, 2):
        where, value = f"{path}:{n}", row[id_col].strip()
        found = next((b / value for b in (path.parent, root) if value and (b / value).exists()), None)
        found = found or index.get(value) or index.get(_strip_volume_suffix(Path(value).name))
        if found is None and check_files:
            raise VoxseqError(f"{where}: no volume {value!r} under {root} (a path, a volume file name or a DICOM folder)")
        records.append(Record(id=_strip_volume_suffix(value), images={"image": str(found or root / value)},
                              classes={"covid": _binary(row[label_col], where)},
                              split=_ricord_split(row, split_col, where), extra={"dataset": "RICORD"}))
    if not records:
        raise VoxseqError(f"{path}: the CSV has no rows")
    auto = split_ids([r.id for r in records], seed=seed)
    for r in records:
        r.split = r.split or auto[r.id]
    return records


# ---------------------------------------------------------------------------- NoduleMNIST3D (MedMNIST)


MEDMNIST_SPLITS = ("train", "val", "test")


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array shapes of an ``.npz`` from the ``.npy`` headers alone, without decompressing the data."""
    import zipfile

    from numpy.lib import format as npy

    shapes = {}
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                with z.open(name) as f:
                    major, _ = npy.read_magic(f)
                    header = npy.read_array_header_1_0(f) if major == 1 else npy.read_array_header_2_0(f)
                shapes[name.removesuffix(".npy")] = tuple(header[0])
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise VoxseqError(f"{path}: not a readable npz file ({e})") from None
    return shapes


def _medmnist_file(root: Path, name: str) -> Path:
    """``root`` itself, or ``<name>.npz`` (else the one ``<name>*.npz``, a MedMNIST+ size) in it."""
    if root.is_file():
        return root
    hits = [root / f"{name}.npz"] if (root / f"{name}.npz").is_file() else sorted(root.glob(f"{name}*.npz"))
    if not hits:
        raise VoxseqError(f"{root}: no {name}.npz (MedMNIST)")
    return hits[0]


@register_dataset("nodulemnist3d", _nodulemnist3d_layout, order=50)
def nodulemnist3d(root: str | Path) -> list[Record]:
    """NoduleMNIST3D: one record per sample of ``nodulemnist3d.npz``, read in place as
    ``<file>::<split>_images[<i>]`` ((Z, Y, X) like every numpy volume; 28^3 at 1 mm, upsampled to the
    model's input by the classification task). The dataset's own train/val/test split."""
    path = _medmnist_file(Path(root), "nodulemnist3d")
    shapes = _npz_shapes(path)
    wanted = [f"{s}_{kind}" for s in MEDMNIST_SPLITS for kind in ("images", "labels")]
    missing = [k for k in wanted if k not in shapes]
    if missing:
        raise VoxseqError(f"{path}: missing arrays {missing} (has {sorted(shapes)})")
    records = []
    with np.load(path, allow_pickle=False) as z:
        for split in MEDMNIST_SPLITS:
            labels = z[f"{split}_labels"].reshape(-1)
            if shapes[f"{split}_images"][0] != len(labels) or len(shapes[f"{split}_images"]) != 4:
                raise VoxseqError(f"{path}: {split}_images {shapes[f'{split}_images']} does not match "
                                  f"{split}_labels ({len(labels)} samples of (N, D, H, W) images)")
            records += [Record(id=f"{_stem(path)}_{split}_{i:04d}", images={"image": member_path(path, f"{split}_images", i)},
                               classes={"malignant": float(y)}, split=split, spacing=[1.0, 1.0, 1.0],
                               extra={"dataset": "NoduleMNIST3D"}) for i, y in enumerate(labels)]
    return records


# ---------------------------------------------------------------------------- generic


_LABEL_SUFFIXES = ("_label", "_seg", "_mask", "-label", "-seg", "-mask")
_IMAGE_SUFFIXES = ("_image", "_img", "-image", "_ct", "_0000")


def _is_volume(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)


@register_dataset("folder")  # what detect_dataset falls back to for a folder
def folder(root: str | Path, seed: int = 0, recursive: bool = True) -> list[Record]:
    """Any folder of volumes (and DICOM series subfolders); labels paired by common naming conventions."""
    root = Path(root)
    if not root.is_dir():
        raise VoxseqError(f"{root}: not a folder")
    if (root / "imagesTr").is_dir():  # nnU-Net / Decathlon-like without dataset.json
        images = sorted(p for p in (root / "imagesTr").iterdir() if _is_volume(p))
        labels = {p.name.replace("_0000", ""): p for p in (root / "labelsTr").iterdir()} if (root / "labelsTr").is_dir() else {}
        pairs = [(p, labels.get(p.name.replace("_0000", ""))) for p in images]
    else:
        files = sorted(p for p in (root.rglob("*") if recursive else root.iterdir()) if _is_volume(p))
        stems = {}
        for p in files:
            stems[str(p.parent / _stem(p))] = p
        pairs = []
        for p in files:
            s = _stem(p)
            if s.lower().endswith(_LABEL_SUFFIXES):
                continue
            base = s
            for suf in _IMAGE_SUFFIXES:
                if s.lower().endswith(suf):
                    base = s[: -len(suf)]
                    break
            label = next((stems[str(p.parent / (base + suf))] for suf in _LABEL_SUFFIXES if str(p.parent / (base + suf)) in stems), None)
            pairs.append((p, label))
        dicom_dirs = sorted({d for d in (root.rglob("*") if recursive else root.iterdir())
                             if d.is_dir() and any(f.suffix.lower() == ".dcm" for f in d.iterdir())})
        pairs += [(d, None) for d in dicom_dirs]
    if not pairs:
        raise VoxseqError(f"{root}: no volume files found ({', '.join(VOLUME_SUFFIXES)} or DICOM folders)")
    records = []
    for image, label in pairs:
        rid = str(image.relative_to(root).parent / _stem(image)) if image.is_file() else str(image.relative_to(root))
        rid = rid[2:] if rid.startswith("./") else rid
        for suf in _IMAGE_SUFFIXES:
            if rid.lower().endswith(suf):
                rid = rid[: -len(suf)]
                break
        records.append(Record(id=rid, images={"image": str(image)}, label=str(label) if label else None))
    splits = split_ids([r.id for r in records], seed=seed)
    for r in records:
        r.split = splits[r.id]
    return records


@register_dataset("csv", lambda root: root.is_file() and root.suffix.lower() == ".csv", order=0)
def csv_table(path: str | Path, seed: int = 0) -> list[Record]:
    """A CSV with ``id`` and ``image`` (or ``image_<modality>``) columns; see the module table."""
    path = Path(path)
    rows = _read_csv(path)
    if not rows:
        raise VoxseqError(f"{path}: the CSV has no rows")
    cols = list(rows[0])
    image_cols = ["image"] if "image" in cols else [c for c in cols if c.startswith("image_")]
    if "id" not in cols or not image_cols:
        raise VoxseqError(f"{path}: needs an 'id' column and an 'image' (or 'image_<modality>') column; has {cols}")
    reserved = {"id", "label", "split", "text", *image_cols}
    base = path.parent
    records = []
    for n, row in enumerate(rows, 2):
        resolve = lambda v: str(Path(v) if Path(v).is_absolute() else base / v)  # noqa: E731
        images = {("image" if c == "image" else c[len("image_"):]): resolve(row[c]) for c in image_cols if row[c]}
        classes = {}
        for c in cols:
            if c not in reserved and row[c] not in ("", None):
                try:
                    classes[c] = float(row[c])
                except ValueError:
                    continue
        split = (row.get("split") or "").strip()
        if split and split not in ("train", "val", "test"):
            raise VoxseqError(f"{path}:{n}: split must be train, val or test, not {split!r}")
        records.append(Record(id=row["id"], images=images, label=resolve(row["label"]) if row.get("label") else None,
                              text=row.get("text", "") or "", classes=classes, split=split or ""))
    if any(not r.split for r in records):
        auto = split_ids([r.id for r in records], seed=seed)
        for r in records:
            r.split = r.split or auto[r.id]
    return records


ADAPTERS: dict[str, Callable[..., list[Record]]] = {name: layout.build for name, layout in DATASET_LAYOUTS.items()}


def _is_ricord(root: Path) -> bool:
    """A top-level CSV named *ricord*, or one with a covid label column."""
    path = _ricord_csv(root)
    if path is None:
        return False
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return "ricord" in path.name.lower() or _column(header, ("covid", "covid19", "covid_positive")) is not None


def detect_dataset(root: str | Path) -> str:
    """Guess the adapter from the layout: the registered detectors in their order, else ``folder``."""
    root = Path(root)
    if not root.is_file() and not root.is_dir():
        raise VoxseqError(f"{root}: no such file or directory")
    for name, layout in sorted(DATASET_LAYOUTS.items(), key=lambda item: item[1].order):
        if layout.detect is not None and layout.detect(root):
            return name
    if root.is_file():
        raise VoxseqError(f"{root}: a file that is neither a manifest (.jsonl), a CSV nor nodulemnist3d.npz")
    return "folder"


def build_manifest(kind: str, root: str | Path, **options) -> list[Record]:
    if kind not in DATASET_LAYOUTS:
        raise VoxseqError(f"unknown dataset adapter {kind!r} (known: {', '.join(DATASET_LAYOUTS)})")
    return DATASET_LAYOUTS[kind].build(root, **options)
