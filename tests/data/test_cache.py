"""The voxel cache: contents, lazy reads, resume, crash safety, errors, boxes in the cache grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from voxseq import VoxseqError
from voxseq.data.cache import Cache, box_to_grid, prepare_cache
from voxseq.data.manifest import Box, Record
from voxseq.data.preprocess import Preprocess
from voxseq.io import read_volume


def _records(samples):
    return [Record(id=n, images={"image": str(samples / f"{n}_image.nrrd")}, label=str(samples / f"{n}_label.nrrd"))
            for n in ("breast1", "brain1")]


def test_prepare_writes_float16_memmaps_and_stats(tmp_path, samples):
    s = prepare_cache(_records(samples), tmp_path / "c", Preprocess(), workers=1, progress=False)
    assert s.done == 2 and s.reused == 0 and not s.skipped
    c = Cache(tmp_path / "c")
    assert c.ids == ["breast1", "brain1"]
    img, lab = c.image(0), c.label(0)
    assert isinstance(img, np.memmap) and img.dtype == np.float16 and img.shape == (1, 21, 120, 45)
    assert lab.dtype == np.uint8 and lab.shape == (21, 120, 45)
    assert lab.sum() == read_volume(samples / "breast1_label.nrrd").array.sum() > 0
    e = c.entry(1)
    assert e["shape_zyx"] == [25, 256, 256] and np.allclose(e["spacing_xyz"], [0.78125, 0.78125, 6.5])
    assert e["stats"][0]["min"] == 0 and e["stats"][0]["max"] == 1 and 0 < e["stats"][0]["mean"] < 1
    assert e["source"]["source_orientation"] == "LAS" and e["raw_range"] == [0.0, 3057.0]
    # the cached label equals the file's label in canonical orientation
    ref = read_volume(samples / "brain1_label.nrrd").array
    assert np.array_equal(c.label(1), ref.astype(np.uint8))
    assert c.verify(0) == [] and c.preprocess == Preprocess()


def test_rerun_reuses_and_resumes_after_interruption(tmp_path, samples):
    out = tmp_path / "c"
    prepare_cache(_records(samples), out, Preprocess(), progress=False)
    # simulate a crash in the middle of writing brain1: entry.json missing, a temp file left over
    (out / "volumes" / "brain1" / "entry.json").unlink()
    (out / "volumes" / "brain1" / ".tmp-999-image.npy").write_bytes(b"partial")
    s = prepare_cache(_records(samples), out, Preprocess(), progress=False)
    assert s.reused == 1 and s.done == 1
    assert not list(out.glob("volumes/*/.tmp-*"))
    assert len(Cache(out)) == 2


def test_a_changed_record_is_prepared_again_and_an_unchanged_one_reused(tmp_path, samples):
    out = tmp_path / "c"
    prepare_cache(_records(samples), out, Preprocess(), progress=False)
    changed = _records(samples)
    changed[0].sentences = {"breast": "A new report sentence."}
    changed[0].boxes = [Box("mass", [1, 1, 1, 4, 4, 4], organ="breast")]
    s = prepare_cache(changed, out, Preprocess(), progress=False)
    assert s.reused == 1 and s.done == 1
    e = Cache(out).entry(0)
    assert e["sentences"] == {"breast": "A new report sentence."}
    assert [(b["category"], b["organ"]) for b in e["boxes"]] == [("mass", "breast")]
    assert prepare_cache(changed, out, Preprocess(), progress=False).reused == 2  # and then kept
    changed[0].boxes = [Box("mass", [2, 1, 1, 5, 4, 4], organ="breast")]  # the same finding, moved
    s = prepare_cache(changed, out, Preprocess(), progress=False)
    assert s.reused == 1 and s.done == 1
    assert Cache(out).entry(0)["boxes"][0]["bbox_xyz"] == [2, 1, 1, 5, 4, 4]
    changed[0].boxes[0].text = "A new report sentence."  # the box now carries its words
    s = prepare_cache(changed, out, Preprocess(), progress=False)
    assert s.reused == 1 and s.done == 1
    assert Cache(out).entry(0)["boxes"][0]["text"] == "A new report sentence."


def test_different_preprocess_is_refused(tmp_path, samples):
    prepare_cache(_records(samples)[:1], tmp_path / "c", Preprocess(), progress=False)
    with pytest.raises(VoxseqError, match="different preprocessing"):
        prepare_cache(_records(samples)[:1], tmp_path / "c", Preprocess(intensity="window", window="lung"), progress=False)


def test_on_error_skip_lists_failures_and_keeps_earlier_work(tmp_path, samples):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    records = _records(samples)[:1] + [
        Record(id="missing", images={"image": str(tmp_path / "gone.nrrd")}),
        Record(id="broken", images={"image": str(bad)}),
        Record(id="mismatch", images={"image": str(samples / "breast1_image.nrrd")}, label=str(samples / "brain1_label.nrrd")),
    ]
    s = prepare_cache(records, tmp_path / "c", Preprocess(), on_error="skip", progress=False)
    assert s.done == 1
    reasons = {x["id"]: x["error"] for x in s.skipped}
    assert set(reasons) == {"missing", "broken", "mismatch"}
    assert "gone.nrrd: no such file" in reasons["missing"]
    assert "broken.nii.gz: corrupt or truncated gzip" in reasons["broken"]
    assert "label geometry does not match" in reasons["mismatch"]
    skipped = [json.loads(line) for line in (tmp_path / "c" / "skipped.jsonl").read_text().splitlines()]
    assert {x["id"] for x in skipped} == set(reasons)
    assert Cache(tmp_path / "c").ids == ["breast1"]
    # on_error=stop: fails naming the file, and what was finished stays finished
    with pytest.raises(VoxseqError, match="gone.nrrd"):
        prepare_cache(records, tmp_path / "c", Preprocess(), progress=False)
    assert Cache(tmp_path / "c").ids == ["breast1"]


def test_parallel_workers_match_serial(tmp_path, samples):
    prepare_cache(_records(samples), tmp_path / "a", Preprocess(), workers=1, progress=False)
    prepare_cache(_records(samples), tmp_path / "b", Preprocess(), workers=2, progress=False)
    a, b = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    assert a.ids == b.ids
    for i in range(len(a)):
        assert np.array_equal(a.image(i), b.image(i))


def test_multi_modality_record_stacks_channels(tmp_path, samples):
    r = Record(id="mm", images={"t1": str(samples / "breast1_image.nrrd"), "t2": str(samples / "breast1_image.nrrd")})
    prepare_cache([r], tmp_path / "c", Preprocess(), progress=False)
    c = Cache(tmp_path / "c")
    assert c.image(0).shape == (2, 21, 120, 45) and c.entry(0)["modalities"] == ["t1", "t2"]


def test_boxes_follow_reorientation_and_resampling(tmp_path, samples):
    """A box drawn in the file's voxel grid lands on the same anatomy in the cache grid."""
    src = sitk.ReadImage(str(samples / "brain1_label.nrrd"))  # stored LAS: Y flips on reading
    lab = sitk.GetArrayFromImage(src)
    zyx = np.argwhere(lab > 0)
    lo, hi = zyx.min(0), zyx.max(0) + 1
    box = Box("lesion", [int(lo[2]), int(lo[1]), int(lo[0]), int(hi[2]), int(hi[1]), int(hi[0])])
    r = Record(id="b", images={"image": str(samples / "brain1_image.nrrd")}, label=str(samples / "brain1_label.nrrd"),
               boxes=[box])
    prepare_cache([r], tmp_path / "c", Preprocess(spacing_xyz=[1.0, 1.0, 2.0]), progress=False)
    c = Cache(tmp_path / "c")
    z0, y0, x0, z1, y1, x1 = c.entry(0)["boxes"][0]["bbox_zyx"]
    cached = np.asarray(c.label(0))
    inside = cached[z0:z1, y0:y1, x0:x1].sum()
    assert inside == cached.sum() > 0  # every lesion voxel inside the mapped box
    assert (z1 - z0) * (y1 - y0) * (x1 - x0) < 2.0 * np.prod(np.ptp(np.argwhere(cached), axis=0) + 1)  # and the box is tight


