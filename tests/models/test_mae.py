"""The masked autoencoder baseline: masking, the encoder seeing visible tokens only, the loss on masked ones."""

from __future__ import annotations

import pytest
import torch

from voxseq import VoxseqError
from voxseq.models.mae import MAEDecoderConfig, MAEViT3D, random_masking
from voxseq.models.vit3d import ViTConfig
from voxseq.objectives.ar import norm_pixel_loss, norm_pixel_target

CFG = ViTConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2)
DEC = MAEDecoderConfig(embed_dim=16, depth=1, num_heads=2)


def _sequence(b=2, length=24):
    torch.manual_seed(0)
    pos = torch.zeros(b, length, 4)
    pos[..., 1:] = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(4), indexing="ij"),
                               -1).reshape(-1, 3).float()[None]
    return torch.randn(b, length, CFG.token_dim), pos


def test_random_masking_hides_the_ratio_and_keeps_order():
    g = torch.Generator().manual_seed(0)
    keep, mask = random_masking(3, 20, 0.75, g)
    assert keep.shape == (3, 5) and mask.shape == (3, 20) and (mask.sum(1) == 15).all()
    assert (keep.diff(dim=1) > 0).all()  # visible tokens in sequence order
    for b in range(3):
        assert not mask[b, keep[b]].any() and mask[b].sum() + len(keep[b]) == 20
    again, _ = random_masking(3, 20, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)  # a function of the generator's seed
    assert random_masking(1, 4, 0.99)[0].shape == (1, 1)  # at least one token stays visible
    assert not random_masking(2, 6, 0.0)[1].any()
    with pytest.raises(VoxseqError, match="mask_ratio"):
        random_masking(1, 4, 1.0)


def test_encoder_sees_visible_tokens_only():
    """Changing a hidden token leaves the encoder's output unchanged; changing a visible one does not."""
    model = MAEViT3D(CFG, DEC).eval()
    tokens, pos = _sequence()
    keep, mask = random_masking(2, tokens.shape[1], 0.5, torch.Generator().manual_seed(1))
    latent = model.forward_encoder(tokens, pos, keep)
    assert latent.shape == (2, 12, 32) and model(tokens, pos, keep).shape == tokens.shape
    hidden = int(mask[0].nonzero()[0])
    changed = tokens.clone()
    changed[0, hidden] += 5.0
    assert torch.allclose(model.forward_encoder(changed, pos, keep), latent, atol=1e-6)
    changed[0, int(keep[0, 0])] += 5.0
    assert not torch.allclose(model.forward_encoder(changed, pos, keep)[0], latent[0], atol=1e-3)


def test_loss_counts_masked_tokens_and_training_lowers_it():
    model = MAEViT3D(CFG, DEC)
    tokens, pos = _sequence()
    keep, mask = random_masking(2, tokens.shape[1], 0.75, torch.Generator().manual_seed(2))
    pred = model(tokens, pos, keep)
    # a perfect prediction of the hidden tokens gives 0 whatever is predicted for the visible ones
    perfect = torch.where(mask[..., None], norm_pixel_target(tokens), torch.randn_like(pred))
    assert norm_pixel_loss(perfect, tokens, mask).item() == pytest.approx(0.0, abs=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = norm_pixel_loss(model(tokens, pos, keep), tokens, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert model.no_weight_decay() == {"mask_token"}


def test_config_errors():
    with pytest.raises(VoxseqError, match="sin-cos"):
        MAEViT3D(ViTConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2, pos_embed="rope3d"), DEC)
    with pytest.raises(VoxseqError, match="decoder"):
        MAEViT3D(CFG, MAEDecoderConfig(embed_dim=20, depth=1, num_heads=3))
