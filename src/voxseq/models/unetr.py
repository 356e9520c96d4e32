"""UNETR segmentation on the voxseq ViT encoder, built from MONAI's UNETR blocks.

For a patch size p = 2^n the decoder has n upsampling stages: the final encoder features and n-1
intermediate blocks (``skip_indices``; the paper's 3, 6, 9 for a 12-block ViT-B with p = 16) are
projected back to 1/2^k resolution and merged with a convolutional stem on the raw image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from voxseq import VoxseqError
from voxseq.models.vit3d import ViT3D, ViTConfig


def default_skips(depth: int, patch_size: int) -> list[int]:
    """Evenly spaced skip blocks: depth 12, p 16 -> [3, 6, 9] (the paper's); depth 6, p 8 -> [2, 4]."""
    n = int(round(math.log2(patch_size)))
    return [depth * i // n for i in range(1, n)]


@dataclass
class UNETRConfig:
    out_channels: int = 2
    feature_size: int = 16
    skip_indices: list[int] = field(default_factory=list)  # empty: default_skips(depth, patch)
    norm_name: str = "instance"
    res_block: bool = True


class UNETR3D(nn.Module):
    """(B, C, D, H, W) -> logits (B, out_channels, D, H, W); D, H, W multiples of the patch size."""

    def __init__(self, vit: ViTConfig, cfg: UNETRConfig):
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

        p = vit.patch_size
        n = int(round(math.log2(p)))
        if 2**n != p or n < 1:
            raise VoxseqError(f"UNETR needs a power-of-two patch size, not {p}")
        skips = list(cfg.skip_indices) or default_skips(vit.depth, p)
        if len(skips) != n - 1:
            raise VoxseqError(f"patch size {p} needs {n - 1} skip blocks, got {skips}")
        self.encoder = ViT3D(vit)
        self.skips = skips
        self.cfg = cfg
        fs, e, norm = cfg.feature_size, vit.embed_dim, cfg.norm_name
        self.stem = UnetrBasicBlock(3, vit.in_chans, fs, 3, 1, norm, res_block=cfg.res_block)
        # skip k (0-based) sits at 1/2^(k+1) resolution: project tokens up by 2^(n-1-k)
        self.skip_blocks = nn.ModuleList([
            UnetrPrUpBlock(3, e, fs * 2 ** (k + 1), num_layer=n - 2 - k, kernel_size=3, stride=1, upsample_kernel_size=2,
                           norm_name=norm, conv_block=True, res_block=cfg.res_block)
            for k in range(n - 1)])
        # decoder: from 1/p up to full resolution, merging skips from coarse to fine, then the stem
        chans = [fs * 2**k for k in range(n)]  # channels at 1/2^k for k = 0..n-1
        self.up_blocks = nn.ModuleList()
        in_ch = e
        for k in reversed(range(n)):
            self.up_blocks.append(UnetrUpBlock(3, in_ch, chans[k], 3, 2, norm, res_block=cfg.res_block))
            in_ch = chans[k]
        self.out = UnetOutBlock(3, fs, cfg.out_channels)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def _grid(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        b, _, e = tokens.shape
        return tokens.transpose(1, 2).reshape(b, e, *grid)  # (B, L, E) -> (B, E, gd, gh, gw)

    def forward(self, x: torch.Tensor, origin_zyx=None) -> torch.Tensor:
        """``origin_zyx`` (B, 3): where each crop starts in its scan, in voxels (for encoders with
        ``pos_origin="volume"``; ignored otherwise)."""
        p = self.encoder.cfg.patch_size
        grid = tuple(s // p for s in x.shape[2:])
        inter, final = self.encoder.forward_intermediates(x, self.skips, origin_zyx=origin_zyx)
        feats = [self.stem(x)] + [blk(self._grid(t, grid)) for blk, t in zip(self.skip_blocks, inter)]  # fine -> coarse
        h = self._grid(final, grid)  # (B, E, D/p, H/p, W/p)
        for up, skip in zip(self.up_blocks, reversed(feats)):
            h = up(h, skip)
        return self.out(h)
