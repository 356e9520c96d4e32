"""SigVLP chunks: organ coverage and sentence pairing, report fallback, determinism, positions, packing."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from voxseq import VoxseqError
from voxseq.models.vit3d import packed_attention_mask
from voxseq.models.vlp import segment_mean
from voxseq.sequence import (
    ArraySource,
    ChunkBatchSampler,
    ChunkConfig,
    ChunkTextDataset,
    chunk_batches,
    collate_packed,
    label_counts,
    lesion_in_window,
    organs_in_chunk,
    pack_lengths,
    padding_waste,
    sentence_key,
    sentence_labels,
    volume_chunks,
    window_sentence,
)

P = 4
MAPPING = {"lung": [2, 3], "heart": [4], "liver": [5], "spleen": [6]}
SENTENCES = {"lung": "The lungs are clear.", "heart": "The heart is normal.", "liver": "The liver is unremarkable.",
             "spleen": "The spleen is unremarkable."}


def organ_labels() -> np.ndarray:
    """(32, 16, 16): lungs through every slice (half the slice), the heart whole in z 4..8, a thin liver in
    z 14..30 (16 voxels a slice), no spleen."""
    lab = np.zeros((32, 16, 16), np.uint8)
    lab[:, 8:, :8], lab[:, 8:, 8:] = 2, 3
    lab[4:8, 4:8, 4:8] = 4
    lab[14:30, :4, :4] = 5
    return lab


def coord_volume(shape=(32, 16, 16)) -> np.ndarray:
    """Voxel value encodes its position, so every token says where it came from."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (z * 10000 + y * 100 + x).astype(np.float32)[None]


def organ_source(n: int = 2) -> ArraySource:
    entries = [{"id": str(i), "sentences": dict(SENTENCES), "text": "Whole report.", "extra": {"sentence_labels": MAPPING}}
               for i in range(n)]
    return ArraySource([coord_volume() for _ in range(n)], entries, [organ_labels() for _ in range(n)])


def cfg(**kw) -> ChunkConfig:
    base = dict(patch_size=P, min_slices=4, max_slices=16)
    base.update(kw)
    return ChunkConfig(**base)


def brute_force_organs(z0: int, z1: int) -> set[str]:
    lab, shown = organ_labels(), set()
    for name, ids in MAPPING.items():
        total, inside = np.isin(lab, ids).sum(), np.isin(lab[max(0, z0):z1], ids).sum()
        if inside and (inside >= 0.3 * total or inside >= 0.05 * lab[max(0, z0):z1].size):
            shown.add(name)
    return shown


# ---------------------------------------------------------------------------- coverage and pairing


def test_organs_in_chunk_whole_thin_and_absent():
    lab = organ_labels()
    counts = label_counts(lab)
    assert counts[[2, 3]].sum() == 32 * 128 and counts[4] == 64 and counts[5] == 256 and counts[6] == 0
    # z 0..16: the heart whole (100% of it), the lungs (50%); the liver cut thinly (2 slices: 12.5% of it,
    # 0.8% of the chunk) is not shown; the spleen is absent. Most of the chunk first.
    assert organs_in_chunk(lab[:16], counts, MAPPING) == ["lung", "heart"]
    assert organs_in_chunk(lab[16:], counts, MAPPING) == ["lung", "liver"]  # 14 of 16 liver slices
    # a thin slab holds 12.5% of the lungs but they fill half of it: shown through chunk_fraction
    assert organs_in_chunk(lab[:4], counts, MAPPING) == ["lung"]
    assert organs_in_chunk(lab[:4], counts, MAPPING, chunk_fraction=0.6) == []
    # half the heart: shown at organ_fraction 0.3, not at 0.6
    assert "heart" in organs_in_chunk(lab[6:10], counts, MAPPING)
    assert "heart" not in organs_in_chunk(lab[6:10], counts, MAPPING, organ_fraction=0.6, chunk_fraction=0.5)


def test_region_bits_count_overlapping_regions():
    bits = np.zeros((4, 4, 4), np.uint32)
    bits[:2] |= 1  # region 0: top half
    bits[:, :2] |= 2  # region 1: front half, overlapping region 0
    assert label_counts(bits, 2).tolist() == [32, 32]
    assert organs_in_chunk(bits[:1], label_counts(bits, 2), {"a": [0], "b": [1]}, 0.2, 0.9) == ["a", "b"]


class RegionSource(ArraySource):
    """An in-memory source with RadGenome-style region bits, like ``Cache.regions``."""

    def __init__(self, *args, regions=None, **kw):
        super().__init__(*args, **kw)
        self._regions = regions

    def regions(self, i: int):
        return self._regions[i]


