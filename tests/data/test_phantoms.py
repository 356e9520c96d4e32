"""Synthetic phantoms: determinism, anatomy, intensities, lesions, text, files on disk."""

from __future__ import annotations

import numpy as np
import pytest

from voxseq.data.manifest import read_manifest
from voxseq.data.phantoms import (
    ABNORMALITIES,
    BRATS_LABELS,
    ORGANS,
    make_ct_phantom,
    make_mri_phantom,
    write_phantoms,
)
from voxseq.io import read_volume

ALL_ON = {a: 1 for a in ABNORMALITIES}


@pytest.fixture(scope="module")
def torso():
    return make_ct_phantom(3, scan="chest_abdomen", abnormalities=ALL_ON)


def test_deterministic():
    a, b, c = make_ct_phantom(7), make_ct_phantom(7), make_ct_phantom(8)
    assert np.array_equal(a.image.array, b.image.array) and np.array_equal(a.label.array, b.label.array)
    assert a.report == b.report and a.lesions == b.lesions
    assert a.image.array.shape != c.image.array.shape or not np.array_equal(a.image.array, c.image.array)


def test_hu_per_organ(torso):
    hu, lab = torso.image.array, torso.label.array
    expected = {"lung_right": -850, "heart": 45, "liver": 60, "spleen": 50, "kidney_left": 150, "aorta": 200}
    for organ, value in expected.items():
        m = (lab == ORGANS[organ]) & ~torso.lesion_mask
        assert abs(np.median(hu[m]) - value) < 25, organ
    assert np.median(hu[lab == ORGANS["background"]]) < -950
    assert np.median(hu[lab == ORGANS["bone"]]) > 250


def _centroid(lab, organ):
    return np.argwhere(lab == ORGANS[organ]).mean(axis=0)  # (z, y, x) index


def test_anatomy_is_laid_out_like_a_body(torso):
    lab = torso.label.array
    # LPS: +z superior, +y posterior, +x patient left
    assert _centroid(lab, "lung_right")[0] > _centroid(lab, "liver")[0]  # lungs above the liver
    assert _centroid(lab, "bone")[1] > _centroid(lab, "aorta")[1]  # spine behind the aorta
    assert _centroid(lab, "liver")[2] < _centroid(lab, "spleen")[2]  # liver on the right, spleen on the left
    assert _centroid(lab, "lung_right")[2] < _centroid(lab, "lung_left")[2]
    assert _centroid(lab, "kidney_left")[1] > _centroid(lab, "liver")[1]  # kidneys posterior
    # the spine runs through every slice
    assert np.mean([(lab[z] == ORGANS["bone"]).any() for z in range(lab.shape[0])]) > 0.8


def test_lesions_inside_organs_and_boxes(torso):
    assert {b.category for b in torso.lesions} == {"lung", "liver", "kidney", "bone"}
    organ_of = {"lung": (2, 3), "liver": (5,), "kidney": (7, 8), "bone": (10,)}
    for box in torso.lesions:
        x0, y0, z0, x1, y1, z1 = box.bbox_xyz
        region = torso.lesion_mask[z0:z1, y0:y1, x0:x1]
        assert region.any()
        labels = torso.label.array[z0:z1, y0:y1, x0:x1][region]
        assert np.isin(labels, organ_of[box.category]).all()
    # boxes cover the whole lesion mask
    covered = np.zeros_like(torso.lesion_mask)
    for b in torso.lesions:
        x0, y0, z0, x1, y1, z1 = b.bbox_xyz
        covered[z0:z1, y0:y1, x0:x1] = True
    assert not (torso.lesion_mask & ~covered).any()


def test_sentences_match_findings():
    healthy = make_ct_phantom(5, scan="chest_abdomen", abnormalities={a: 0 for a in ABNORMALITIES})
    assert healthy.sentences["liver"] == "The liver is unremarkable." and not healthy.lesions
    sick = make_ct_phantom(5, scan="chest_abdomen", abnormalities=ALL_ON)
    assert "hypodense lesion" in sick.sentences["liver"] and "nodule" in sick.sentences["lung"]
    assert sick.sentences["heart"] == "The heart is enlarged." and sick.abnormalities["cardiomegaly"] == 1
    assert (sick.label.array == ORGANS["heart"]).sum() > 1.5 * (healthy.label.array == ORGANS["heart"]).sum()
    assert sick.report == " ".join(sick.sentences.values())


