"""Pretrained encoders for downstream use: load any voxseq checkpoint's ViT with its preprocessing,
and turn files into features (``voxseq embed``).

A checkpoint (file or run folder) carries ``model`` (the ViT config) and ``preprocess`` in its
metadata. Encoder weights are the keys under ``encoder.`` (AR-SSL4M pretraining and fine-tuned
models alike); everything else (heads, decoders, special tokens) is reported as unexpected.
Loading (``load_encoder``, ``encoder_from_checkpoint``) lives in the model hub (``voxseq.models.hub``), which
also converts official AR-SSL4M weights files (mapping in docs/architecture.md); they are re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from voxseq import VoxseqError
from voxseq.data.preprocess import Preprocess
from voxseq.io.volume import Volume, read_volume
from voxseq.models.features import Layer, token_features
# loading lives in the hub; these names stay importable from here
from voxseq.models.hub import NOT_ENCODER, create_model, encoder_from_checkpoint, load_encoder  # noqa: F401
from voxseq.models.vit3d import ViT3D


def embed(encoder: ViT3D, pre: Preprocess, path: str | Path, *, per_token: bool = False, layer: Layer | None = None,
          window: str | Sequence[int] | None = "whole", meta: dict[str, Any] | None = None,
          **kwargs: Any) -> dict[str, np.ndarray]:
    """:func:`embed_file` with ``voxseq embed``'s defaults: ``layer`` None is the checkpoint's default
    (pass its ``meta``: the middle block of AR runs), ``window`` as ``--window``."""
    chosen, window_zyx = embedding_setup(encoder, meta or {}, layer, window)
    return embed_file(encoder, pre, path, per_token=per_token, layer=chosen, window_zyx=window_zyx, **kwargs)


def embedding_setup(encoder: ViT3D, meta: dict[str, Any], layer: Layer | str | None,
                    window: str | Sequence[int] | None) -> tuple[Layer, list[int] | None]:
    """(layer, window in voxels) that ``embed`` uses: ``layer`` None is the checkpoint's default layer,
    ``window`` as :func:`resolve_window`."""
    from voxseq.models.features import parse_layer

    chosen = parse_layer(default_layer(meta) if layer is None else layer, encoder.num_layers)
    return chosen, resolve_window(window, meta, encoder.cfg.patch_size)


def random_encoder(preset: str, patch_size: int | None = None) -> tuple[ViT3D, Preprocess]:
    """A randomly initialised encoder of a preset (a baseline for linear probes), default preprocessing."""
    torch.manual_seed(0)
    return create_model(preset, **({"patch_size": patch_size} if patch_size else {})), Preprocess()


def resolve_window(window: str | Sequence[int] | None, meta: dict[str, Any], patch_size: int) -> list[int] | None:
    """The embedding window (voxels, z y x) for ``window``: ``whole`` (None: one sequence per volume),
    ``pretraining`` (the geometry the checkpoint was trained on, see :func:`pretraining_window`), or
    explicit sizes (``"16x64x64"`` or three numbers)."""
    if window is None or window == "whole":
        return None
    if window == "pretraining":
        return pretraining_window(meta)
    parts = window.lower().replace(",", "x").split("x") if isinstance(window, str) else list(window)
    try:
        sizes = [int(v) for v in parts]
    except ValueError:
        raise VoxseqError(f"window {window!r} must be 'pretraining', 'whole' or ZxYxX voxels (e.g. 16x64x64)") from None
    if len(sizes) != 3 or any(v <= 0 or v % patch_size for v in sizes):
        raise VoxseqError(f"window {window!r} must be three positive multiples of the patch size {patch_size}")
    return sizes


def pretraining_window(meta: dict[str, Any]) -> list[int] | None:
    """The input geometry a checkpoint's encoder was trained on, as an embedding window (voxels, z y x).

    AR pretraining: its crop (``sequence.crop_zyx``, the region its sequences are cut from; measured
    against one sub-volume and whole volumes in docs/reproducing.md); segmentation fine-tuning: its ROI.
    Rotary (SigVLP) encoders and checkpoints that record no geometry (official weights, random
    encoders) embed whole volumes (None).
    """
    model = meta.get("model", {})
    if model.get("pos_embed") == "rope3d":
        return None
    cfg = meta.get("config", {})
    sequence = cfg.get("sequence") or {}
    if sequence.get("crop_zyx"):
        return [int(v) for v in sequence["crop_zyx"]]
    if cfg.get("roi_zyx"):
        return [int(v) for v in cfg["roi_zyx"]]
    return None


def default_layer(meta: dict[str, Any]) -> str | int:
    """The layer ``embed`` and the probe use by default: the middle block of AR-SSL4M pretraining
    checkpoints (their last blocks specialise in predicting the next token; iGPT's finding, measured
    here in docs/reproducing.md), the final normalised output of every other checkpoint."""
    if meta.get("task") == "pretrain-ar":
        return max(1, int(meta.get("model", {}).get("depth", 2)) // 2)
    return "last"


def pad_to_multiple(array: np.ndarray, multiple: int, value: float) -> np.ndarray:
    """Pad (C, Z, Y, X) at the end of each spatial axis to a multiple of ``multiple``."""
    pads = [(0, 0)] + [(0, (-s) % multiple) for s in array.shape[1:]]
    return np.pad(array, pads, constant_values=value) if any(p[1] for p in pads) else array


def token_centres_in_source(grid_zyx: Sequence[int], patch: int, pre: Volume, source: Volume) -> np.ndarray:
    """(N, 3) (i, j, k) indices, in the source file's own axis order, of each token's centre voxel.

    Token centres are mapped through physical space: preprocessed grid -> mm -> the file's grid.
    """
    zz, yy, xx = np.meshgrid(*[np.arange(g) for g in grid_zyx], indexing="ij")
    centre_xyz = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1) * patch + (patch - 1) / 2.0  # (N, 3) in pre grid
    d = np.asarray(pre.direction, float).reshape(3, 3)
    phys = np.asarray(pre.origin, float) + (d @ (centre_xyz * np.asarray(pre.spacing, float)).T).T
    m = source.meta
    sd = np.asarray(m.get("source_direction", source.direction), float).reshape(3, 3)
    so = np.asarray(m.get("source_origin_xyz", source.origin), float)
    ss = np.asarray(m.get("source_spacing_xyz", source.spacing), float)
    return np.rint(np.linalg.solve(sd, (phys - so).T).T / ss).astype(np.int64)


@torch.no_grad()
def embed_file(encoder: ViT3D, pre_cfg: Preprocess, path: str | Path, per_token: bool = False,
               spacing: Sequence[float] | None = None, window_zyx: Sequence[int] | None = None,
               layer: Layer = "last", overlap: float = 0.5,
               nonfinite: str = "error") -> dict[str, np.ndarray]:
    """Features of one file: ``features`` (E,) mean over tokens, or with ``per_token`` (N, E) plus
    ``voxel_ijk`` (N, 3), keeping tokens whose centre lies inside the file's grid.

    ``window_zyx`` (voxels) embeds through overlapping windows of that size (None: the whole volume
    as one sequence); ``layer`` picks the block (see ``voxseq.models.features``)."""
    source = read_volume(path, spacing=spacing, nonfinite=nonfinite)
    image, _ = pre_cfg(source)
    p = encoder.cfg.patch_size
    arr = image.array if image.array.ndim == 4 else image.array[None]
    if arr.shape[0] != encoder.cfg.in_chans:
        raise VoxseqError(f"{path}: {arr.shape[0]} channel(s), the encoder takes {encoder.cfg.in_chans}")
    arr = pad_to_multiple(arr, p, pre_cfg.out_range[0] if pre_cfg.pad_value is None else pre_cfg.pad_value)
    encoder.eval()
    feats = token_features(encoder, torch.from_numpy(np.ascontiguousarray(arr)).float(), window_zyx, overlap,
                           layer).numpy()  # (N, E)
    if not per_token:
        return {"features": feats.mean(0)}
    grid = [s // p for s in arr.shape[1:]]
    ijk = token_centres_in_source(grid, p, image, source)
    size = np.asarray(source.meta.get("source_size_xyz", source.size_xyz))
    inside = ((ijk >= 0) & (ijk < size)).all(1)
    return {"features": feats[inside], "voxel_ijk": ijk[inside]}
