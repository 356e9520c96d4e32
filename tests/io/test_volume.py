"""Volume IO: formats, canonical orientation, geometry round trips, DICOM, and bad input."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import write_dicom_series
from voxseq.io import Volume, VolumeReadError, read_volume, write_volume
from voxseq.io.volume import member_path, parse_volume_path


def _sitk_volume(shape_zyx=(6, 7, 8), spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 5.0), direction=None, dtype=np.int16):
    rng = np.random.default_rng(0)
    a = rng.integers(-1000, 1000, size=shape_zyx).astype(dtype)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img, a


def test_real_samples_size_spacing(samples):
    v = read_volume(samples / "lung1_image.nrrd")
    assert v.size_xyz == (384, 384, 48)
    assert v.array.shape == (48, 384, 384)
    assert np.allclose(v.spacing, (0.5703125, 0.5703125, 5.0))
    assert v.array.min() == -1024 and v.array.max() == 3071
    b = read_volume(samples / "breast1_image.nrrd")
    assert b.size_xyz == (45, 120, 21) and np.allclose(b.spacing, (0.664062, 0.664062, 2.1))


def test_reorients_to_lps_and_back(samples):
    """brain1 is stored LAS: voxseq flips Y to reach LPS and to_source undoes it exactly."""
    src = sitk.ReadImage(str(samples / "brain1_image.nrrd"))
    v = read_volume(samples / "brain1_image.nrrd")
    assert v.meta["source_orientation"] == "LAS" and v.orientation == "LPS"
    raw = sitk.GetArrayFromImage(src)
    assert np.array_equal(v.array, raw[:, ::-1, :])
    back = v.to_source(v.array)
    assert np.array_equal(sitk.GetArrayFromImage(back), raw)
    assert np.allclose(back.GetOrigin(), src.GetOrigin()) and np.allclose(back.GetDirection(), src.GetDirection())
    # the same physical point has the same value in both grids
    p = src.TransformIndexToPhysicalPoint((100, 40, 12))
    idx = v.to_sitk().TransformPhysicalPointToIndex(p)
    assert v.array[idx[2], idx[1], idx[0]] == raw[12, 40, 100]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_read_round_trip_keeps_geometry(tmp_path, suffix):
    direction = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # oblique-free but axis-swapped
    img, a = _sitk_volume(direction=direction)
    path = tmp_path / f"x{suffix}"
    sitk.WriteImage(img, str(path))
    v = read_volume(path)
    out = tmp_path / f"y{suffix}"
    write_volume(v, out)
    w = read_volume(out)
    assert np.array_equal(v.array, w.array)
    assert np.allclose(v.spacing, w.spacing) and np.allclose(v.origin, w.origin, atol=1e-4)
    assert np.allclose(v.direction, w.direction)
    # writing back in the source grid reproduces the original file's geometry and voxels
    src_out = tmp_path / f"z{suffix}"
    write_volume(v.array, src_out, like=v, in_source_grid=True)
    z = sitk.ReadImage(str(src_out))
    assert z.GetSize() == img.GetSize() and np.allclose(z.GetOrigin(), img.GetOrigin(), atol=1e-4)
    assert np.allclose(z.GetDirection(), img.GetDirection()) and np.array_equal(sitk.GetArrayFromImage(z), a)


def test_dicom_series_from_real_volume(tmp_path, samples):
    img = sitk.ReadImage(str(samples / "breast1_image.nrrd"))
    write_dicom_series(img, tmp_path / "dcm", "1.2.3.4.5.6", intercept=-1024.0)
    v = read_volume(tmp_path / "dcm")
    assert v.size_xyz == (45, 120, 21)
    assert np.allclose(v.spacing, img.GetSpacing(), atol=1e-4)
    assert v.meta["format"] == "DICOM" and v.meta["dicom"]["modality"] == "CT"
    # rescale intercept applied, slices sorted by position although file names are shuffled
    assert np.array_equal(v.array.astype(np.int32), sitk.GetArrayFromImage(img).astype(np.int32))


def test_dicom_folder_with_mixed_series_picks_largest(tmp_path, samples):
    img = sitk.ReadImage(str(samples / "breast1_image.nrrd"))
    write_dicom_series(img, tmp_path / "dcm", "1.2.3.4.5.6", series_number=1)
    write_dicom_series(img[:, :, :5], tmp_path / "dcm", "1.2.3.4.5.7", series_number=2)
    v = read_volume(tmp_path / "dcm")
    assert v.size_xyz[2] == 21
    assert v.meta["other_series"] == [("1.2.3.4.5.7", 5)]
    small = read_volume(tmp_path / "dcm", series_uid="1.2.3.4.5.7")
    assert small.size_xyz[2] == 5


def test_dicom_series_with_mixed_slice_sizes_is_refused(tmp_path, samples):
    img = sitk.ReadImage(str(samples / "breast1_image.nrrd"))
    import pydicom

    files = write_dicom_series(img, tmp_path / "dcm", "1.2.3.4.5.6", shuffle_names=False)
    ds = pydicom.dcmread(files[3])  # one slice of another size, same series
    ds.Rows, ds.Columns = 30, 30
    ds.PixelData = np.zeros((30, 30), np.uint16).tobytes()
    ds.save_as(files[3])
    with pytest.raises(VolumeReadError, match="mixes slice sizes"):
        read_volume(tmp_path / "dcm")


def test_four_d_is_channels(tmp_path):
    a = np.random.default_rng(1).random((3, 5, 6, 7)).astype(np.float32)  # (C, Z, Y, X)
    img = sitk.JoinSeries([sitk.GetImageFromArray(c) for c in a])
    path = tmp_path / "multi.nii.gz"
    sitk.WriteImage(img, str(path))
    v = read_volume(path)
    assert v.array.shape == (3, 5, 6, 7) and v.channels == 3
    assert np.allclose(v.array, a)


def test_numpy_needs_spacing(tmp_path):
    a = np.zeros((4, 5, 6), np.float32)
    np.save(tmp_path / "a.npy", a)
    with pytest.raises(VolumeReadError, match="explicit spacing"):
        read_volume(tmp_path / "a.npy")
    v = read_volume(tmp_path / "a.npy", spacing=(1.0, 2.0, 3.0))
    assert v.size_xyz == (6, 5, 4) and v.spacing == (1.0, 2.0, 3.0)
    np.savez(tmp_path / "b.npz", image=a, spacing=np.array([0.5, 0.5, 2.0]))
    assert read_volume(tmp_path / "b.npz").spacing == (0.5, 0.5, 2.0)


# ---------------------------------------------------------------------------- bad input


def test_empty_file(tmp_path):
    p = tmp_path / "empty_scan.nrrd"
    p.write_bytes(b"")
    with pytest.raises(VolumeReadError, match=r"empty_scan\.nrrd: file is empty"):
        read_volume(p)


def test_truncated_gzip(tmp_path, samples):
    img, _ = _sitk_volume()
    p = tmp_path / "t.nii.gz"
    sitk.WriteImage(img, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeReadError, match=r"t\.nii\.gz: corrupt or truncated gzip"):
        read_volume(p)


def test_corrupt_gzip_bytes(tmp_path):
    p = tmp_path / "c.nii.gz"
    raw = gzip.compress(b"\x00" * 5000)
    p.write_bytes(raw[:10] + bytes(b ^ 0xFF for b in raw[10:40]) + raw[40:])
    with pytest.raises(VolumeReadError, match="c.nii.gz"):
        read_volume(p)


def test_non_image_with_image_extension(tmp_path):
    p = tmp_path / "notes.nrrd"
    p.write_text("these are meeting notes, not an image\n" * 20)
    with pytest.raises(VolumeReadError, match=r"notes\.nrrd: not a readable NRRD file"):
        read_volume(p)


def test_two_d_image_is_refused(tmp_path):
    p = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9), np.int16)), str(p))
    with pytest.raises(VolumeReadError, match="2-D"):
        read_volume(p)


def test_nan_voxels(tmp_path):
    a = np.ones((4, 5, 6), np.float32)
    a[1, 2, 3] = np.nan
    a[0, 0, 0] = np.inf
    p = tmp_path / "nan.mha"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    with pytest.raises(VolumeReadError, match="2 NaN/Inf voxels"):
        read_volume(p)
    v = read_volume(p, nonfinite="zero")
    assert np.isfinite(v.array).all() and v.array[1, 2, 3] == 0 and v.meta["nonfinite_replaced"] == 2


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(VolumeReadError, match="no such file"):
        read_volume(tmp_path / "nope.nii.gz")
    p = tmp_path / "scan.xyz"
    p.write_text("x")
    with pytest.raises(VolumeReadError, match="unknown volume format"):
        read_volume(p)


def test_folder_without_series(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(VolumeReadError, match="no volume file and no DICOM series"):
        read_volume(tmp_path / "empty_dir")


def test_volume_properties():
    v = Volume(np.zeros((2, 3, 4, 5)), (1.0, 2.0, 3.0))
    assert v.channels == 2 and v.shape_zyx == (3, 4, 5) and v.size_xyz == (5, 4, 3) and v.spacing_zyx == (3.0, 2.0, 1.0)


def test_unreadable_file_even_as_root(tmp_path, samples, monkeypatch):
    """Permission bits do not stop root, so simulate the kernel's answer for a file we may not read."""
    import voxseq.io.volume as vv

    p = tmp_path / "locked.nrrd"
    p.write_bytes((samples / "breast1_label.nrrd").read_bytes())
    monkeypatch.setattr(vv.os, "access", lambda path, mode: False)
    with pytest.raises(VolumeReadError, match=r"locked\.nrrd: permission denied"):
        read_volume(p)


