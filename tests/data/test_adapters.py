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


# ---------------------------------------------------------------------------- LA, RICORD, NoduleMNIST3D


def _la_case(path: Path, seed: int, shape_xyz=(12, 10, 8), datasets=("image", "label")) -> np.ndarray:
    """One case as the semi-supervised works ship it: float image and uint8 label, stored (X, Y, Z)."""
    import h5py

    image = np.random.default_rng(seed).normal(0, 1, shape_xyz).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name in datasets:
            f[name] = image if name == "image" else (image > 1).astype(np.uint8)
    return image


def test_la(tmp_path):
    root = tmp_path / "LA" / "2018LA_Seg_Training Set"
    images = {f"CASE{i:02d}": _la_case(root / f"CASE{i:02d}" / "mri_norm2.h5", i) for i in range(9)}
    images["CASE09"] = _la_case(root / "CASE09.h5", 9)  # the flat <case>.h5 layout
    assert detect_dataset(root) == "la"
    recs = {r.id: r for r in build_manifest("la", root)}
    assert set(recs) == set(images)
    assert sorted(sum(r.split == s for r in recs.values()) for s in ("train", "val", "test")) == [1, 2, 7]
    r = recs["CASE03"]
    assert r.images["image"].endswith("CASE03/mri_norm2.h5::image") and r.label.endswith("mri_norm2.h5::label")
    v = read_volume(r.images["image"], spacing=r.spacing)
    assert v.size_xyz == (12, 10, 8) and v.spacing == (0.625, 0.625, 0.625)
    assert v.array[7, 4, 11] == images["CASE03"][11, 4, 7]  # (X, Y, Z) on disk -> (Z, Y, X)
    lab = read_volume(r.label, spacing=r.spacing)
    assert lab.array.dtype == np.uint8 and int(lab.array.sum()) == int((images["CASE03"] > 1).sum())

    (root.parent / "test.list").write_text("CASE01\nCASE05\n")  # the community's split, one level up
    recs = {r.id: r for r in build_manifest("la", root)}
    assert {i for i, r in recs.items() if r.split == "test"} == {"CASE01", "CASE05"}
    assert sum(r.split == "val" for r in recs.values()) == 1 and sum(r.split == "train" for r in recs.values()) == 7

    _la_case(root / "CASE10" / "mri_norm2.h5", 10, datasets=("image",))
    with pytest.raises(VoxseqError, match=r"CASE10/mri_norm2\.h5: no dataset 'label' \(has \['image'\]\)"):
        build_manifest("la", root)


def test_la_prepare_cache(tmp_path):
    from voxseq.cli import main
    from voxseq.data.cache import Cache

    root = tmp_path / "LA"
    images = {f"c{i}": _la_case(root / f"c{i}" / "mri_norm2.h5", i, shape_xyz=(10, 9, 6)) for i in range(3)}
    out = tmp_path / "cache"
    assert main(["prepare", str(root), "--out", str(out), "--workers", "1", "intensity=none"]) == 0
    cache = Cache(out)
    assert len(cache) == 3
    i = next(k for k in range(3) if cache.entry(k)["id"] == "c1")
    assert cache.entry(i)["spacing_xyz"] == [0.625, 0.625, 0.625] and cache.entry(i)["has_label"]
    img = np.asarray(cache.image(i), np.float32)  # (C, Z, Y, X), float16 on disk
    assert img.shape == (1, 6, 9, 10)
    assert np.allclose(img[0], images["c1"].transpose(2, 1, 0), atol=2e-3)
    assert np.array_equal(np.asarray(cache.label(i)), (images["c1"] > 1).astype(np.uint8).transpose(2, 1, 0))


def _ricord_fixture(root: Path) -> dict[str, int]:
    """Eight NIfTI volumes and one DICOM patient folder, labelled in a CSV with RICORD-style headers."""
    from tests.conftest import write_dicom_series

    labels = {f"ricord_{i:02d}": i % 2 for i in range(8)}
    for i, name in enumerate(labels):
        vol(root / "nifti" / f"{name}.nii.gz", value=i)
    img = sitk.GetImageFromArray(np.full((3, 8, 8), 40, np.int16))
    img.SetSpacing((0.7, 0.7, 2.5))
    write_dicom_series(img, root / "MIDRC-RICORD-1A" / "patient_A" / "study" / "series", "1.2.826.0.1.3680043.2.1125.9")
    labels["patient_A"] = 1
    rows = [[f"nifti/{n}.nii.gz" if n == "ricord_00" else n, "positive" if y else "negative"] for n, y in labels.items()]
    write_csv(root / "ricord_labels.csv", ["Patient ID", "COVID-19"], rows)
    return labels


