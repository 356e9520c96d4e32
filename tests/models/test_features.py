"""Per-token features through sliding windows and chosen layers (voxseq.models.features)."""

from __future__ import annotations

import pytest
import torch

from voxseq import VoxseqError
from voxseq.models.features import parse_layer, token_features, token_features_layers, window_starts
from voxseq.models.vit3d import ViT3D, ViTConfig


def _encoder(**kw) -> ViT3D:
    torch.manual_seed(0)
    return ViT3D(ViTConfig(patch_size=4, embed_dim=24, depth=3, num_heads=2, **kw)).eval()


def test_window_starts_cover_the_grid():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(7, 2, 0.0) == [0, 2, 4, 5]  # the last window ends at the grid's end
    assert window_starts(3, 8, 0.5) == [0]  # a window larger than the grid: one, shrunk
    for size, win, ov in ((9, 4, 0.5), (13, 5, 0.25), (6, 6, 0.0)):
        starts = window_starts(size, win, ov)
        covered = set().union(*[range(s, s + win) for s in starts])
        assert covered == set(range(size)) and max(starts) + win == size


def test_local_encoder_stitches_tokens_in_place():
    """With every residual branch zeroed and rotary positions (nothing added to the tokens), a token's
    feature depends on its own voxels only, so any windowing must give the whole-volume features in
    the same token order."""
    enc = _encoder(pos_embed="rope3d")
    for blk in enc.blocks:
        torch.nn.init.zeros_(blk.attn.proj.weight), torch.nn.init.zeros_(blk.attn.proj.bias)
        torch.nn.init.zeros_(blk.mlp.fc2.weight), torch.nn.init.zeros_(blk.mlp.fc2.bias)
    image = torch.randn(1, 12, 20, 28)  # grid 3 x 5 x 7
    whole = token_features(enc, image)
    assert whole.shape == (3 * 5 * 7, 24)
    for window, overlap in (([8, 8, 8], 0.5), ([4, 12, 8], 0.0), ([12, 20, 28], 0.5), ([8, 16, 12], 0.75)):
        assert torch.allclose(token_features(enc, image, window, overlap), whole, atol=1e-5), window


def test_overlapping_windows_average_a_tokens_features():
    """Grid z = 3, windows of 2 tokens at half overlap start at z 0 and 1: the middle slab's features are
    the mean of its features in both windows (sin-cos positions counted from each window's corner)."""
    enc = _encoder()
    image = torch.randn(1, 12, 8, 8)  # grid 3 x 2 x 2
    got = token_features(enc, image, [8, 8, 8], 0.5).reshape(3, 4, -1)
    first = enc.forward_features(image[None, :, 0:8])[0].reshape(2, 4, -1)
    second = enc.forward_features(image[None, :, 4:12])[0].reshape(2, 4, -1)
    assert torch.allclose(got[0], first[0], atol=1e-5)
    assert torch.allclose(got[1], (first[1] + second[0]) / 2, atol=1e-5)
    assert torch.allclose(got[2], second[1], atol=1e-5)
    # a window of the whole grid is the whole-volume pass; a smaller one is not (positions and context differ)
    assert torch.allclose(token_features(enc, image, [12, 8, 8]), token_features(enc, image), atol=1e-5)
    assert not torch.allclose(got, token_features(enc, image).reshape(3, 4, -1), atol=1e-3)


def test_layers_are_the_blocks_outputs():
    enc = _encoder()
    image = torch.randn(1, 8, 8, 12)
    taken, final = enc.forward_intermediates(image[None], [0, 1, 2])
    one, mean, last = token_features_layers(enc, image, [1, "mean", "last"])
    assert torch.allclose(one, taken[0][0], atol=1e-6) and torch.allclose(last, final[0], atol=1e-6)
    assert torch.allclose(mean, torch.stack(taken).mean(0)[0], atol=1e-6)
    assert torch.allclose(token_features(enc, image, layer=3), taken[2][0], atol=1e-6)
    assert not torch.allclose(token_features(enc, image, layer=3), last, atol=1e-3)  # the final norm differs
    # windowed, several layers at once equal one layer at a time
    several = token_features_layers(enc, image, [2, "last"], [8, 8, 8])
    assert torch.allclose(several[0], token_features(enc, image, [8, 8, 8], layer=2), atol=1e-6)
    assert torch.allclose(several[1], token_features(enc, image, [8, 8, 8]), atol=1e-6)


def test_layer_and_window_errors():
    assert parse_layer("2", 6) == 2 and parse_layer("mean", 6) == "mean" and parse_layer(6, 6) == 6
    for bad in ("0", "7", "middle", "1.5"):
        with pytest.raises(VoxseqError, match="layer"):
            parse_layer(bad, 6)
    enc = _encoder()
    with pytest.raises(VoxseqError, match="multiples of the patch size"):
        token_features(enc, torch.randn(1, 8, 8, 8), [6, 8, 8])
    with pytest.raises(VoxseqError, match="overlap"):
        token_features(enc, torch.randn(1, 8, 8, 8), [4, 4, 4], overlap=1.0)
    with pytest.raises(VoxseqError, match="one \\(C, D, H, W\\) image"):
        token_features(enc, torch.randn(1, 1, 8, 8, 8))


def test_windows_of_a_volume_positioned_encoder_keep_their_place():
    """With ``pos_origin="volume"`` each window is embedded at its place in the image: a context-free
    encoder (attention and MLP outputs zeroed) then gives the whole-volume features through any windows,
    which it does not when positions count from each window's corner."""
    image = torch.randn(1, 12, 20, 28)
    feats = {}
    for origin in ("volume", "crop"):
        torch.manual_seed(0)
        enc = _encoder(pos_origin=origin)
        for blk in enc.blocks:
            torch.nn.init.zeros_(blk.attn.proj.weight), torch.nn.init.zeros_(blk.attn.proj.bias)
            torch.nn.init.zeros_(blk.mlp.fc2.weight), torch.nn.init.zeros_(blk.mlp.fc2.bias)
        feats[origin] = token_features(enc, image), token_features(enc, image, [8, 8, 8], 0.5)
    assert torch.allclose(feats["volume"][1], feats["volume"][0], atol=1e-5)
    assert torch.allclose(feats["crop"][0], feats["volume"][0], atol=1e-5)  # a whole image starts at 0 either way
    assert not torch.allclose(feats["crop"][1], feats["crop"][0], atol=1e-3)
