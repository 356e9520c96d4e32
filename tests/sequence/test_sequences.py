"""Sequence engine: patchify, spatial/contrast/semantic sequences, token order, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxseq import VoxseqError
from voxseq.sequence import (
    ArraySource,
    AugmentConfig,
    ResumableSampler,
    SequenceConfig,
    SequenceDataset,
    collate_sequences,
    patchify,
    patchify_np,
    unpatchify,
)

NO_AUG = AugmentConfig(intensity_prob=0.0)


def small_cfg(**kw) -> SequenceConfig:
    base = dict(patch_size=4, crop_zyx=[16, 16, 16], subvolume_zyx=[4, 8, 8], n_subvolumes=4, stride=2, augment=NO_AUG)
    base.update(kw)
    return SequenceConfig(**base)


def coord_volume(shape=(20, 24, 28)) -> np.ndarray:
    """Voxel value encodes its position, so every token says where it came from."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (z * 10000 + y * 100 + x).astype(np.float32)[None]


def decode(tok: torch.Tensor) -> tuple[int, int, int]:
    v = int(tok[0])  # first voxel of the patch = its corner
    return v // 10000, (v // 100) % 100, v % 100


@pytest.mark.parametrize("p,shape", [(2, (4, 6, 8)), (4, (8, 8, 12)), (16, (32, 32, 32))])
def test_patchify_round_trip(p, shape):
    x = torch.randn(2, 3, *shape)
    t = patchify(x, p)
    assert t.shape == (2, np.prod(shape) // p**3, 3 * p**3)
    assert torch.equal(unpatchify(t, p, tuple(s // p for s in shape), 3), x)
    # token k holds the patch at its z-major grid position, voxels in (C, pz, py, px) order
    gw = shape[2] // p
    k = gw + 1  # grid (0, 1, 1)
    assert torch.equal(t[0, k].reshape(3, p, p, p), x[0, :, :p, p:2 * p, p:2 * p])
    a = x[0, 0].numpy()
    assert np.array_equal(patchify_np(a, p), t[0, :, : p**3].numpy())
    with pytest.raises(ValueError, match="multiple of the patch"):
        patchify(torch.zeros(1, 1, 5, 4, 4), 4)


def test_spatial_positions_and_stride():
    cfg = small_cfg()
    ds = SequenceDataset(ArraySource([coord_volume()]), cfg)
    item = ds[3]
    L = 4 * (1 * 2 * 2)
    assert item["tokens"].shape == (L, 64) and item["pos"].shape == (L, 4)
    corners = [decode(t) for t in item["tokens"]]
    z0, y0, x0 = corners[0]
    for i, (tok_corner, pos) in enumerate(zip(corners, item["pos"])):
        sub, pz, py, px = pos.tolist()
        assert sub == i // 4
        # z position includes the slab offset: stride 2 voxels = 0.5 patch
        assert pz == pytest.approx(sub * 2 / 4 + 0)
        assert tok_corner == (z0 + int(round(pz * 4)), y0 + int(py) * 4, x0 + int(px) * 4)
    assert item["valid"].all() and item["kind"] == 0


def test_paper_setting_is_512_tokens():
    cfg = SequenceConfig()
    assert cfg.seq_len("spatial") == 512 and cfg.tokens_per_subvolume == 128
    vol = np.random.default_rng(0).random((1, 130, 140, 150), dtype=np.float32).astype(np.float16)
    item = SequenceDataset(ArraySource([vol]), cfg)[0]
    assert item["tokens"].shape == (512, 4096)
    assert sorted(set(item["pos"][:, 1].tolist()))[:4] == [0.0, 0.5, 1.0, 1.5]  # slabs at z + 0, 8, 16, 24


def test_small_volume_is_padded_and_marked():
    vol = coord_volume((3, 6, 6)) + 1  # smaller than the crop in every axis
    ds = SequenceDataset(ArraySource([vol]), small_cfg(pad_value=0.0))
    item = ds[0]
    assert item["tokens"].shape == (16, 64)
    assert not item["valid"].all() and item["valid"].any()
    # padded tokens are all pad value; valid tokens hold some real voxel
    for tok, ok in zip(item["tokens"], item["valid"]):
        assert (tok.abs().sum() > 0) == bool(ok)


def test_interleaved_order_is_a_permutation():
    src = ArraySource([coord_volume()])
    a = SequenceDataset(src, small_cfg(token_order="subvolume"))[5]
    b = SequenceDataset(src, small_cfg(token_order="interleave"))[5]
    n, k = 4, 4
    assert torch.equal(b["tokens"].reshape(k, n, -1).transpose(0, 1).reshape(n * k, -1), a["tokens"])
    assert torch.equal(b["pos"][:n, 0], torch.arange(n, dtype=torch.float32))  # same place, sub-volume after sub-volume
    # unpatchify of one sub-volume of the subvolume order gives back the slab
    slab = unpatchify(a["tokens"][None, :4], 4, (1, 2, 2))[0, 0]
    z, y, x = decode(a["tokens"][0])
    assert torch.equal(slab, torch.from_numpy(coord_volume()[0, z:z + 4, y:y + 8, x:x + 8]))


def test_contrast_same_coordinates_across_modalities():
    base = coord_volume()[0]
    vol = np.stack([base + c * 1_000_000 for c in range(4)])  # 4 co-registered contrasts
    ds = SequenceDataset(ArraySource([vol]), small_cfg(kind_weights={"contrast": 1.0}, n_contrast=4))
    item = ds[2]
    t = item["tokens"].reshape(4, 4, 64)
    assert torch.equal(t[1] - t[0], torch.full_like(t[0], 1_000_000))  # same voxels, another contrast
    assert torch.equal(t[3] - t[0], torch.full_like(t[0], 3_000_000))
    assert item["kind"] == 1 and torch.equal(item["pos"][:4, 1:], item["pos"][4:8, 1:])
    assert not torch.equal(item["pos"][:4, 0], item["pos"][4:8, 0])


def test_semantic_one_category_from_different_volumes():
    vols, entries = [], []
    for i in range(4):
        v = np.zeros((1, 16, 16, 16), np.float32)
        v[0, 6:10, 6:10, 6:10] = 1 + i  # liver lesion, value = study id
        v[0, 1:3, 1:3, 1:3] = 100 + i  # bone lesion
        vols.append(v)
        entries.append({"id": str(i), "boxes": [{"category": "liver", "bbox_zyx": [6, 6, 6, 10, 10, 10]},
                                                {"category": "bone", "bbox_zyx": [1, 1, 1, 3, 3, 3]}]})
    cfg = small_cfg(kind_weights={"semantic": 1.0}, n_semantic=4, subvolume_zyx=[4, 4, 4])
    ds = SequenceDataset(ArraySource(vols, entries), cfg)
    for idx in range(6):
        item = ds[idx]
        t = item["tokens"].reshape(4, -1)
        centre = t.reshape(4, 4, 4, 4)[:, 2, 2, 2]  # lesion-centred crops: the centre voxel is lesion
        studies = centre % 100
        assert len(set(studies.tolist())) == 4  # four different studies
        assert (centre >= 100).all() or (centre < 100).all()  # one category per sequence
        assert item["kind"] == 2


def test_tokens_carry_every_channel_of_their_place():
    base = coord_volume()[0]
    vol = np.stack([base, base + 1_000_000])  # two windows of one CT: same place, another value
    cfg = small_cfg(kind_weights={"spatial": 1.0})
    one = SequenceDataset(ArraySource([vol[:1]]), cfg)[3]
    two = SequenceDataset(ArraySource([vol]), cfg, channels=2)[3]
    assert two["tokens"].shape == (16, 2 * 64)
    assert torch.equal(two["tokens"][:, :64], one["tokens"])  # channel 0 first, as patchify orders (C, pz, py, px)
    assert torch.equal(two["tokens"][:, 64:] - two["tokens"][:, :64], torch.full((16, 64), 1_000_000.0))
    assert torch.equal(two["pos"], one["pos"]) and torch.equal(two["valid"], one["valid"])
    # a whole sub-volume of tokens is patchify of its two-channel slab
    z, y, x = decode(two["tokens"][0])
    slab = torch.from_numpy(vol[None, :, z:z + 4, y:y + 8, x:x + 8])
    assert torch.equal(patchify(slab, 4)[0], two["tokens"][:4])


def test_semantic_sequences_with_several_channels():
    vols, entries = [], []
    for i in range(3):
        v = np.zeros((2, 16, 16, 16), np.float32)
        v[:, 6:10, 6:10, 6:10] = 1 + i
        v[1] += 50  # the second window
        vols.append(v)
        entries.append({"id": str(i), "boxes": [{"category": "liver", "bbox_zyx": [6, 6, 6, 10, 10, 10]}]})
    cfg = small_cfg(kind_weights={"semantic": 1.0}, n_semantic=3, subvolume_zyx=[4, 4, 4])
    item = SequenceDataset(ArraySource(vols, entries), cfg, channels=2)[0]
    t = item["tokens"].reshape(3, 2, 4, 4, 4)  # 3 lesions, one token each, (C, p, p, p)
    assert sorted(t[:, 0, 2, 2, 2].tolist()) == [1.0, 2.0, 3.0]  # three studies, channel 0
    assert torch.equal(t[:, 1], t[:, 0] + 50)  # each crop's own second channel


def test_channel_count_errors():
    base = coord_volume()
    with pytest.raises(VoxseqError, match="fewer"):
        SequenceDataset(ArraySource([base]), small_cfg(), channels=2)
    vol = np.concatenate([base] * 4)
    with pytest.raises(VoxseqError, match="kind_weights.contrast"):
        SequenceDataset(ArraySource([vol]), small_cfg(kind_weights={"contrast": 1.0}), channels=2)


def test_impossible_kinds_are_clear_errors():
    src = ArraySource([coord_volume()])
    with pytest.raises(VoxseqError, match="channels"):
        SequenceDataset(src, small_cfg(kind_weights={"contrast": 1.0}))
    with pytest.raises(VoxseqError, match="two or more volumes"):
        SequenceDataset(src, small_cfg(kind_weights={"semantic": 1.0}))
    with pytest.raises(VoxseqError, match="span"):
        small_cfg(n_subvolumes=8, stride=4)


def test_augmentation_is_consistent_across_subvolumes():
    vol = coord_volume()
    aug = AugmentConfig(flip_prob=[0.0, 0.0, 1.0], intensity_prob=0.0)
    plain = SequenceDataset(ArraySource([vol]), small_cfg())[7]
    flipped = SequenceDataset(ArraySource([vol]), small_cfg(augment=aug))[7]
    a = unpatchify(plain["tokens"].reshape(4, 4, 64), 4, (1, 2, 2))
    b = unpatchify(flipped["tokens"].reshape(4, 4, 64), 4, (1, 2, 2))
    # same crop (same rng draws), every slab flipped along x the same way
    assert torch.equal(b, torch.flip(a, dims=[-1]))
    rot = SequenceDataset(ArraySource([vol]), small_cfg(augment=AugmentConfig(rot90_prob=1.0, intensity_prob=0.0)))[7]
    r = unpatchify(rot["tokens"].reshape(4, 4, 64), 4, (1, 2, 2))
    assert any(torch.equal(r, torch.rot90(a, k, dims=(-2, -1))) for k in (1, 2, 3))


def test_deterministic_with_workers_and_resumable():
    vol = np.random.default_rng(0).random((1, 24, 24, 24), dtype=np.float32)
    ds = SequenceDataset(ArraySource([vol]), small_cfg(augment=AugmentConfig(flip_prob=[0.5, 0.5, 0.5])))

    def batches(workers, start):
        dl = torch.utils.data.DataLoader(ds, batch_size=3, sampler=ResumableSampler(start, num=9), num_workers=workers,
                                         collate_fn=collate_sequences)
        return [b["tokens"] for b in dl]

    serial, parallel = batches(0, 0), batches(2, 0)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))
    resumed = batches(0, 3)  # resume after one batch of 3
    assert torch.equal(resumed[0], serial[1]) and torch.equal(resumed[1], serial[2])
    # two DDP ranks split the global stream without overlap
    r0 = list(iter(ResumableSampler(0, num=3, world_size=2, rank=0)))
    r1 = list(iter(ResumableSampler(0, num=3, world_size=2, rank=1)))
    assert r0 == [0, 2, 4] and r1 == [1, 3, 5]


def test_reads_from_a_real_cache(tmp_path, samples):
    from voxseq.data.cache import Cache, prepare_cache
    from voxseq.data.manifest import Record
    from voxseq.data.preprocess import Preprocess

    recs = [Record(id="lung1", images={"image": str(samples / "lung1_image.nrrd")})]
    prepare_cache(recs, tmp_path / "c", Preprocess(intensity="window", window="lung"), progress=False)
    ds = SequenceDataset(Cache(tmp_path / "c"), SequenceConfig(patch_size=16, crop_zyx=[48, 128, 128],
                                                                subvolume_zyx=[16, 64, 64], stride=8, n_subvolumes=4,
                                                                augment=NO_AUG))
    item = ds[0]
    assert item["tokens"].shape == (4 * 16, 4096)
    assert 0 <= float(item["tokens"].min()) and float(item["tokens"].max()) <= 1  # lung window -> [0, 1]
    assert float(item["tokens"].std()) > 0.05


@pytest.mark.parametrize("kind", ["spatial", "contrast", "semantic"])
def test_volume_positions_count_from_the_scan(kind):
    """pos_origin="volume": every token's (z, y, x) position is where its patch sits in its volume (patch
    units), for each kind of sequence; the default counts from the crop and differs by the crop's start."""
    vols = [np.repeat(coord_volume(), 4, axis=0) for _ in range(2)]
    entries = [{"id": str(i), "boxes": [{"category": "liver", "bbox_zyx": [6, 8, 10, 10, 12, 14]}]} for i in range(2)]
    cfg = small_cfg(kind_weights={kind: 1.0}, n_contrast=4, n_semantic=2)
    volume = SequenceDataset(ArraySource(vols, entries), cfg, pos_origin="volume")
    crop = SequenceDataset(ArraySource(vols, entries), cfg)
    for index in range(4):
        item, plain = volume[index], crop[index]
        assert torch.equal(item["tokens"], plain["tokens"])
        where = torch.tensor([decode(t) for t in item["tokens"]], dtype=torch.float32) / 4  # patch corner / p
        assert torch.allclose(item["pos"][:, 1:], where)
        shift = item["pos"][:, 1:] - plain["pos"][:, 1:]  # one crop start per sub-volume
        assert torch.allclose(shift, shift[:1].expand_as(shift)) or kind == "semantic"
    with pytest.raises(VoxseqError, match="pos_origin"):
        SequenceDataset(ArraySource(vols, entries), cfg, pos_origin="scanner")