def test_region_bits_win_over_labels():
    bits = np.zeros((32, 16, 16), np.uint32)
    bits[:16, :2, :2] |= 1  # "heart" region in z 0..16 (the label map has the heart in z 4..8 only)
    bits[8:, :2, :2] |= 2  # "spleen" region, overlapping in z 8..16 (absent from the label map); both small
    # in-plane, so only organ_fraction decides: shown when the 8-slice chunk holds >= 30% of the region
    src = organ_source(1)
    src.entries[0]["regions"] = ["heart", "spleen", "no_sentence"]
    ds = ChunkTextDataset(RegionSource(src.images, src.entries, src.labels, regions=[bits]),
                          cfg(min_slices=8, max_slices=8))
    for i in range(20):
        it = ds[i]
        expected = [o for o, (lo, hi) in (("heart", (0, 16)), ("spleen", (8, 32)))
                    if it["z0"] < hi and it["z1"] > lo and (min(hi, it["z1"]) - max(lo, it["z0"])) >= 0.3 * (hi - lo)]
        assert it["organs"] == expected and it["text"] == " ".join(SENTENCES[o] for o in expected)


def test_sentence_labels_sources():
    assert sentence_labels({"extra": {"sentence_labels": {"lung": [1]}}}) == {"lung": [1]}
    ct = sentence_labels({"extra": {"kind": "ct"}})
    assert ct["lung"] == [2, 3] and ct["kidney"] == [7, 8] and list(ct)[:3] == ["lung", "heart", "liver"]
    assert sentence_labels({"extra": {"kind": "mri"}}) == {} and sentence_labels({}) == {}


def test_sentence_key_is_stable_and_normalised():
    k = sentence_key("The lungs are clear.")
    assert k == sentence_key("  the LUNGS  are\nclear. ") and 0 <= k < 2**63
    assert k != sentence_key("The lungs are clear")
    assert k == int.from_bytes(__import__("hashlib").blake2b(b"the lungs are clear.", digest_size=8).digest(), "big") >> 1


def test_sentence_key_masks_measurements():
    assert sentence_key("The liver shows a 1.2 cm hypodense lesion.") == sentence_key("The liver shows a 25 cm hypodense lesion.")
    assert sentence_key("The liver shows a 1,2 cm lesion.") == sentence_key("The liver shows a 3 cm lesion.")
    assert sentence_key("The liver shows a 1.2 cm lesion.") != sentence_key("The liver shows a 1.2 mm lesion.")
    assert sentence_key("The liver shows a lesion.") != sentence_key("The liver is unremarkable.")


def test_lesion_in_window_needs_the_given_share_of_a_box():
    boxes = [{"category": "liver", "bbox_zyx": [10, 0, 0, 14, 4, 4]}, {"category": "liver", "bbox_zyx": [30, 0, 0, 32, 4, 4]}]
    assert lesion_in_window(boxes, "heart", [0, 0, 0], [4, 16, 16])  # no box of that organ: its sentence is true anywhere
    assert not lesion_in_window(boxes, "liver", [0, 0, 0], [8, 16, 16])  # no lesion in z 0..8
    assert lesion_in_window(boxes, "liver", [0, 0, 0], [12, 16, 16])  # half of the first box (z 10..12)
    assert not lesion_in_window(boxes, "liver", [0, 0, 0], [11, 16, 16])  # a quarter of it
    assert lesion_in_window(boxes, "liver", [0, 0, 0], [11, 16, 16], fraction=0.25)
    assert lesion_in_window(boxes, "liver", [24, -4, -4], [16, 24, 24])  # the second box, whole (padded window)
    assert not lesion_in_window(boxes, "liver", [0, 3, 0], [16, 16, 16])  # in z, but a quarter of it in y ...
    assert lesion_in_window(boxes, "liver", [0, 2, 0], [16, 16, 16])  # ... half of it is enough at 0.5


def test_lesion_in_window_takes_a_findings_organ_and_a_finding_bigger_than_the_window():
    # a basal effusion region of the lung, far bigger than the window: category names the finding, organ the sentence
    boxes = [{"category": "pleural effusion", "organ": "lung", "bbox_zyx": [0, 8, 0, 40, 16, 16]}]
    assert lesion_in_window(boxes, "liver", [0, 0, 0], [8, 8, 8])  # another organ: no box of its own
    assert lesion_in_window(boxes, "lung", [0, 8, 0], [8, 8, 8])  # inside the region: it fills the window
    assert lesion_in_window(boxes, "lung", [0, 4, 0], [8, 8, 8])  # half the window
    assert not lesion_in_window(boxes, "lung", [0, 3, 0], [8, 8, 8])  # 3/8 of the window, 1/27 of the region
    assert not lesion_in_window(boxes, "lung", [0, 0, 0], [8, 8, 8])  # the lung above it
    assert lesion_in_window(boxes, "pleural effusion", [0, 0, 0], [8, 8, 8])  # boxes bind their organ, not category


