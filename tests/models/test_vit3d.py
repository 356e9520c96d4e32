"""The 3D ViT and the AR model: masks, shapes, token/image equivalence, no peeking at targets."""

from __future__ import annotations

import itertools

import pytest
import torch

from voxseq import VoxseqError
from voxseq.models import ARViT3D, ViT3D, ViTConfig, prefix_causal_mask, sincos_embed, vit_config
from voxseq.sequence import patchify

TINY = dict(patch_size=4, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)


def brute_force_mask(length: int, prefix: int) -> torch.Tensor:
    m = torch.zeros(length, length, dtype=torch.bool)
    for i, j in itertools.product(range(length), range(length)):
        m[i, j] = (j <= i) or (i < prefix and j < prefix)
    return m


def test_prefix_causal_mask_exhaustive():
    for length in range(1, 7):
        for prefixes in itertools.product(range(length + 1), repeat=2):  # two batch elements, own prefixes
            got = prefix_causal_mask(length, torch.tensor(prefixes))
            assert got.shape == (2, 1, length, length)
            for b, p in enumerate(prefixes):
                assert torch.equal(got[b, 0], brute_force_mask(length, p)), (length, p)


def test_presets():
    base = vit_config("base")
    assert (base.depth, base.embed_dim, base.num_heads, int(base.embed_dim * base.mlp_ratio)) == (12, 768, 12, 3072)
    assert vit_config("large").depth == 24 and vit_config("small").embed_dim == 384
    with pytest.raises(VoxseqError, match="unknown model preset"):
        vit_config("huge")
    with pytest.raises(VoxseqError, match="divisible"):
        ViTConfig(embed_dim=30, num_heads=4)


def test_sincos_tells_subvolumes_apart():
    pos = torch.tensor([[0, 1, 2, 3], [1, 1, 2, 3], [0, 1.5, 2, 3]])
    e = sincos_embed(pos, 32)
    assert e.shape == (3, 32)
    assert not torch.allclose(e[0], e[1]) and not torch.allclose(e[0], e[2])
    assert torch.allclose(e[0, 8:], e[1, 8:])  # only the sub-volume quarter differs


def test_image_and_token_paths_share_weights():
    torch.manual_seed(0)
    enc = ViT3D(ViTConfig(**TINY)).eval()
    x = torch.randn(2, 1, 8, 12, 16)
    a = enc.forward_features(x)
    grid = (2, 3, 4)
    zz, yy, xx = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    pos = torch.stack([torch.zeros_like(zz), zz, yy, xx], -1).reshape(1, -1, 4).float().expand(2, -1, -1)
    b = enc.forward_tokens(patchify(x, 4), pos)
    assert a.shape == (2, 24, 32) and torch.allclose(a, b, atol=1e-5)


def test_forward_intermediates_and_any_size():
    enc = ViT3D(ViTConfig(**TINY)).eval()
    x = torch.randn(1, 1, 4, 8, 20)
    inter, final = enc.forward_intermediates(x, [0, 2])
    assert len(inter) == 2 and inter[0].shape == (1, 10, 32)
    assert torch.allclose(enc.norm(inter[1]), final, atol=1e-6)  # the last block's output, normalised
    with pytest.raises(VoxseqError, match="multiple of the patch"):
        enc.forward_features(torch.randn(1, 1, 5, 8, 8))
    with pytest.raises(VoxseqError, match="outside"):
        enc.forward_intermediates(x, [3])


@pytest.mark.parametrize("use_end,head_depth", [(False, 0), (True, 0), (False, 2)])
def test_ar_predictions_never_see_their_target(use_end, head_depth):
    """Changing token j changes no prediction of a token i <= j after the prefix."""
    torch.manual_seed(0)
    model = ARViT3D(ViTConfig(**TINY, use_end_token=use_end, head_depth=head_depth)).eval()
    L = 8
    tokens = torch.randn(1, L, 64)
    pos = torch.rand(1, L, 4) * 3
    for prefix in range(L):
        p = torch.tensor([prefix])
        base = model(tokens, pos, p)
        assert base.shape == (1, L, 64)
        for j in range(prefix, L):
            t2 = tokens.clone()
            t2[0, j] += 5.0
            out = model(t2, pos, p)
            unchanged = (out - base).abs().amax(-1)[0] < 1e-5
            assert unchanged[: j + 1].all(), (prefix, j)  # predictions of t_0..t_j do not depend on t_j
            if j + 1 < L:
                assert not unchanged[j + 1]  # the next prediction does


