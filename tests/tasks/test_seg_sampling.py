"""Segmentation crop sampling: class-balanced centres give small organs their share of the crops."""

from __future__ import annotations

import numpy as np
import pytest

from voxseq import VoxseqError
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
        _, y = sample_crop(cache, 0, roi, rng, pos_fraction=1.0, sampling=sampling)
        out.append(y.max())  # the highest class in the crop: 2 when the small organ is in it
    return np.array(out)


def test_class_balanced_crops_reach_the_small_class():
    fg, balanced = centre_classes("foreground"), centre_classes("class_balanced")
    assert (fg == 2).mean() < 0.1  # drawn among all labelled voxels, the small organ is rarely in a crop
    assert 0.4 < (balanced == 2).mean() < 0.75  # one class in two first, then its voxels (8^3 crops jitter)
    with pytest.raises(VoxseqError, match="crop_sampling"):
        SegConfig(crop_sampling="uniform")