def test_an_organ_with_a_lesion_is_shown_only_by_chunks_holding_the_lesion():
    src = organ_source(1)
    src.entries[0]["sentences"]["liver"] = "The liver shows a 1.0 cm lesion."
    src.entries[0]["boxes"] = [{"category": "liver", "bbox_zyx": [24, 0, 0, 28, 4, 4]}]  # liver is z 14..30
    ds = ChunkTextDataset(src, cfg(min_slices=8, max_slices=8))
    liver = [ds[i] for i in range(60) if "liver" in brute_force_organs(ds[i]["z0"], ds[i]["z1"])]
    assert liver
    for it in liver:
        holds = min(28, it["z1"]) - max(24, it["z0"]) >= 2
        assert ("liver" in it["organs"]) == holds, (it["z0"], it["z1"])
        assert (sentence_key("The liver shows a 1.0 cm lesion.") in it["shown_keys"]) == holds
    anywhere = ChunkTextDataset(src, cfg(min_slices=8, max_slices=8, lesion_fraction=0.0))  # localisation off
    for i in range(60):
        it = anywhere[i]
        assert ("liver" in it["organs"]) == ("liver" in brute_force_organs(it["z0"], it["z1"]))


def test_window_sentence_keeps_the_words_of_the_boxes_the_window_holds():
    sentence = "The lungs show a 1.0 cm solid nodule. There is basal atelectasis."
    boxes = [{"category": "lung", "text": "The lungs show a 1.0 cm solid nodule.", "bbox_zyx": [4, 4, 4, 6, 6, 6]},
             {"category": "atelectasis", "organ": "lung", "text": "There is basal atelectasis.",
              "bbox_zyx": [20, 0, 0, 40, 16, 16]},
             {"category": "liver", "text": "The liver shows a lesion.", "bbox_zyx": [0, 0, 0, 2, 2, 2]}]
    assert window_sentence(sentence, boxes, "lung", [0, 0, 0], [8, 8, 8]) == "The lungs show a 1.0 cm solid nodule."
    assert window_sentence(sentence, boxes, "lung", [24, 0, 0], [8, 8, 8]) == "There is basal atelectasis."
    assert window_sentence(sentence, boxes, "lung", [0, 0, 0], [32, 16, 16]) == sentence  # both held: both said
    assert window_sentence(sentence, boxes, "lung", [50, 0, 0], [8, 8, 8]) == sentence  # neither: not emptied
    # boxes without words, and words that are not in the sentence, leave it whole
    bare = [{k: v for k, v in b.items() if k != "text"} for b in boxes]
    assert window_sentence(sentence, bare, "lung", [24, 0, 0], [8, 8, 8]) == sentence
    other = [{**boxes[0], "text": "Something else."}, boxes[1]]
    assert window_sentence(sentence, other, "lung", [24, 0, 0], [8, 8, 8]) == sentence
    assert window_sentence("The liver shows a lesion.", boxes, "liver", [0, 0, 0], [8, 8, 8]) == \
        "The liver shows a lesion."


def test_a_window_names_only_the_findings_it_holds():
    src = organ_source(1)
    lesion, cyst = "The liver shows a 1.0 cm lesion.", "There is a small cyst."
    src.entries[0]["sentences"]["liver"] = f"{lesion} {cyst}"  # liver is z 14..30
    src.entries[0]["boxes"] = [{"category": "liver", "text": lesion, "bbox_zyx": [14, 0, 0, 18, 4, 4]},
                               {"category": "liver", "text": cyst, "bbox_zyx": [26, 0, 0, 30, 4, 4]}]
    ds = ChunkTextDataset(src, cfg(min_slices=4, max_slices=4, text_mode="one"))
    told = {}
    for i in range(200):
        it = ds[i]
        if "liver" in it["organs"]:
            told.setdefault(it["text"], set()).add(it["z0"])
            first, second = (min(hi, it["z1"]) - max(lo, it["z0"]) >= 2 for lo, hi in ((14, 18), (26, 30)))
            assert it["text"] == " ".join(t for t, held in ((lesion, first), (cyst, second)) if held)
            assert sentence_key(it["text"]) in it["shown_keys"] and it["sentence_keys"] == [sentence_key(it["text"])]
    assert set(told) == {lesion, cyst}  # 4-slice windows never hold both