def test_ricord(tmp_path):
    root = tmp_path / "RICORD"
    labels = _ricord_fixture(root)
    assert detect_dataset(root) == "ricord"
    recs = {r.id: r for r in build_manifest("ricord", root)}
    assert set(recs) == {"nifti/ricord_00", *list(labels)[1:]}
    assert {i: r.classes for i, r in recs.items() if i != "nifti/ricord_00"} == {
        n: {"covid": float(y)} for n, y in labels.items() if n != "ricord_00"}
    assert sorted(sum(r.split == s for r in recs.values()) for s in ("train", "val", "test")) == [1, 2, 6]
    v = read_volume(recs["ricord_05"].images["image"])
    assert v.size_xyz == (8, 8, 4) and np.allclose(v.spacing, (0.8, 0.8, 2.0)) and int(v.array.max()) == 5
    dcm = read_volume(recs["patient_A"].images["image"])  # the series folder under the patient folder
    assert dcm.size_xyz == (8, 8, 3) and np.allclose(dcm.spacing, (0.7, 0.7, 2.5)) and int(dcm.array.max()) == 40


def test_ricord_split_column_and_errors(tmp_path):
    root = tmp_path / "RICORD"
    for i in range(3):
        vol(root / f"s{i}.nii.gz", value=i)
    write_csv(root / "labels.csv", ["filename", "label", "split"],
              [["s0.nii.gz", 1, "training"], ["s1.nii.gz", 0, "validation"], ["s2.nii.gz", "true", "test"]])
    recs = build_manifest("ricord", root)
    assert [(r.id, r.split, r.classes["covid"]) for r in recs] == [("s0", "train", 1.0), ("s1", "val", 0.0), ("s2", "test", 1.0)]
    write_csv(root / "labels.csv", ["scan", "result"], [["s0.nii.gz", 1]])
    with pytest.raises(VoxseqError, match=r"labels\.csv: needs an id column .* has \['scan', 'result'\]"):
        build_manifest("ricord", root)
    write_csv(root / "labels.csv", ["id", "covid"], [["s0", "maybe"]])
    with pytest.raises(VoxseqError, match=r"labels\.csv:2: label 'maybe' is not binary"):
        build_manifest("ricord", root)
    write_csv(root / "labels.csv", ["id", "covid"], [["s0", 1], ["s7", 0]])
    with pytest.raises(VoxseqError, match=r"labels\.csv:3: no volume 's7' under"):
        build_manifest("ricord", root)


def _nodulemnist(path: Path, sizes=(("train", 7), ("val", 2), ("test", 3)), drop: str = "") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in sizes:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{k: v for k, v in arrays.items() if k != drop})
    return arrays


def test_nodulemnist3d(tmp_path):
    path = tmp_path / "medmnist" / "nodulemnist3d.npz"
    arrays = _nodulemnist(path)
    assert detect_dataset(path.parent) == "nodulemnist3d" and detect_dataset(path) == "nodulemnist3d"
    recs = build_manifest("nodulemnist3d", path.parent)
    assert [sum(r.split == s for r in recs) for s in ("train", "val", "test")] == [7, 2, 3]
    assert [r.classes["malignant"] for r in recs if r.split == "test"] == [float(y) for y in arrays["test_labels"][:, 0]]
    r = next(r for r in recs if r.id == "nodulemnist3d_val_0001")
    assert r.images["image"].endswith("nodulemnist3d.npz::val_images[1]") and r.split == "val"
    v = read_volume(r.images["image"], spacing=r.spacing)
    assert v.array.shape == (28, 28, 28) and v.spacing == (1.0, 1.0, 1.0)
    assert np.array_equal(v.array, arrays["val_images"][1])
    bad = tmp_path / "bad" / "nodulemnist3d.npz"
    _nodulemnist(bad, drop="test_labels")
    with pytest.raises(VoxseqError, match=r"bad/nodulemnist3d\.npz: missing arrays \['test_labels'\] \(has \["):
        build_manifest("nodulemnist3d", bad)