def test_box_to_grid_identity():
    from voxseq.io import Volume

    grid = Volume(np.zeros((10, 20, 30)), (1.0, 1.0, 1.0))
    meta = {"source_origin_xyz": [0, 0, 0], "source_spacing_xyz": [1, 1, 1], "source_direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    assert box_to_grid(Box("x", [2, 3, 4, 6, 8, 9]), meta, grid) == [4, 3, 2, 9, 8, 6]


def test_not_a_cache(tmp_path):
    with pytest.raises(VoxseqError, match="not a voxseq cache"):
        Cache(tmp_path)


# ---------------------------------------------------------------------------- RadGenome region masks


def _write_ras(array: np.ndarray, path) -> str:
    """Write (Z, Y, X) as NIfTI stored RAS (x and y flipped against the cache's LPS), 1 mm voxels."""
    img = sitk.GetImageFromArray(array)
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    img.SetOrigin((10.0, 20.0, -5.0))
    sitk.WriteImage(img, str(path))
    return str(path)


def _radgenome_like(tmp_path) -> Record:
    """A CT with two overlapping region masks (lung, heart), asymmetric so that a flip would show."""
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1000, size=(16, 8, 6)).astype(np.int16)
    lung, heart = np.zeros(ct.shape, np.uint8), np.zeros(ct.shape, np.uint8)
    lung[0:10, 0:5, 0:3] = 1
    heart[6:16, 3:8, 1:6] = 1  # overlaps the lung in z 6..10, y 3..5, x 1..3
    return Record(id="train_1_a_1", images={"image": _write_ras(ct, tmp_path / "ct.nii.gz")},
                  masks={"lung": _write_ras(lung, tmp_path / "lung.nii.gz"), "heart": _write_ras(heart, tmp_path / "heart.nii.gz")},
                  sentences={"lung": "The lungs are clear.", "heart": "Normal heart size."}, text="Whole report.")