def test_focused_groups_show_one_organ_with_findings_from_several_volumes():
    src = organ_source(4)
    for i in (1, 3):
        src.entries[i]["sentences"]["heart"] = "The heart is enlarged."
    ds = ChunkTextDataset(src, cfg(min_slices=8, max_slices=8, text_mode="one", focus_fraction=1.0, focus_group=6))
    assert list(ds._with_organ) == ["heart"]  # the only organ whose sentence differs between volumes
    group = [ds[i] for i in range(12, 18)]
    assert all(ds.focus(i) == "heart" for i in range(12, 18))
    assert all(it["organs"] == ["heart"] and it["text"].startswith("The heart is") for it in group)
    assert all(it["z0"] < 8 and it["z1"] > 4 for it in group)  # the heart is in z 4..8
    assert {it["text"] for it in group} == {"The heart is normal.", "The heart is enlarged."}
    # half-focused: each group is focused or not as a whole, the same at every call
    half = ChunkTextDataset(src, cfg(min_slices=8, max_slices=8, focus_fraction=0.5, focus_group=4))
    focus = [half.focus(i) for i in range(400)]
    assert all(len(set(focus[g:g + 4])) == 1 for g in range(0, 400, 4)) and focus == [half.focus(i) for i in range(400)]
    assert 0.3 < np.mean([f is not None for f in focus]) < 0.7
    assert ChunkTextDataset(src, cfg(min_slices=8, max_slices=8)).focus(0) is None  # off by default
    with pytest.raises(VoxseqError, match="focus_fraction"):
        cfg(focus_fraction=1.5)


def test_organ_centred_crops_hold_their_organ_or_its_lesion():
    src = organ_source(2)
    src.entries[1]["sentences"]["liver"] = "The liver shows a 1.0 cm lesion."
    src.entries[1]["boxes"] = [{"category": "liver", "bbox_zyx": [20, 0, 1, 24, 3, 4]}]  # inside the liver
    ds = ChunkTextDataset(src, cfg(min_slices=8, max_slices=8, crop_yx=[8, 8], crop_center="organ", text_mode="one"))
    items = [ds[i] for i in range(200)]
    assert {it["tokens"].shape[0] for it in items} == {8}  # 2 x 2 x 2 tokens: an 8^3 window
    assert np.mean([bool(it["organs"]) for it in items]) > 0.9
    texts = {it["text"] for it in items}
    assert {SENTENCES["lung"], SENTENCES["heart"], SENTENCES["liver"], "The liver shows a 1.0 cm lesion."} <= texts
    assert SENTENCES["spleen"] not in texts  # the volumes have no spleen voxels to centre on
    lesion_windows = 0
    for it in items:
        lo, hi = np.array([it["z0"], it["y0"], it["x0"]]), np.array([it["z1"], it["y0"] + 8, it["x0"] + 8])
        if it["text"] == "The liver shows a 1.0 cm lesion.":  # a lesion-bearing organ: the window holds the box
            assert (lo <= [20, 0, 1]).all() and (hi >= [24, 3, 4]).all(), (lo, hi)
            lesion_windows += 1
        elif it["text"] == SENTENCES["liver"]:  # centred near a voxel of the liver (z 14..30, y, x 0..4)
            assert lo[0] < 30 and hi[0] > 14 and lo[1] < 4 and lo[2] < 4
        if (lo >= 0).all() and (hi <= [32, 16, 16]).all():  # tokens come from the reported window
            assert it["tokens"][0, 0] == it["z0"] * 10000 + it["y0"] * 100 + it["x0"]
    assert lesion_windows >= 5
    assert [ds[i]["text"] for i in range(20)] == [it["text"] for it in items[:20]]  # a pure function of (seed, i)
    # without lesion centring a window's place does not depend on the lesion boxes: the same windows as for the
    # volumes without boxes, and the lesion sentence only on those that happen to hold >= half of the box
    no_boxes = copy.deepcopy(src)
    del no_boxes.entries[1]["boxes"]
    places = {}
    for centred in (True, False):
        kw = dict(min_slices=8, max_slices=8, crop_yx=[8, 8], crop_center="organ", text_mode="one", lesion_centred=centred)
        a, b = ChunkTextDataset(src, cfg(**kw)), ChunkTextDataset(no_boxes, cfg(**kw))
        pairs = [(a[i], b[i]) for i in range(200)]
        pairs = [(x, y) for x, y in pairs if x["organs"] and y["organs"]]  # no z redraw in either
        places[centred] = np.mean([(x["z0"], x["y0"], x["x0"]) == (y["z0"], y["y0"], y["x0"]) for x, y in pairs])
        for x, _ in pairs:
            if x["text"] == "The liver shows a 1.0 cm lesion.":
                assert lesion_in_window(src.entries[1]["boxes"], "liver", [x["z0"], x["y0"], x["x0"]], [8, 8, 8])
    assert places[False] == 1.0 and places[True] < 0.95
    with pytest.raises(VoxseqError, match="crop_center"):
        cfg(crop_center="organ")  # needs crop_yx
    with pytest.raises(VoxseqError, match="crop_center"):
        cfg(crop_yx=[8, 8], crop_center="middle")