def test_variable_shape_and_spacing():
    ps = [make_ct_phantom(s) for s in range(6)]
    assert len({p.image.array.shape[0] for p in ps}) > 2
    assert len({round(p.image.spacing[2], 2) for p in ps}) > 1
    assert len({p.scan for p in ps}) > 1
    chest = make_ct_phantom(1, scan="chest")
    assert (chest.label.array == ORGANS["lung_left"]).sum() > (chest.label.array == ORGANS["liver"]).sum()


def test_mri_contrasts_coregistered():
    m = make_mri_phantom(2)
    img, lab = m.image.array, m.label.array
    assert img.shape[0] == 4 and img.shape[1:] == lab.shape
    assert set(np.unique(lab)) == set(BRATS_LABELS.values())
    oedema = lab == BRATS_LABELS["oedema"]
    enh = lab == BRATS_LABELS["enhancing"]
    t1n, t1c, t2w, t2f = (img[c] for c in range(4))
    assert t1c[enh].mean() > 1.4 * t1n[enh].mean()  # enhancement only after contrast
    assert t2f[oedema].mean() > 1.5 * t2f[lab == 0][t2f[lab == 0] > 0.3].mean()  # FLAIR-bright oedema
    assert m.lesions[0].category == "glioma"


def test_write_phantoms_manifest_and_files(tmp_path):
    manifest = write_phantoms(tmp_path, n_ct=2, n_mri=1, seed=1, size_xy=64, max_slices=48,
                              mri_shape_zyx=(32, 48, 48), progress=False)
    recs = read_manifest(manifest)
    assert [r.id for r in recs] == ["ct_000", "ct_001", "mri_000"]
    ct = recs[0]
    v = read_volume(ct.images["image"])
    p = make_ct_phantom(100_003, size_xy=64, max_slices=48)
    assert np.array_equal(v.array, p.image.array) and np.allclose(v.spacing, p.image.spacing)
    assert read_volume(ct.label).array.max() <= max(ORGANS.values())
    assert ct.sentences == p.sentences and ct.classes == {k: float(x) for k, x in p.abnormalities.items()}
    assert list(recs[2].images) == ["t1n", "t1c", "t2w", "t2f"]


