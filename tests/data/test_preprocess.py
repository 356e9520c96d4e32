"""Preprocessing: windows, percentiles, resampling, crop, pad, geometry, YAML round trip."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from voxseq import VoxseqError
from voxseq.config import dump_yaml, from_dict, load_config, to_dict
from voxseq.data.preprocess import (
    CT_WINDOWS,
    Preprocess,
    check_same_grid,
    foreground_box,
    percentile_intensity,
    preprocess,
    resample,
    to_source_grid,
    window_intensity,
)
from voxseq.io import Volume, VolumeReadError, read_volume


def test_ct_windows_from_reference():
    assert CT_WINDOWS["liver"] == (-21.0, 189.0)
    assert CT_WINDOWS["lung"] == (-1000.0, 1000.0)
    assert CT_WINDOWS["pancreas"] == (-87.0, 199.0)
    assert CT_WINDOWS["hepatic_vessel"] == (0.0, 230.0)
    assert CT_WINDOWS["spleen"] == CT_WINDOWS["colon"] == (-57.0, 175.0)


def test_window_maps_range_linearly():
    hu = np.array([-1000, -21, 84, 189, 3000], dtype=np.int16)
    out = window_intensity(hu, -21, 189)
    assert np.allclose(out, [0, 0, 0.5, 1, 1])
    assert np.allclose(window_intensity(hu, -1000, 1000, out_range=(-1, 1)), [-1, -0.021, 0.084, 0.189, 1])


def test_several_hu_windows_make_one_channel_each():
    hu = np.array([-1000, -600, -175, 0, 250, 1300], dtype=np.int16).reshape(1, 1, 6)
    vol = Volume(hu, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    cfg = Preprocess(intensity="window", hu_windows=[[-1000, 200], [-175, 250], [-500, 1300]], out_range=[-1, 1])
    out, _ = preprocess(vol, None, cfg)
    assert out.array.shape == (3, 1, 1, 6) and out.channels == 3
    assert np.allclose(out.array[0, 0, 0], [-1, -1 / 3, 0.375, 2 / 3, 1, 1])  # lung: a -600 HU nodule rim stands out
    assert np.allclose(out.array[1, 0, 0], [-1, -1, -1, -0.1764706, 1, 1])  # soft tissue: the same rim is air
    assert np.allclose(out.array[2, 0, 0], [-1, -1, -0.6388889, -0.4444444, -0.1666667, 1])
    # one CT channel only: several windows of several channels would be ambiguous
    with pytest.raises(VoxseqError, match="turns one CT channel into 3"):
        preprocess(Volume(np.stack([hu, hu]), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), None, cfg)
    for bad in ([], [[200, -1000]], [[-1000, 200, 5]]):
        with pytest.raises(VoxseqError, match="hu_windows"):
            Preprocess(intensity="window", hu_windows=bad)


def test_percentile_normalisation_per_channel():
    rng = np.random.default_rng(0)
    a = np.stack([rng.normal(100, 10, (8, 8, 8)), rng.normal(5000, 500, (8, 8, 8))]).astype(np.float32)
    out = percentile_intensity(a, (1, 99))
    for c in out:
        assert c.min() == 0 and c.max() == 1
        assert abs(np.percentile(c, 50) - 0.5) < 0.1
    assert np.all(percentile_intensity(np.full((3, 3, 3), 7.0)) == 0)  # constant image: no division by zero


def test_resample_linear_image_nearest_label(samples):
    lab = read_volume(samples / "brain1_label.nrrd")
    img = read_volume(samples / "brain1_image.nrrd")
    r_img = resample(img, (1.5, 1.5, 2.0))
    r_lab = resample(lab, (1.5, 1.5, 2.0), is_label=True)
    assert r_img.spacing == (1.5, 1.5, 2.0)
    assert r_img.size_xyz == (133, 133, 81)  # 256*0.78/1.5, 25*6.5/2
    assert set(np.unique(r_lab.array)) <= {0, 1}  # nearest: no new label values
    # the lesion's physical volume is preserved within 5%
    vox_mm3 = np.prod(lab.spacing)
    assert abs(r_lab.array.sum() * 1.5 * 1.5 * 2.0 / (lab.array.sum() * vox_mm3) - 1) < 0.05
    assert np.allclose(r_img.origin, img.origin)


def test_pipeline_crop_pad_and_back_to_source(samples):
    img = read_volume(samples / "breast1_image.nrrd")
    lab = read_volume(samples / "breast1_label.nrrd")
    cfg = Preprocess(spacing_xyz=[1.0, 1.0, 1.0], crop_foreground=True, foreground_threshold=0.05, min_shape_zyx=[64, 96, 96])
    out_img, out_lab = preprocess(img, lab, cfg)
    assert out_img.array.dtype == np.float32 and out_lab.array.dtype == np.uint8
    assert all(s >= m for s, m in zip(out_img.shape_zyx, (64, 96, 96)))
    assert out_img.array.min() >= 0 and out_img.array.max() <= 1
    assert "pad_before_zyx" in out_img.meta["preprocess"]
    back = to_source_grid(out_lab.array, out_img, img)
    src = sitk.ReadImage(str(samples / "breast1_label.nrrd"))
    assert back.GetSize() == src.GetSize()
    assert np.allclose(back.GetOrigin(), src.GetOrigin()) and np.allclose(back.GetSpacing(), src.GetSpacing())
    ref = sitk.GetArrayFromImage(src) > 0
    got = sitk.GetArrayFromImage(back) > 0
    dice = 2 * (ref & got).sum() / (ref.sum() + got.sum())
    assert dice > 0.8  # through 1 mm resampling and back


def test_foreground_box_with_margin():
    a = np.zeros((10, 10, 10), np.float32)
    a[3:5, 4:7, 2:3] = 1
    assert foreground_box(a, 0.5, 1) == ([2, 3, 1], [6, 8, 4])
    assert foreground_box(np.zeros((4, 4, 4)), 0.5, 1) == ([0, 0, 0], [4, 4, 4])


def test_label_geometry_mismatch_is_refused(samples):
    img = read_volume(samples / "breast1_image.nrrd")
    lab = read_volume(samples / "brain1_label.nrrd")
    with pytest.raises(VolumeReadError, match="label geometry does not match"):
        check_same_grid(img, lab)
    shifted = Volume(img.array, img.spacing, (img.origin[0] + 10, *img.origin[1:]), img.direction, {"path": "lab.nrrd"})
    with pytest.raises(VolumeReadError, match=r"lab\.nrrd: label geometry.*origin"):
        preprocess(img, shifted, Preprocess())


def test_config_yaml_round_trip_and_overrides(tmp_path):
    cfg = Preprocess(intensity="window", window="liver", spacing_xyz=[1.5, 1.5, 2.0], min_shape_zyx=[96, 96, 96])
    text = dump_yaml(cfg)
    (tmp_path / "p.yaml").write_text(text)
    again = load_config(Preprocess, tmp_path / "p.yaml", ["crop_foreground=true", "percentiles=[1, 99.9]"])
    assert again.window == "liver" and again.spacing_xyz == [1.5, 1.5, 2.0]
    assert again.crop_foreground is True and again.percentiles == [1.0, 99.9]
    assert from_dict(Preprocess, to_dict(cfg)) == cfg


def test_bad_preprocess_settings():
    with pytest.raises(VoxseqError, match="unknown CT window preset"):
        Preprocess(intensity="window", window="brain")
    with pytest.raises(VoxseqError, match="unknown config field"):
        from_dict(Preprocess, {"spacin": [1, 1, 1]})
    with pytest.raises(VoxseqError, match="expected a number"):
        from_dict(Preprocess, {"spacing_xyz": ["a", 1, 1]})