def test_organ_jitter_places_the_organ_voxel_in_the_window():
    src = organ_source(2)
    for jitter in (0.0, 0.25, 0.5):
        ds = ChunkTextDataset(src, cfg(min_slices=8, max_slices=8, crop_yx=[8, 8], crop_center="organ",
                                       lesion_centred=False, organ_jitter=jitter))
        masks, mapping = ds._masks(1)
        # the organ voxel the window is placed around, seen through a generator that replays the draws
        at = []
        for i in range(300):
            rng, replay = np.random.default_rng(i), np.random.default_rng(i)
            z0, start_yx, name = ds._organ_window(rng, 1, masks, mapping, [8, 8, 8], "liver")
            assert name == "liver"
            point = ds._organ_points(1, masks, "liver", mapping["liver"])
            voxel = point[int(replay.integers(len(point)))]
            at.append(voxel - np.array([z0, *start_yx]))
        at = np.array(at)
        assert (at >= 0).all() and (at < 8).all()  # the voxel is inside the window at every jitter
        if jitter == 0.0:
            assert (at == 4).all()
        if jitter == 0.25:  # the placement of earlier versions: within k // 4 of the centre
            assert set(at.ravel()) == set(range(2, 7))
        if jitter == 0.5:  # anywhere in the window, every place about equally often
            counts = np.bincount(at.ravel(), minlength=8)
            assert len(counts) == 8 and counts.min() > 0.6 * counts.mean()
    with pytest.raises(VoxseqError, match="organ_jitter"):
        cfg(organ_jitter=0.6)


def test_sentence_key_agrees_with_the_loss():
    siglip = pytest.importorskip("voxseq.objectives.siglip")
    for text in ("The lungs are clear.", "  Normal HEART size. ", "Whole report."):
        assert siglip.sentence_key(text) == sentence_key(text)


def test_text_mode_all_pairs_each_chunk_with_its_organs_in_order():
    ds = ChunkTextDataset(organ_source(), cfg(max_slices=8))
    seen = set()
    for i in range(40):
        it = ds[i]
        expected = brute_force_organs(it["z0"], it["z1"])
        assert set(it["organs"]) == expected and expected
        ordered = [o for o in SENTENCES if o in expected]
        assert it["organs"] == ordered
        assert it["text"] == " ".join(SENTENCES[o] for o in ordered)
        assert it["sentence_keys"] == [sentence_key(SENTENCES[o]) for o in ordered]
        assert sorted(it["shown_keys"]) == sorted(it["sentence_keys"])
        seen.update(expected)
        assert "spleen" not in it["organs"]
    assert seen == {"lung", "heart", "liver"}


def test_max_sentences_keeps_the_organs_filling_most_of_the_chunk():
    ds = ChunkTextDataset(organ_source(), cfg(min_slices=16, max_slices=16, max_sentences=1))
    for i in range(10):
        it = ds[i]
        assert it["organs"] == ["lung"] and len(it["shown_keys"]) == len(brute_force_organs(it["z0"], it["z1"]))


def test_text_mode_one_draws_one_shown_sentence():
    ds = ChunkTextDataset(organ_source(), cfg(text_mode="one"))
    drawn = set()
    for i in range(40):
        it = ds[i]
        assert len(it["organs"]) == 1 and it["organs"][0] in brute_force_organs(it["z0"], it["z1"])
        assert it["text"] == SENTENCES[it["organs"][0]] and it["sentence_keys"] == [sentence_key(it["text"])]
        assert it["sentence_keys"][0] in it["shown_keys"]
        drawn.add(it["organs"][0])
    assert drawn == {"lung", "heart", "liver"}


def test_report_fallback_without_masks_and_volumes_without_text_skipped():
    entries = [{"id": "a", "text": "A whole report.", "sentences": {}}, {"id": "b", "text": "", "sentences": {}},
               {"id": "c", "text": "", "sentences": {"lung": "Clear lungs."}, "extra": {"kind": "ct"}}]
    ds = ChunkTextDataset(ArraySource([coord_volume()] * 3, entries), cfg())
    assert ds.volumes == [0, 2]  # b has no text; c has sentences but no label: report level
    texts = {ds[i]["volume_index"]: ds[i] for i in range(20)}
    assert texts[0]["text"] == "A whole report." and texts[0]["sentence_keys"] == [sentence_key("A whole report.")]
    assert texts[0]["organs"] == [] and texts[2]["text"] == "Clear lungs."
    with pytest.raises(VoxseqError, match="no volume has a text"):
        ChunkTextDataset(ArraySource([coord_volume()], entries[1:2]), cfg())


