"""Per-token features of whole images, the way an encoder was pretrained: which layer, which window.

An AR-SSL4M encoder is pretrained on sequences cut from small crops (``sequence.subvolume_zyx`` slabs
of a ``sequence.crop_zyx`` crop: 128-512 tokens, sin-cos positions counted from the crop's corner). A
whole scan fed as one sequence has positions and lengths it never saw (a 197x233x189 MRI at 8^3
patches is ~18k tokens with positions up to 29). :func:`token_features` instead slides a window of
the pretraining geometry over the patch grid (windows overlap; a token seen by several windows gets
the mean of its features), so every token is embedded with positions and a context it was trained on.
An encoder with ``pos_origin="volume"`` gets each window's start, so a token keeps its place in the scan
whichever window embeds it.

Layers (iGPT, Chen et al. 2020: autoregressive models give their best linear-probe features in the
middle of the network, as the last layers specialise in predicting the *next* token):
``"last"`` is the final normalised output (``forward_features``); an int ``n`` in 1..depth the output of
block ``n``; ``"mean"`` the mean of all blocks' outputs.
"""

from __future__ import annotations

from typing import Sequence

import torch

from voxseq import VoxseqError

Layer = int | str


def parse_layer(value: str | int, depth: int) -> Layer:
    """``last``, ``mean`` or a block number 1..depth (also given as text, e.g. from the command line)."""
    if isinstance(value, str) and value in ("last", "mean"):
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise VoxseqError(f"layer must be 'last', 'mean' or a block number 1..{depth}, not {value!r}") from None
    if not 1 <= n <= depth:
        raise VoxseqError(f"layer {n} is outside the encoder's blocks 1..{depth}")
    return n


def describe_geometry(window_zyx: Sequence[int] | None, overlap: float | None = None) -> str:
    """How tokens are embedded, for messages and reports: "whole volumes" or "windows of 64x64x64 voxels"."""
    if window_zyx is None:
        return "whole volumes"
    return f"windows of {'x'.join(map(str, window_zyx))} voxels" + ("" if overlap is None else f" (overlap {overlap:g})")


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of windows of ``window`` cells covering ``size`` cells, adjacent ones sharing about
    ``overlap`` of a window; the last one ends at ``size``. One window when it covers everything."""
    if window >= size:
        return [0]
    step = max(1, int(round(window * (1.0 - overlap))))
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _layer_outputs(encoder, x: torch.Tensor, layers: Sequence[Layer], origin_zyx=None) -> list[torch.Tensor]:
    """(B, C, D, H, W) -> one (B, N, E) tensor per requested layer, from one bidirectional pass (``origin_zyx``:
    where each input starts in its image, for encoders with volume positions)."""
    blocks = sorted({int(n) - 1 for n in layers if n not in ("last", "mean")} |
                    (set(range(encoder.num_layers)) if "mean" in layers else set()))
    if blocks:
        taken, final = encoder.forward_intermediates(x, blocks, origin_zyx=origin_zyx)
        by_block = dict(zip(blocks, taken))
    else:
        final, by_block = encoder.forward_features(x, origin_zyx=origin_zyx), {}
    out = []
    for n in layers:
        if n == "last":
            out.append(final)
        elif n == "mean":
            out.append(torch.stack([by_block[i] for i in range(encoder.num_layers)]).mean(0))
        else:
            out.append(by_block[int(n) - 1])
    return out


@torch.no_grad()
def token_features(encoder, image: torch.Tensor, window_zyx: Sequence[int] | None = None, overlap: float = 0.5,
                   layer: Layer = "last", batch_size: int = 8) -> torch.Tensor:
    """Features (N, E) of every token of one image (C, D, H, W), in the grid's z-major order.

    ``image`` sides must be multiples of the patch size. ``window_zyx`` (voxels, multiples of the
    patch size) slides a window of that size over the grid with the given ``overlap`` (0 <= overlap < 1)
    and averages each token's features over the windows holding it; ``None`` embeds the whole image
    as one sequence. Windows larger than the image shrink to it.
    """
    return token_features_layers(encoder, image, [layer], window_zyx, overlap, batch_size)[0]


@torch.no_grad()
def token_features_layers(encoder, image: torch.Tensor, layers: Sequence[Layer], window_zyx: Sequence[int] | None = None,
                          overlap: float = 0.5, batch_size: int = 8) -> list[torch.Tensor]:
    """:func:`token_features` of several layers at once (one pass per window): a list of (N, E)."""
    if image.ndim != 4:
        raise VoxseqError(f"token_features takes one (C, D, H, W) image, not shape {tuple(image.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise VoxseqError(f"window overlap must be in [0, 1), not {overlap}")
    p = encoder.cfg.patch_size
    grid = [s // p for s in image.shape[1:]]
    x = image[None].float()
    if window_zyx is None:
        return [f[0] for f in _layer_outputs(encoder, x, layers)]
    if len(window_zyx) != 3 or any(int(w) <= 0 or int(w) % p for w in window_zyx):
        raise VoxseqError(f"window {list(window_zyx)} must be three positive multiples of the patch size {p}")
    win = [min(int(w) // p, g) for w, g in zip(window_zyx, grid)]
    corners = [(z, y, xx) for z in window_starts(grid[0], win[0], overlap)
               for y in window_starts(grid[1], win[1], overlap) for xx in window_starts(grid[2], win[2], overlap)]
    totals: list[torch.Tensor] = []
    count = x.new_zeros(*grid, 1)
    for i in range(0, len(corners), batch_size):
        chunk = corners[i:i + batch_size]
        crops = torch.cat([x[..., z * p:(z + win[0]) * p, y * p:(y + win[1]) * p, xx * p:(xx + win[2]) * p]
                           for z, y, xx in chunk])  # (b, C, wd*p, wh*p, ww*p)
        origins = torch.tensor([[z * p, y * p, xx * p] for z, y, xx in chunk])  # each window's place in the image
        outs = _layer_outputs(encoder, crops, layers, origins)  # per layer (b, wd*wh*ww, E)
        if not totals:
            totals = [x.new_zeros(*grid, o.shape[-1]) for o in outs]
        for j, (z, y, xx) in enumerate(chunk):
            sl = (slice(z, z + win[0]), slice(y, y + win[1]), slice(xx, xx + win[2]))
            for total, o in zip(totals, outs):
                total[sl] += o[j].reshape(*win, -1)
            count[sl] += 1
    return [(t / count).reshape(-1, t.shape[-1]) for t in totals]


__all__ = ["Layer", "describe_geometry", "parse_layer", "token_features", "token_features_layers", "window_starts"]