def test_prefix_is_bidirectional():
    """Inside the prefix, an early prediction depends on later prefix tokens (bidirectional)."""
    torch.manual_seed(0)
    model = ARViT3D(ViTConfig(**TINY)).eval()
    tokens, pos = torch.randn(1, 6, 64), torch.rand(1, 6, 4)
    base = model(tokens, pos, torch.tensor([4]))
    t2 = tokens.clone()
    t2[0, 3] += 5
    out = model(t2, pos, torch.tensor([4]))
    assert (out[0, 0] - base[0, 0]).abs().max() > 1e-4  # prediction from `start` sees t_3 in the prefix


def test_per_sample_prefix_matches_single():
    torch.manual_seed(0)
    model = ARViT3D(ViTConfig(**TINY)).eval()
    tokens, pos = torch.randn(2, 6, 64), torch.rand(2, 6, 4)
    both = model(tokens, pos, torch.tensor([0, 3]))
    assert torch.allclose(both[0], model(tokens[:1], pos[:1], torch.tensor([0]))[0], atol=1e-5)
    assert torch.allclose(both[1], model(tokens[1:], pos[1:], torch.tensor([3]))[0], atol=1e-5)


def test_encoder_keys_load_into_bare_vit():
    model = ARViT3D(ViTConfig(**TINY))
    enc_state = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    fresh = ViT3D(ViTConfig(**TINY))
    missing, unexpected = fresh.load_state_dict(enc_state)
    assert not missing and not unexpected
    assert "start_token" in model.no_weight_decay()


def test_prediction_head_blocks_are_outside_the_encoder():
    torch.manual_seed(0)
    plain, deep = ARViT3D(ViTConfig(**TINY)), ARViT3D(ViTConfig(**TINY, head_depth=2))
    keys = lambda m: {k for k in m.state_dict() if k.startswith("encoder.")}  # noqa: E731
    assert keys(plain) == keys(deep)  # downstream loads the same encoder
    extra = set(deep.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("head_blocks.") for k in extra)
    assert deep(torch.randn(2, 5, 64), torch.rand(2, 5, 4), torch.tensor([0, 2])).shape == (2, 5, 64)
    with pytest.raises(VoxseqError, match="head_depth"):
        ViTConfig(**TINY, head_depth=-1)


# ---------------------------------------------------------------------------- 3D rotary positions

ROPE = dict(TINY, embed_dim=48, num_heads=2, pos_embed="rope3d")  # head dim 24 -> (6, 8, 8) rotated channels


def test_rope_axis_split():
    from voxseq.models.vit3d import rope_axis_dims

    assert rope_axis_dims(64, [2, 3, 3]) == [16, 24, 24]  # the reference h:w:t = 3:3:2 of 64
    assert rope_axis_dims(24, [2, 3, 3]) == [6, 8, 8]
    assert rope_axis_dims(32, [0, 1, 1]) == [0, 16, 16]  # z unrotated: a 2D rotary model
    with pytest.raises(VoxseqError, match="rope_split"):
        ViTConfig(**dict(ROPE, rope_split=[1, 1]))


def test_rope_scores_depend_only_on_relative_position():
    from voxseq.models.vit3d import apply_rope, rope_angles

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 24), torch.randn(1, 1, 1, 24)

    def score(pq, pk):
        pos = torch.tensor([[pq, pk]], dtype=torch.float32)  # (1, 2, 3)
        rope = rope_angles(pos, 24, [2, 3, 3])
        qq = apply_rope(q.expand(1, 1, 2, 24), rope)[..., 0, :]
        kk = apply_rope(k.expand(1, 1, 2, 24), rope)[..., 1, :]
        return float((qq * kk).sum())

    base = score((0, 1, 2), (3, 5, 1))
    for shift in [(7, 0, 0), (250, -3, 4), (0.5, 2, 2)]:  # z far beyond anything seen in training
        moved = score(tuple(a + s for a, s in zip((0, 1, 2), shift)), tuple(a + s for a, s in zip((3, 5, 1), shift)))
        assert moved == pytest.approx(base, abs=1e-4)
    assert score((0, 1, 2), (4, 5, 1)) != pytest.approx(base, abs=1e-3)  # a different offset scores differently
    # norms are preserved: rotation only
    rope = rope_angles(torch.tensor([[[3.0, 1.0, 2.0]]]), 24, [2, 3, 3])
    assert torch.allclose(apply_rope(q, rope).norm(), q.norm(), atol=1e-5)