# ---------------------------------------------------------------------------- tokens, positions, determinism


def test_tokens_and_positions_come_from_the_chunk():
    ds = ChunkTextDataset(organ_source(), cfg())
    for i in range(5):
        it = ds[i]
        t = it["z1"] - it["z0"]
        assert 4 <= t <= 16 and t % P == 0 and it["grid"] == (t // P, 4, 4)
        assert it["tokens"].shape == (t // P * 16, P**3) and it["tokens"].dtype == torch.float32
        pos = it["pos"]
        assert pos.shape == (it["tokens"].shape[0], 3) and pos.dtype == torch.float32
        assert pos[0].tolist() == [0, 0, 0] and pos[:, 0].max() == t // P - 1  # z from the chunk's first slice
        assert pos[:, 1].max() == 3 and pos[:, 2].max() == 3
        corner = it["tokens"][:, 0].long()  # first voxel of each token = its corner in the volume
        z, y, x = corner // 10000, corner // 100 % 100, corner % 100
        assert torch.equal(z, it["z0"] + P * pos[:, 0].long())
        assert torch.equal(y, P * pos[:, 1].long()) and torch.equal(x, P * pos[:, 2].long())


def test_inplane_padding_and_crop():
    vol = coord_volume((8, 18, 10))
    ds = ChunkTextDataset(ArraySource([vol], [{"id": "a", "text": "r"}]), cfg(max_slices=8, pad_value=-5.0))
    it = ds[0]
    assert it["grid"][1:] == (5, 3)  # 18 -> 20 and 10 -> 12, centred
    assert (it["tokens"] == -5).any() and it["tokens"].max() == vol.max()
    crop = ChunkTextDataset(ArraySource([vol], [{"id": "a", "text": "r"}]), cfg(max_slices=8, crop_yx=[8, 8]))
    assert all(crop[i]["grid"][1:] == (2, 2) for i in range(3)) and not (crop[0]["tokens"] == -5).any()


def test_items_are_pure_functions_of_seed_and_index():
    a, b = ChunkTextDataset(organ_source(), cfg()), ChunkTextDataset(organ_source(), cfg())
    for i in (0, 7, 123):
        x, y = a[i], b[i]
        assert torch.equal(x["tokens"], y["tokens"]) and x["text"] == y["text"] and x["z0"] == y["z0"]
    assert any(a[i]["z0"] != ChunkTextDataset(organ_source(), cfg(seed=1))[i]["z0"] for i in range(5))


def test_batches_do_not_depend_on_workers():
    ds = ChunkTextDataset(organ_source(), cfg())
    collate = functools.partial(collate_packed, max_tokens=256)

    def batches(workers: int):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=ChunkBatchSampler(6, start_step=2, num_steps=3),
                                             collate_fn=collate, num_workers=workers)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    for s, p, step in zip(serial, parallel, range(2, 5)):
        assert torch.equal(s["tokens"], p["tokens"]) and torch.equal(s["segment"], p["segment"]) and s["text"] == p["text"]
        direct = chunk_batches(ds, step, 6, 256)  # resuming at a step gives that step's batch
        assert torch.equal(direct["tokens"], s["tokens"]) and direct["z0"].tolist() == s["z0"].tolist()
    ranks = [next(iter(ChunkBatchSampler(4, start_step=3, world_size=2, rank=r))) for r in (0, 1)]
    assert ranks == [[24, 25, 26, 27], [28, 29, 30, 31]]


def test_volume_chunks_cover_a_volume_of_any_size():
    vol = coord_volume((13, 10, 9))
    whole = volume_chunks(vol, P)
    assert len(whole) == 1 and whole[0]["grid"] == (4, 3, 3) and whole[0]["tokens"].shape == (36, P**3)
    parts = volume_chunks(vol, P, chunk_slices=8)
    assert [(c["z0"], c["z1"], c["grid"]) for c in parts] == [(0, 8, (2, 3, 3)), (8, 16, (2, 3, 3))]
    assert parts[1]["pos"][:, 0].tolist() == [0] * 9 + [1] * 9  # z from each chunk's start
    # centred in-plane padding: y 10 -> 12 and x 9 -> 12 start at -1, so the first token's voxel (0, 1, 1)
    # (index 1*4 + 1 in (pz, py, px) order) is volume voxel (8, 0, 0), and its corner is padding
    first = parts[1]["tokens"][0]
    assert first[5] == 8 * 10000 and first[0] == 0
    with pytest.raises(VoxseqError, match="multiple of the patch"):
        volume_chunks(vol, P, chunk_slices=6)


def test_volume_chunks_tile_in_plane_like_training_crops():
    vol = coord_volume((13, 10, 9))
    tiles = volume_chunks(vol, P, chunk_slices=8, tile_yx=[8, 8])
    # y: 10 voxels -> windows at 0 and 2; x: 9 -> 0 and 1 (the last window ends at the edge); two slabs
    assert [(c["z0"], c["y0"], c["x0"]) for c in tiles] == [(z, y, x) for z in (0, 8) for y in (0, 2) for x in (0, 1)]
    assert all(c["grid"] == (2, 2, 2) and c["tokens"].shape == (8, P**3) for c in tiles)
    for c in tiles:  # the first voxel of each tile's first token is the volume's voxel at the tile's corner
        assert c["tokens"][0, 0] == c["z0"] * 10000 + c["y0"] * 100 + c["x0"]
    covered = np.zeros((10, 9), bool)
    for c in tiles[:4]:
        covered[c["y0"]:c["y0"] + 8, c["x0"]:c["x0"] + 8] = True
    assert covered.all()
    big = volume_chunks(vol, P, tile_yx=[12, 12])  # a tile larger than the slice: one centred window
    assert len(big) == 1 and (big[0]["y0"], big[0]["x0"]) == (-1, -1)
    with pytest.raises(VoxseqError, match="tile_yx"):
        volume_chunks(vol, P, tile_yx=[6, 8])


# ---------------------------------------------------------------------------- packing


def fake_items(lengths, dim=2):
    return [{"tokens": torch.full((n, dim), float(i)), "pos": torch.arange(n * 3.0).reshape(n, 3), "text": f"t{i}",
             "sentence_keys": [i], "organs": [], "volume_index": i, "z0": 0, "z1": 4} for i, n in enumerate(lengths)]


def test_pack_lengths_first_fit_decreasing():
    lengths = [5, 3, 7, 2, 4, 12]
    rows = pack_lengths(lengths, 10)
    # 12 > max_tokens gets a row of its own; the rest take 3 rows, rebalanced to 7 tokens each
    assert rows == [[5], [2], [0, 3], [4, 1]]
    # plain FFD would fill one row to 16 and leave a second at 5 (34% padding); balanced rows: 11 and 10
    assert pack_lengths([5, 5, 5, 5, 1], 16) == [[0, 1, 4], [2, 3]]
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 300, size=200).tolist()
    rows = pack_lengths(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(200))  # every item placed once
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    assert len(rows) <= int(np.ceil(sum(lengths) / 512 * 1.1)) + 1