def test_version2_keeps_anatomy_and_findings_and_changes_what_tells_organs_apart():
    """Phantoms v2: the same seed's labels and findings; soft-tissue organs of overlapping mean HU across
    patients, told apart by texture; one lesion appearance per category."""
    v1, v2 = make_ct_phantom(3, scan="chest_abdomen", abnormalities=ALL_ON), \
        make_ct_phantom(3, scan="chest_abdomen", abnormalities=ALL_ON, version=2)
    assert np.array_equal(v1.label.array, v2.label.array) and v1.abnormalities == v2.abnormalities
    assert v1.lesions == v2.lesions and not np.array_equal(v1.image.array, v2.image.array)
    assert np.array_equal(v2.image.array, make_ct_phantom(3, scan="chest_abdomen", abnormalities=ALL_ON,
                                                          version=2).image.array)
    from scipy.ndimage import binary_erosion

    means = {o: [] for o in ("liver", "spleen", "kidney_left")}
    stds = {o: [] for o in means}
    for seed in range(8):
        p = make_ct_phantom(seed, scan="abdomen", version=2)
        hu, lab = p.image.array.astype(float), p.label.array
        for o in means:
            m = binary_erosion((lab == ORGANS[o]) & ~p.lesion_mask, iterations=2)  # away from partial volumes
            means[o].append(hu[m].mean())
            stds[o].append(hu[m].std())
    # intensity ranges overlap across patients: every organ's range meets every other's
    for a in means:
        for b in means:
            assert max(min(means[a]), min(means[b])) < min(max(means[a]), max(means[b])), (a, b)
    # texture does tell them apart: the spleen is homogeneous, the liver granular, the kidney two-toned
    assert max(stds["spleen"]) < min(stds["liver"]) and max(stds["spleen"]) < min(stds["kidney_left"])
    # the liver lesion: a hypodense core inside an enhancing rim, in every patient
    liver_box = next(b for b in v2.lesions if b.category == "liver")
    x0, y0, z0, x1, y1, z1 = liver_box.bbox_xyz
    patch = v2.image.array[z0:z1, y0:y1, x0:x1].astype(float)
    core = patch[tuple(s // 2 for s in patch.shape)]
    assert core < np.median(v2.image.array[v2.label.array == ORGANS["liver"]]) < patch.max()
    with pytest.raises(ValueError, match="version"):
        make_ct_phantom(1, version=3)


def test_version2_mri_tissues_need_several_contrasts():
    """Every pair of brain tissues ties in at least one contrast (before noise and gain), so only the
    contrasts together separate them; the labels stay those of version 1."""
    from voxseq.data.phantoms import _MRI_TISSUE_V2

    brain = ("csf", "grey", "white", "oedema", "enhancing", "necrotic")
    for i, a in enumerate(brain):
        for b in brain[i + 1:]:
            va, vb = np.array(_MRI_TISSUE_V2[a]), np.array(_MRI_TISSUE_V2[b])
            assert (np.abs(va - vb) < 1e-9).any() and (np.abs(va - vb) > 0.1).any(), (a, b)
    m1, m2 = make_mri_phantom(2), make_mri_phantom(2, version=2)
    assert np.array_equal(m1.label.array, m2.label.array) and m2.image.array.shape == (4, 64, 96, 96)


def test_write_phantoms_version2_manifest(tmp_path):
    manifest = write_phantoms(tmp_path, n_ct=1, n_mri=1, seed=1, size_xy=48, max_slices=32, progress=False, version=2)
    records = read_manifest(manifest)
    assert [r.extra["phantom_version"] for r in records] == [2, 2]


CT_RATE_EXTRA = ("emphysema", "atelectasis", "consolidation", "pericardial effusion",
                 "coronary artery wall calcification", "arterial wall calcification")


def test_ct_rate_findings_paint_their_organ_and_name_it():
    from voxseq.data.phantoms import CT_RATE_RATES, ORGANS

    off = make_ct_phantom(1003, size_xy=64, max_slices=96, scan="chest_abdomen", findings="ct-rate",
                          abnormalities={k: 0 for k in CT_RATE_EXTRA})
    assert tuple(off.abnormalities) == tuple(CT_RATE_RATES)
    lab = off.label.array
    lungs = np.isin(lab, [ORGANS["lung_right"], ORGANS["lung_left"]])
    where = {"emphysema": lungs, "atelectasis": lungs, "consolidation": lungs,
             "pericardial effusion": np.isin(lab, [ORGANS["body"], ORGANS["lung_right"], ORGANS["lung_left"]]),
             "coronary artery wall calcification": lab == ORGANS["heart"],
             "arterial wall calcification": lab == ORGANS["aorta"]}
    words = {"emphysema": "emphysema", "atelectasis": "atelectasis", "consolidation": "consolidation",
             "pericardial effusion": "pericardial effusion", "coronary artery wall calcification": "coronary artery",
             "arterial wall calcification": "wall calcification"}
    for finding in CT_RATE_EXTRA:
        on = make_ct_phantom(1003, size_xy=64, max_slices=96, scan="chest_abdomen", findings="ct-rate",
                             abnormalities={**{k: 0 for k in CT_RATE_EXTRA}, finding: 1})
        assert on.abnormalities[finding] == 1, finding
        np.testing.assert_array_equal(on.label.array, lab)  # labels (anatomy) unchanged
        changed = np.abs(on.image.array.astype(float) - off.image.array) > 60
        assert changed.sum() > 20, finding
        assert changed[where[finding]].sum() > 0.6 * changed.sum(), finding  # painted in (or at) its organ
        assert words[finding] in on.report and words[finding] not in off.report, finding
    with pytest.raises(ValueError, match="findings must be one of"):
        make_ct_phantom(1, size_xy=32, max_slices=24, findings="ctrate")


def test_ct_rate_rates_and_basic_phantoms_unchanged():
    basic = make_ct_phantom(5, size_xy=48, max_slices=48)
    assert basic.abnormalities.keys() == set(ABNORMALITIES) and "emphysema" not in basic.report
    seen = {}
    for s in range(60):
        p = make_ct_phantom(2000 + s, size_xy=32, max_slices=32, scan="chest", findings="ct-rate")
        for k, v in p.abnormalities.items():
            seen[k] = seen.get(k, 0) + v
    # chest scans: rare findings rare, common ones common, as in CT-RATE
    assert seen["lung nodule"] > seen["pleural effusion"] and seen["lung nodule"] >= 15
    assert seen["pericardial effusion"] <= 12 and seen["arterial wall calcification"] >= 6


def test_ct_rate_lung_findings_have_region_boxes_around_what_was_painted():
    from voxseq.data.phantoms import CT_RATE_RATES, DIFFUSE_REGION_FINDINGS

    none = {k: 0 for k in CT_RATE_RATES}
    off = make_ct_phantom(1003, size_xy=64, max_slices=96, scan="chest_abdomen", findings="ct-rate",
                          abnormalities=none)
    assert off.lesions == []
    for finding in DIFFUSE_REGION_FINDINGS:
        on = make_ct_phantom(1003, size_xy=64, max_slices=96, scan="chest_abdomen", findings="ct-rate",
                             abnormalities={**none, finding: 1})
        assert on.abnormalities[finding] == 1, finding
        [box] = on.lesions
        assert (box.category, box.organ) == (finding, "lung")
        x0, y0, z0, x1, y1, z1 = box.bbox_xyz
        changed = np.abs(on.image.array.astype(float) - off.image.array) > 60  # (Z, Y, X)
        inside, near = np.zeros_like(changed), np.zeros_like(changed)
        inside[z0:z1, y0:y1, x0:x1] = True
        near[max(z0 - 2, 0):z1 + 2, max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = True  # the smoothing's reach
        assert changed.sum() > 20 and changed[near].sum() > 0.95 * changed.sum(), finding
        assert changed[inside].sum() > 0.02 * inside.sum(), finding  # the box is about the finding, not the lungs
    # basic findings keep their boxes for focal lesions only (the effusion has none), as before
    basic = make_ct_phantom(1003, size_xy=64, max_slices=96, scan="chest_abdomen",
                            abnormalities={"pleural effusion": 1})
    assert basic.abnormalities["pleural effusion"] == 1
    assert all(b.organ is None for b in basic.lesions)


def test_every_box_carries_its_findings_words_from_its_organs_sentence():
    from voxseq.sequence.chunks import box_organ

    several = 0
    for seed in range(12):
        p = make_ct_phantom(3000 + seed, size_xy=48, max_slices=64, scan="chest", findings="ct-rate")
        for box in p.lesions:
            assert box.text and box.text in p.sentences[box_organ(vars(box))], (seed, box)
        lung = [b.text for b in p.lesions if box_organ(vars(b)) == "lung"]
        several += len(lung) > 1
        if lung:  # every lung finding of a ct-rate phantom has a box: their words make up the lung sentence
            assert " ".join(lung) == p.sentences["lung"], seed
    assert several  # lungs with more than one finding are in the sample
    # the words are the report's: basic phantoms keep their sentences, with words on their focal boxes
    basic = make_ct_phantom(7, size_xy=48, max_slices=64)
    assert all(b.text in basic.sentences[b.category] for b in basic.lesions)


def test_box_organ_round_trips_through_the_manifest_and_is_left_out_when_unset():
    import json

    from voxseq.data.manifest import Box, Record

    r = Record(id="a", images={"image": "a.nii.gz"},
               boxes=[Box("liver", [0, 0, 0, 2, 2, 2]),
                      Box("atelectasis", [1, 1, 1, 4, 4, 4], organ="lung", text="There is basal atelectasis.")])
    d = json.loads(r.to_json())
    assert d["boxes"] == [{"category": "liver", "bbox_xyz": [0, 0, 0, 2, 2, 2]},
                          {"category": "atelectasis", "bbox_xyz": [1, 1, 1, 4, 4, 4], "organ": "lung",
                           "text": "There is basal atelectasis."}]
    assert Record.from_dict(d).boxes == r.boxes
