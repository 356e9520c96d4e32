"""Dataset adapters, each on a tiny fixture written in the dataset's real layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from voxseq import VoxseqError
from voxseq.data.adapters import (
    CTRATE_ABNORMALITIES,
    build_manifest,
    detect_dataset,
    split_ids,
)
from voxseq.data.manifest import read_manifest, write_manifest
from voxseq.io import read_volume


def vol(path: Path, shape=(4, 8, 8), value=0, dtype=np.int16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.full(shape, value, dtype))
    img.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(img, str(path))
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_split_ids_deterministic_7_1_2():
    ids = [f"case_{i:03d}" for i in range(50)]
    a, b = split_ids(ids, seed=0), split_ids(list(reversed(ids)), seed=0)
    assert a == b
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 35, "val": 5, "test": 10}
    assert split_ids(ids, seed=1) != a


def test_msd(tmp_path):
    root = tmp_path / "Task09_Spleen"
    training = []
    for i in range(10):
        vol(root / "imagesTr" / f"spleen_{i}.nii.gz")
        vol(root / "labelsTr" / f"spleen_{i}.nii.gz", dtype=np.uint8)
        training.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    vol(root / "imagesTs" / "spleen_99.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
        "training": training, "test": ["./imagesTs/spleen_99.nii.gz"]}))
    assert detect_dataset(root) == "msd"
    recs = build_manifest("msd", root)
    assert len(recs) == 10 and {r.split for r in recs} == {"train", "val", "test"}
    assert sum(r.split == "train" for r in recs) == 7 and sum(r.split == "test" for r in recs) == 2
    assert Path(recs[0].label).is_file() and recs[0].extra["modalities"] == ["CT"]
    with_test = build_manifest("msd", root, include_test=True)
    assert with_test[-1].id == "spleen_99" and with_test[-1].label is None and with_test[-1].split == "test"
    (root / "labelsTr" / "spleen_3.nii.gz").unlink()
    with pytest.raises(VoxseqError, match="spleen_3.nii.gz: label listed by the dataset is missing"):
        build_manifest("msd", root)


@pytest.mark.parametrize("naming", ["2023", "2021"])
def test_brats(tmp_path, naming):
    root = tmp_path / "brats"
    for i in range(3):
        case = f"BraTS-GLI-{i:05d}-000" if naming == "2023" else f"BraTS2021_{i:05d}"
        sep, mods = ("-", ["t1n", "t1c", "t2w", "t2f", "seg"]) if naming == "2023" else ("_", ["t1", "t1ce", "t2", "flair", "seg"])
        for c, m in enumerate(mods):
            vol(root / case / f"{case}{sep}{m}.nii.gz", value=c)
    assert detect_dataset(root) == "brats"
    recs = build_manifest("brats", root)
    assert len(recs) == 3 and list(recs[0].images) == ["t1n", "t1c", "t2w", "t2f"]
    assert [int(read_volume(p).array.max()) for p in recs[0].images.values()] == [0, 1, 2, 3]  # order kept
    assert recs[0].label.endswith("seg.nii.gz")


def test_deeplesion_boxes_and_png_series(tmp_path):
    root = tmp_path / "DeepLesion"
    series = root / "Images_png" / "000001_01_01"
    series.mkdir(parents=True)
    for z in range(100, 110):  # slices 100..109, HU = value - 32768
        sitk.WriteImage(sitk.GetImageFromArray(np.full((32, 32), 32768 + z, np.uint16)), str(series / f"{z:03d}.png"))
    header = ["File_name", "Patient_index", "Study_index", "Series_ID", "Key_slice_index", "Measurement_coordinates",
              "Bounding_boxes", "Lesion_diameters_Pixel_", "Normalized_lesion_location", "Coarse_lesion_type",
              "Possibly_noisy", "Slice_range", "Spacing_mm_px_", "Image_size", "DICOM_windows", "Patient_gender",
              "Patient_age", "Train_Val_Test"]
    rows = [["000001_01_01_104.png", 1, 1, 1, 104, "", "10.2, 12.0, 20.7, 18.4", "10.5, 6.4", "", 4, 0, "100, 109",
             "0.8, 0.8, 2.0", "32, 32", "-175, 275", "F", 50, 1],
            ["000001_01_01_107.png", 1, 1, 1, 107, "", "3, 4, 8, 9", "5.0, 3.0", "", 5, 0, "100, 109",
             "0.8, 0.8, 2.0", "32, 32", "-1350, 150", "F", 50, 1]]
    write_csv(root / "DL_info.csv", header, rows)
    assert detect_dataset(root) == "deeplesion"
    (rec,) = build_manifest("deeplesion", root)
    assert rec.id == "000001_01_01" and rec.split == "train" and rec.spacing == [0.8, 0.8, 2.0]
    liver, lung = rec.boxes
    assert liver.category == "liver" and lung.category == "lung"
    # key slice 104 -> index 4; 10.5 px * 0.8 mm / 2 mm / 2 -> +-2 slices
    assert liver.bbox_xyz == [10, 12, 2, 22, 20, 7]
    v = read_volume(rec.images["image"], spacing=rec.spacing)
    assert v.size_xyz == (32, 32, 10) and v.spacing == (0.8, 0.8, 2.0)
    assert v.array[0, 0, 0] == 100 and v.array[9, 0, 0] == 109  # HU offset removed, slices in order


def _ctrate_fixture(root: Path) -> list[str]:
    names = []
    for split, pat in (("train", "train"), ("valid", "valid")):
        for p in (1, 2):
            name = f"{pat}_{p}_a_1.nii.gz"
            vol(root / "dataset" / split / f"{pat}_{p}" / f"{pat}_{p}_a" / name)
            names.append(name)
    write_csv(root / "radiology_text_reports" / "train_reports.csv", ["VolumeName", "ClinicalInformation_EN", "Technique_EN",
              "Findings_EN", "Impressions_EN"], [[n, "", "", f"Findings of {n}.", "No acute finding."] for n in names])
    write_csv(root / "multi_abnormality_labels" / "train_predicted_labels.csv", ["VolumeName", *CTRATE_ABNORMALITIES],
              [[n, *([1, 0] * 9)] for n in names])
    return names


def test_ctrate(tmp_path):
    root = tmp_path / "CT-RATE"
    _ctrate_fixture(root)
    assert detect_dataset(root) == "ctrate"
    recs = {r.id: r for r in build_manifest("ctrate", root)}
    assert set(recs) == {"train_1_a_1", "train_2_a_1", "valid_1_a_1", "valid_2_a_1"}
    r = recs["valid_2_a_1"]
    assert r.split == "val" and r.text == "Findings of valid_2_a_1.nii.gz. No acute finding."
    assert len(r.classes) == 18 and r.classes["Medical material"] == 1.0 and r.classes["Arterial wall calcification"] == 0.0


def test_radgenome(tmp_path):
    root = tmp_path / "RadGenome"
    names = _ctrate_fixture(root)
    rows = []
    for n in names:
        rows += [[n, "", "Whole report."], [n, "lung", "The lungs are clear."], [n, "heart", "Normal heart size."]]
        for region in ("lung", "heart"):
            vol(root / "masks" / n.replace(".nii.gz", "") / f"{region}.nii.gz", dtype=np.uint8)
    write_csv(root / "train_region_report.csv", ["Volumename", "Anatomy", "Sentence"], rows)
    assert detect_dataset(root) == "radgenome"
    recs = {r.id: r for r in build_manifest("radgenome", root)}
    r = recs["train_1_a_1"]
    assert r.sentences == {"lung": "The lungs are clear.", "heart": "Normal heart size."}
    assert set(r.masks) == {"lung", "heart"} and Path(r.masks["lung"]).is_file()
    assert r.text.startswith("Findings of")  # the CT-RATE report wins over the whole-report row


def test_generic_folder_pairs_labels(tmp_path):
    root = tmp_path / "scans"
    vol(root / "a_image.nii.gz")
    vol(root / "a_label.nii.gz")
    vol(root / "b.nrrd")
    vol(root / "sub" / "c.mha")
    vol(root / "sub" / "c_seg.mha")
    assert detect_dataset(root) == "folder"
    recs = {r.id: r for r in build_manifest("folder", root)}
    assert set(recs) == {"a", "b", "sub/c"}
    assert recs["a"].label.endswith("a_label.nii.gz") and recs["b"].label is None and recs["sub/c"].label.endswith("c_seg.mha")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VoxseqError, match="no volume files"):
        build_manifest("folder", tmp_path / "empty")


def test_generic_csv(tmp_path):
    vol(tmp_path / "x1.nii.gz")
    vol(tmp_path / "x2.nii.gz")
    path = write_csv(tmp_path / "table.csv", ["id", "image", "label", "split", "text", "malignant", "site"],
                     [["p1", "x1.nii.gz", "", "train", "a report", 1, "A"], ["p2", "x2.nii.gz", "", "test", "", 0, "B"]])
    assert detect_dataset(path) == "csv"
    recs = build_manifest("csv", path)
    assert [r.id for r in recs] == ["p1", "p2"] and recs[0].classes == {"malignant": 1.0}
    assert Path(recs[0].images["image"]).is_file() and recs[1].split == "test" and recs[0].text == "a report"
    write_manifest(recs, tmp_path / "m.jsonl")
    again = read_manifest(tmp_path / "m.jsonl")
    assert again[0].images == recs[0].images and again[0].classes == recs[0].classes
    bad = write_csv(tmp_path / "bad.csv", ["name", "path"], [["a", "b"]])
    with pytest.raises(VoxseqError, match="needs an 'id' column"):
        build_manifest("csv", bad)


def test_unknown_adapter():
    with pytest.raises(VoxseqError, match="unknown dataset adapter 'kaggle'.*msd"):
        build_manifest("kaggle", ".")