def test_rope_model_is_translation_equivariant_and_takes_any_number_of_slices():
    torch.manual_seed(0)
    enc = ViT3D(ViTConfig(**ROPE)).eval()
    assert enc.uses_rope
    tokens = torch.randn(1, 24, 64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(g) for g in (2, 3, 4)], indexing="ij"), -1).reshape(1, -1, 3).float()
    a = enc.forward_tokens(tokens, grid)
    b = enc.forward_tokens(tokens, grid + torch.tensor([40.0, 0.0, 0.0]))  # the same chunk 40 patches further along z
    assert torch.allclose(a, b, atol=1e-4)
    with torch.no_grad():  # 8 slices and 300 slices through the same weights; image path == token path
        for depth in (8, 300):
            x = torch.randn(1, 1, depth, 8, 8)
            f = enc.forward_features(x)
            assert f.shape == (1, (depth // 4) * 2 * 2, 48) and torch.isfinite(f).all()
        x = torch.randn(1, 1, 8, 12, 16)
        g = torch.stack(torch.meshgrid(*[torch.arange(n) for n in (2, 3, 4)], indexing="ij"), -1).reshape(1, -1, 3).float()
        assert torch.allclose(enc.forward_features(x), enc.forward_tokens(patchify(x, 4), g), atol=1e-5)


def test_key_mask_keeps_padding_out():
    torch.manual_seed(0)
    enc = ViT3D(ViTConfig(**ROPE)).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    padded = torch.cat([x, torch.randn(1, 1, 4, 8, 8) * 5], dim=2)  # one extra slab of junk
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[:, 8:] = False  # grid (3, 2, 2): the last z row of 4 tokens is padding
    with torch.no_grad():
        plain = enc.forward_features(x)
        masked = enc.forward_features(padded, token_mask=mask)[:, :8]
        unmasked = enc.forward_features(padded)[:, :8]
    assert torch.allclose(plain, masked, atol=1e-5)
    assert not torch.allclose(plain, unmasked, atol=1e-3)


def test_ar_model_refuses_rotary_positions():
    with pytest.raises(VoxseqError, match="sin-cos"):
        ARViT3D(ViTConfig(**ROPE))


def test_volume_positions_place_a_crop_where_it_sits():
    """pos_origin="volume": a crop given its start embeds each token as the whole image does at that place
    (same position vectors); without a start, or with pos_origin="crop", positions count from the crop."""
    torch.manual_seed(0)
    image = torch.randn(1, 1, 12, 16, 20)
    start = (4, 8, 4)
    crop = image[..., 4:12, 8:16, 4:12]  # grid (2, 2, 2) at patch (1, 2, 1)
    vol = ViT3D(ViTConfig(**TINY, pos_origin="volume"))
    whole, _ = vol.embed_image(image)  # (1, 3*4*5, E)
    placed, _ = vol.embed_image(crop, origin_zyx=torch.tensor([start]))
    at = [z * 20 + y * 5 + x for z in (1, 2) for y in (2, 3) for x in (1, 2)]  # z-major grid indices
    assert torch.allclose(placed[0], whole[0, at], atol=1e-6)
    cornered, _ = vol.embed_image(crop)
    assert not torch.allclose(cornered, placed)
    relative = ViT3D(ViTConfig(**TINY))
    relative.load_state_dict(vol.state_dict())
    assert torch.allclose(relative.forward_features(crop, origin_zyx=torch.tensor([start])), vol.forward_features(crop))
    # a batch of crops, each with its own start; the start token and intermediates take it too
    two = torch.cat([crop, image[..., :8, :8, :8]])
    inter, final = vol.forward_intermediates(two, [1], origin_zyx=torch.tensor([start, (0, 0, 0)]))
    assert torch.allclose(final[1], vol.forward_features(image[..., :8, :8, :8])[0], atol=1e-5)
    assert torch.allclose(final[0], vol.forward_features(crop, origin_zyx=start)[0], atol=1e-5)
    with pytest.raises(VoxseqError, match="pos_origin"):
        ViTConfig(**TINY, pos_origin="scanner")