def test_collate_packed_places_every_item_once():
    lengths = [5, 3, 7, 2, 4]
    b = collate_packed(fake_items(lengths), max_tokens=10)
    seg = b["segment"]
    assert b["tokens"].shape[:2] == seg.shape and seg.shape == (3, 7)  # rows 7+0, 5+2, 4+3: Lmax 7, not 10
    assert [int((seg == i).sum()) for i in range(5)] == lengths and b["lengths"].tolist() == lengths
    for i in range(5):  # each item's tokens, in order, where its segment says
        assert torch.equal(b["tokens"][seg == i], torch.full((lengths[i], 2), float(i)))
        assert torch.equal(b["pos"][seg == i], torch.arange(lengths[i] * 3.0).reshape(-1, 3))
    assert b["text"] == [f"t{i}" for i in range(5)] and b["sentence_keys"] == [[i] for i in range(5)]
    assert padding_waste(seg) == 0
    assert padding_waste(torch.tensor([[0, 0, 1, -1], [2, -1, -1, -1]])) == 0.5
    short = collate_packed(fake_items([3, 2]), max_tokens=100)
    assert short["segment"].shape == (1, 5) and padding_waste(short["segment"]) == 0  # Lmax is not max_tokens


def test_packed_attention_mask_is_block_diagonal_and_safe_for_padding():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, -1, -1, -1]])
    m = packed_attention_mask(seg)
    assert m.shape == (2, 1, 6, 6) and m.dtype == torch.bool
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    assert torch.equal(m[:, 0] & (seg[:, :, None] >= 0), same)  # no True across chunks
    assert m[0, 0, :2, 2:].sum() == 0 and m[0, 0, 2:5, 2:5].all() and m[0, 0, 0, 5] == 0
    pad = seg < 0
    assert torch.equal(m[:, 0][pad].sum(-1), torch.ones(int(pad.sum()), dtype=torch.long))  # padding: itself only
    assert m[:, 0].any(-1).all()
    q = torch.randn(2, 1, 6, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=m)
    assert torch.isfinite(out).all()
    ref = torch.nn.functional.scaled_dot_product_attention(q[:1, :, :2], q[:1, :, :2], q[:1, :, :2])
    assert torch.allclose(out[:1, :, :2], ref, atol=1e-6)  # a packed chunk sees only itself


