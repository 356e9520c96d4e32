"""Segmentation crop sampling (class-balanced centres give small organs their share of the crops; crop starts)
and sliding-window inference that tells an encoder with volume positions where each window sits."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from voxseq import VoxseqError
from voxseq.eval.segmentation import sliding_predict
from voxseq.tasks.finetune_seg import SegConfig, sample_crop


class OneVolume:
    def __init__(self, label: np.ndarray):
        self.lab, self.img, self.meta = label, label[None].astype(np.float32), {}

    def image(self, i):
        return self.img

    def label(self, i):
        return self.lab

    def entry(self, i):
        return self.meta


def centre_classes(sampling: str, n: int = 400) -> np.ndarray:
    lab = np.zeros((40, 40, 40), np.uint8)
    lab[:, :, :30] = 1  # a large organ: 75% of the volume
    lab[18:22, 18:22, 34:38] = 2  # a small one: 64 voxels
    cache, rng = OneVolume(lab), np.random.default_rng(0)
    roi = (8, 8, 8)
    out = []
    for _ in range(n):
        _, y, _ = sample_crop(cache, 0, roi, rng, pos_fraction=1.0, sampling=sampling)
        out.append(y.max())  # the highest class in the crop: 2 when the small organ is in it
    return np.array(out)


def test_class_balanced_crops_reach_the_small_class():
    fg, balanced = centre_classes("foreground"), centre_classes("class_balanced")
    assert (fg == 2).mean() < 0.1  # drawn among all labelled voxels, the small organ is rarely in a crop
    assert 0.4 < (balanced == 2).mean() < 0.75  # one class in two first, then its voxels (8^3 crops jitter)
    with pytest.raises(VoxseqError, match="crop_sampling"):
        SegConfig(crop_sampling="uniform")


def test_crop_start_places_the_crop():
    """The crop is the volume read from the start it reports (padded where it leaves the volume)."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in (30, 20, 10)], indexing="ij")
    cache, rng = OneVolume((z * 400 + y * 20 + x).astype(np.int64)), np.random.default_rng(0)
    starts = set()
    for _ in range(20):
        img, lab, start = sample_crop(cache, 0, (16, 16, 16), rng, pos_fraction=0.5)
        idx = np.meshgrid(*[s + np.arange(16) for s in start], indexing="ij")
        inside = np.all([(i >= 0) & (i < n) for i, n in zip(idx, (30, 20, 10))], axis=0)
        want = np.where(inside, idx[0] * 400 + idx[1] * 20 + idx[2], 0)
        assert np.array_equal(lab, want) and np.array_equal(img[0], want.astype(np.float32))
        starts.add(tuple(start))
    assert len(starts) > 5 and any(s[2] < 0 for s in starts)  # random places, padded across the thin x axis


class VolumeProbe(torch.nn.Module):
    """Stands in for a UNETR whose encoder counts positions from the scan: class 1 where (z >= 10) xor
    (x >= 3) in the *volume's* coordinates, which it can only know from each window's start."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.encoder = SimpleNamespace(cfg=SimpleNamespace(pos_origin="volume"))

    def forward(self, x, origin_zyx=None):
        b, _, d, h, w = x.shape
        zz = origin_zyx[:, 0, None, None, None] + torch.arange(d)[None, :, None, None]
        xx = origin_zyx[:, 2, None, None, None] + torch.arange(w)[None, None, None, :]
        one = ((zz >= 10) ^ (xx >= 3)).expand(b, d, h, w).float() * 2 - 1
        return torch.stack([torch.zeros_like(one), one], 1) + self.w


def test_sliding_predict_gives_windows_their_place():
    """MONAI windows (and the padding of a volume thinner than the ROI) reach the model as volume starts."""
    image = np.zeros((1, 21, 6, 5), np.float32)  # y and x thinner than the ROI: MONAI pads them
    pred = sliding_predict(VolumeProbe(), image, (8, 8, 8), overlap=0.25)
    z, _, x = np.meshgrid(*[np.arange(n) for n in (21, 6, 5)], indexing="ij")
    assert np.array_equal(pred, ((z >= 10) ^ (x >= 3)).astype(np.uint8))