# ---------------------------------------------------------------------------- arrays inside HDF5 / npz files


def test_parse_volume_path_round_trip():
    assert parse_volume_path("a/case.h5::image") == (Path("a/case.h5"), "image", None)
    assert parse_volume_path("d.npz::train_images[12]") == (Path("d.npz"), "train_images", 12)
    assert parse_volume_path("x.H5::scans/ct") == (Path("x.H5"), "scans/ct", None)
    assert parse_volume_path(member_path("d.npz", "val_images", 3)) == (Path("d.npz"), "val_images", 3)
    assert parse_volume_path("odd::name.nii.gz") == (Path("odd::name.nii.gz"), None, None)  # only after a container
    with pytest.raises(VolumeReadError, match=r"d\.npz::a\[x\]: expected"):
        parse_volume_path("d.npz::a[x]")


def _la_like_h5(path, xyz):
    import h5py

    with h5py.File(path, "w") as f:
        f["image"] = xyz
        f["label"] = (xyz > xyz.mean()).astype(np.uint8)
    return path


def test_hdf5_dataset_xyz_order(tmp_path):
    xyz = np.random.default_rng(0).random((7, 6, 5)).astype(np.float32)  # stored (X, Y, Z), as the LA files
    p = _la_like_h5(tmp_path / "mri_norm2.h5", xyz)
    v = read_volume(f"{p}::image", spacing=(0.625, 0.625, 0.625))
    assert v.array.shape == (5, 6, 7) and v.size_xyz == (7, 6, 5) and v.spacing == (0.625, 0.625, 0.625)
    assert v.array[4, 2, 1] == xyz[1, 2, 4] and v.meta["format"] == "HDF5" and v.orientation == "LPS"
    lab = read_volume(f"{p}::label", spacing=(0.625, 0.625, 0.625))
    assert lab.array.dtype == np.uint8 and int(lab.array.sum()) == int((xyz > xyz.mean()).sum())
    assert np.array_equal(read_volume(p, spacing=(1, 1, 1)).array, v.array)  # no member: the `image` dataset
    with pytest.raises(VolumeReadError, match=r"mri_norm2\.h5::image: HDF5 volumes need an explicit spacing"):
        read_volume(p)