def test_segment_mean_equals_per_item_means():
    lengths = [5, 3, 7, 2, 4]
    b = collate_packed(fake_items(lengths), max_tokens=10)
    feats = torch.randn(*b["segment"].shape, 8)
    feats[b["segment"] < 0] = 1e6  # padding must not leak in
    pooled = segment_mean(feats, b["segment"], 5)
    ref = torch.stack([feats[b["segment"] == i].mean(0) for i in range(5)])
    assert pooled.shape == (5, 8) and torch.allclose(pooled, ref, atol=1e-5)


def test_padding_waste_on_a_realistic_mix_is_at_most_ten_percent():
    rng = np.random.default_rng(0)
    wastes = []
    for trial in range(20):
        slabs = rng.integers(1, 9, size=32)  # 1-8 slabs of 8x8 tokens: 64..512 tokens
        b = collate_packed(fake_items((slabs * 64).tolist(), dim=1), max_tokens=1024)
        wastes.append(padding_waste(b["segment"]))
        assert b["tokens"].shape[1] <= 1024 and wastes[-1] <= 0.10, (trial, wastes[-1])
        assert set(b["segment"].unique().tolist()) - {-1} == set(range(32))
    assert np.mean(wastes) < 0.05  # measured: 0.026 mean, 0.080 worst over 500 such batches


def test_config_validation():
    with pytest.raises(VoxseqError, match="multiples of patch_size"):
        ChunkConfig(patch_size=16, min_slices=24)
    with pytest.raises(VoxseqError, match="crop_yx"):
        ChunkConfig(crop_yx=[100, 128])
    with pytest.raises(VoxseqError, match="text_mode"):
        ChunkConfig(text_mode="some")
    with pytest.raises(VoxseqError, match="organ_fraction"):
        ChunkConfig(organ_fraction=0)


# ---------------------------------------------------------------------------- on a real phantom cache


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    from voxseq.data.cache import Cache, prepare_cache
    from voxseq.data.manifest import read_manifest
    from voxseq.data.phantoms import write_phantoms
    from voxseq.data.preprocess import Preprocess

    tmp = tmp_path_factory.mktemp("phantoms")
    manifest = write_phantoms(tmp / "raw", n_ct=2, n_mri=0, size_xy=64, max_slices=48, progress=False)
    prepare_cache(read_manifest(manifest), tmp / "cache", Preprocess(intensity="window", window="ct",
                                                                      out_range=[-1.0, 1.0]), progress=False)
    return Cache(tmp / "cache")


def test_phantom_chunks_pair_with_the_organs_they_show(phantom_cache):
    from voxseq.data.phantoms import SENTENCE_ORGANS

    ds = ChunkTextDataset(phantom_cache, ChunkConfig(patch_size=16, min_slices=16, max_slices=32, pad_value=-1.0))
    liver_chunks = 0
    for i in range(24):
        it = ds[i]
        v, z0, z1 = it["volume_index"], it["z0"], it["z1"]
        entry, label = phantom_cache.entry(v), np.asarray(phantom_cache.label(v))
        assert it["tokens"].shape[1] == 16**3 and it["grid"][1:] == (4, 4) and it["organs"]
        slab = label[max(0, z0):z1]
        for organ in it["organs"]:
            ids = list(SENTENCE_ORGANS[organ])
            inside, total = np.isin(slab, ids).sum(), np.isin(label, ids).sum()
            assert inside >= 0.3 * total or inside >= 0.05 * slab.size
            assert entry["sentences"][organ] in it["text"]
        liver_share = np.isin(slab, [5]).sum() / max(1, np.isin(label, [5]).sum())
        if liver_share > 0.5:  # a slab holding most of the liver has the liver sentence
            liver_chunks += 1
            assert "liver" in it["organs"] and entry["sentences"]["liver"] in it["text"]
        if not np.isin(slab, [5]).any():
            assert "liver" not in it["organs"]
    assert liver_chunks > 0
    assert len(ds._counts) == 2  # label voxel counts: once per volume


def test_organ_points_from_region_bits_are_the_voxels_with_any_of_its_bits():
    bits = np.random.default_rng(0).integers(0, 2**5, (4, 5, 6)).astype(np.uint32)
    ds = ChunkTextDataset(organ_source(1), cfg(crop_yx=[8, 8], crop_center="organ"))
    expected = {tuple(p) for p in np.argwhere(((bits >> 1) & 1) | ((bits >> 3) & 1))}
    assert {tuple(p) for p in ds._organ_points(0, bits, "region", [1, 3])} == expected
    labels = organ_labels()
    lung = {tuple(p) for p in np.argwhere(np.isin(labels, [2, 3]))}  # 4096 voxels: all kept
    assert {tuple(p) for p in ds._organ_points(0, labels, "lung", [2, 3])} == lung
