"""Patches <-> images: ``patchify`` / ``unpatchify`` (MAE naming), for torch tensors and numpy arrays.

Token order is z-major: token ``k`` of a (D, H, W) grid of patches sits at
``(k // (gh * gw), (k // gw) % gh, k % gw)``; each token holds its C*p^3 voxels in (C, pz, py, px) order,
so that a Conv3d patch embedding with kernel = stride = p equals a linear map on the token.
"""

from __future__ import annotations

import numpy as np
import torch


def _check(shape_dhw, p: int) -> tuple[int, int, int]:
    if any(s % p for s in shape_dhw):
        raise ValueError(f"spatial size {tuple(shape_dhw)} is not a multiple of the patch size {p}")
    return tuple(s // p for s in shape_dhw)  # type: ignore[return-value]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, L, C*p^3) with L = (D/p)(H/p)(W/p)."""
    b, c, d, h, w = x.shape
    gd, gh, gw = _check((d, h, w), p)
    x = x.reshape(b, c, gd, p, gh, p, gw, p)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, gd, gh, gw, C, p, p, p)
    return x.reshape(b, gd * gh * gw, c * p**3)


def unpatchify(tokens: torch.Tensor, p: int, grid_dhw: tuple[int, int, int], channels: int = 1) -> torch.Tensor:
    """(B, L, C*p^3) -> (B, C, D, H, W) for a grid of (gd, gh, gw) patches."""
    b, n, _ = tokens.shape
    gd, gh, gw = grid_dhw
    if n != gd * gh * gw:
        raise ValueError(f"{n} tokens do not fill a {grid_dhw} grid")
    x = tokens.reshape(b, gd, gh, gw, channels, p, p, p)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, gd, p, gh, p, gw, p)
    return x.reshape(b, channels, gd * p, gh * p, gw * p)


def patchify_np(x: np.ndarray, p: int, out: np.ndarray | None = None) -> np.ndarray:
    """(D, H, W) array (any strides, e.g. a flipped memmap view) -> (L, p^3) in one copy.

    With ``out`` (float32, (L, p^3)) the copy and the dtype conversion happen in a single pass.
    """
    d, h, w = x.shape
    gd, gh, gw = _check((d, h, w), p)
    view = x.reshape(gd, p, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)  # (gd, gh, gw, p, p, p), no copy
    if out is None:
        out = np.empty((gd * gh * gw, p**3), np.float32)
    np.copyto(out.reshape(gd, gh, gw, p, p, p), view, casting="unsafe")
    return out


def patch_grid_coords(grid_dhw: tuple[int, int, int]) -> np.ndarray:
    """(L, 3) integer (z, y, x) patch coordinates of each token, in token order."""
    gd, gh, gw = grid_dhw
    zz, yy, xx = np.meshgrid(np.arange(gd), np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1)