RADGENOME_PREPROCESS = Preprocess(spacing_xyz=[1.0, 1.0, 2.0], intensity="window", window="ct", out_range=[-1.0, 1.0])


def test_region_masks_are_cached_as_bits_on_the_image_grid(tmp_path):
    from voxseq.data.preprocess import preprocess

    rec = _radgenome_like(tmp_path)
    plain = Record(id="no_masks", images=dict(rec.images), text="A report.")
    s = prepare_cache([rec, plain], tmp_path / "c", RADGENOME_PREPROCESS, progress=False)
    assert s.done == 2
    c = Cache(tmp_path / "c")
    e = c.entry(0)
    assert e["regions"] == ["lung", "heart"] and "regions.npy" in e["sha256"] and c.verify(0) == []
    bits = c.regions(0)
    assert isinstance(bits, np.memmap) and bits.dtype == np.uint32 and bits.shape == c.image(0).shape[1:] == (8, 8, 6)
    assert c.regions(1) is None and "regions" not in c.entry(1)
    # each bit equals its mask sent through the label path of `preprocess` (reorient, resample nearest)
    for r, name in enumerate(e["regions"]):
        _, ref = preprocess(read_volume(rec.images["image"]), read_volume(rec.masks[name]), RADGENOME_PREPROCESS)
        assert np.array_equal((bits & np.uint32(1 << r)) > 0, ref.array > 0)
    assert ((bits & 1) > 0).sum() == 5 * 5 * 3 and ((bits & 2) > 0).sum() == 5 * 5 * 5  # z halved by 2 mm slices
    assert ((bits & 3) == 3).sum() == 2 * 2 * 2 and bits.max() == 3
    # a finished volume with regions is reused; one whose regions.npy is gone is named, then redone by repair
    assert prepare_cache([rec, plain], tmp_path / "c", RADGENOME_PREPROCESS, progress=False).reused == 2
    (tmp_path / "c" / e["folder"] / "regions.npy").unlink()
    with pytest.raises(VoxseqError, match=r"regions\.npy: missing"):
        prepare_cache([rec, plain], tmp_path / "c", RADGENOME_PREPROCESS, progress=False)
    assert prepare_cache([rec, plain], tmp_path / "c", RADGENOME_PREPROCESS, repair=True, progress=False).done == 1