def test_hdf5_attributes_and_errors(tmp_path):
    import h5py

    zyx = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    p = tmp_path / "vol.hdf5"
    with h5py.File(p, "w") as f:
        f.create_group("scans")["ct"] = zyx
        f["scans/ct"].attrs["axes"] = "zyx"
        f.attrs["spacing"] = [0.5, 0.5, 2.0]
        f["other"] = np.zeros(3)
    v = read_volume(f"{p}::scans/ct")
    assert np.array_equal(v.array, zyx) and v.spacing == (0.5, 0.5, 2.0)
    with pytest.raises(VolumeReadError, match=r"vol\.hdf5::label: no dataset 'label' in the HDF5 file \(has \['other', 'scans/ct'\]\)"):
        read_volume(f"{p}::label")
    with pytest.raises(VolumeReadError, match=r"vol\.hdf5: HDF5 file has datasets .*expected one named 'image'"):
        read_volume(p)
    bad = tmp_path / "notes.h5"
    bad.write_text("not hdf5")
    with pytest.raises(VolumeReadError, match=r"notes\.h5: not a readable HDF5 file"):
        read_volume(bad)


def test_npz_member_index(tmp_path):
    images = np.random.default_rng(1).integers(0, 255, (4, 6, 7, 8), dtype=np.uint8)
    p = tmp_path / "stack.npz"
    np.savez_compressed(p, train_images=images, train_labels=np.array([[0], [1], [1], [0]]))
    v = read_volume(f"{p}::train_images[2]", spacing=(1.0, 1.0, 1.0))
    assert v.array.shape == (6, 7, 8) and np.array_equal(v.array, images[2]) and v.spacing == (1.0, 1.0, 1.0)
    v.array[0, 0, 0] = 7  # the returned array is the caller's: the next read is unaffected
    assert read_volume(f"{p}::train_images[2]", spacing=(1, 1, 1)).array[0, 0, 0] == images[2, 0, 0, 0]
    assert np.array_equal(read_volume(f"{p}::train_images[-1]", spacing=(1, 1, 1)).array, images[3])
    with pytest.raises(VolumeReadError, match=r"stack\.npz::train_images\[4\]: index 4 is out of range \(the array holds 4"):
        read_volume(f"{p}::train_images[4]", spacing=(1, 1, 1))
    with pytest.raises(VolumeReadError, match=r"stack\.npz::test_images\[0\]: no array 'test_images'"):
        read_volume(f"{p}::test_images[0]", spacing=(1, 1, 1))
    with pytest.raises(VolumeReadError, match=r"stack\.npz::train_labels\[1\]: has 1 dimensions"):
        read_volume(f"{p}::train_labels[1]", spacing=(1, 1, 1))
    mtime = p.stat().st_mtime_ns
    np.savez_compressed(p, train_images=images[::-1])  # rewritten: no stale array from the reader's cache
    os.utime(p, ns=(mtime + 10**9, mtime + 10**9))  # a rewrite within the file system's clock tick
    assert np.array_equal(read_volume(f"{p}::train_images[0]", spacing=(1, 1, 1)).array, images[3])