def test_more_than_32_regions_is_refused(tmp_path):
    rec = _radgenome_like(tmp_path)
    rec.masks = {f"region{r}": rec.masks["lung"] for r in range(33)}
    with pytest.raises(VoxseqError, match="train_1_a_1: 33 region masks, but at most 32"):
        prepare_cache([rec], tmp_path / "c", RADGENOME_PREPROCESS, progress=False)


def test_chunks_pair_with_the_regions_they_show(tmp_path):
    from voxseq.sequence import ChunkConfig, ChunkTextDataset, sentence_key

    rec = _radgenome_like(tmp_path)
    prepare_cache([rec], tmp_path / "c", RADGENOME_PREPROCESS, progress=False)
    c = Cache(tmp_path / "c")
    bits = np.asarray(c.regions(0))
    ds = ChunkTextDataset(c, ChunkConfig(patch_size=2, min_slices=2, max_slices=2, pad_value=-1.0))
    seen = set()
    for i in range(30):
        it = ds[i]
        slab = bits[it["z0"]:it["z1"]]
        expected = []
        for r, name in enumerate(["lung", "heart"]):
            inside, total = ((slab >> r) & 1).sum(), ((bits >> r) & 1).sum()
            if inside and (inside >= 0.3 * total or inside >= 0.05 * slab.size):
                expected.append(name)
        assert it["organs"] == expected and expected  # z 3..5 shows both: lung first, as in the sentences
        assert it["text"] == " ".join(rec.sentences[o] for o in expected)
        assert it["sentence_keys"] == [sentence_key(rec.sentences[o]) for o in expected]
        seen.add(tuple(expected))
    assert seen == {("lung",), ("heart",), ("lung", "heart")}


def test_label_map_merges_and_drops_classes(tmp_path):
    """data.label_map relabels what the cache returns (values not listed -> 0); the files stay as written."""
    from voxseq.tasks.data import DataConfig, open_cache

    lab = np.zeros((8, 8, 8), np.uint8)
    lab[0], lab[1], lab[2], lab[3] = 1, 2, 3, 7
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / "i.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "l.nii.gz"))
    prepare_cache([Record(id="v", images={"image": str(tmp_path / "i.nii.gz")}, label=str(tmp_path / "l.nii.gz"))],
                  tmp_path / "c", Preprocess(intensity="none"), workers=1, progress=False)
    cfg = DataConfig(label_map={"2": "1", 3: 1, 7: 2})  # string keys, as read back from JSON metadata
    assert cfg.label_map == {2: 1, 3: 1, 7: 2}
    mapped = open_cache(tmp_path / "c", None, cfg.label_map).label(0)
    assert [int(mapped[z].max()) for z in range(5)] == [0, 1, 1, 2, 0] and mapped.dtype == np.uint8
    assert np.array_equal(open_cache(tmp_path / "c", None).label(0), lab)  # no map: the cached labels
    with pytest.raises(VoxseqError, match="label_map"):
        DataConfig(label_map={1: 300})
    with pytest.raises(VoxseqError, match="label_map"):
        DataConfig(label_map={"lung": 1})
