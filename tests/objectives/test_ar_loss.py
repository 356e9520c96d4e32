"""The AR objective: prefix exclusion, per-token normalisation, known values."""

from __future__ import annotations

import pytest
import torch

from voxseq.objectives import norm_pixel_loss, norm_pixel_target, prefix_loss_mask, sample_prefix_len


def test_known_value():
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])  # token 0: mean 2, var 1 -> [-1, 1]; token 1 constant -> [0, 0]
    pred = torch.zeros(1, 2, 2)
    mask = torch.tensor([[True, False]])
    assert torch.isclose(norm_pixel_loss(pred, target, mask), torch.tensor(1.0 / (1 + 1e-6)))
    assert torch.equal(norm_pixel_target(target)[0, 1], torch.zeros(2))  # eps keeps constant tokens finite


def test_prefix_tokens_excluded():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    prefix = torch.tensor([2, 4])
    mask = prefix_loss_mask(prefix, 6)
    assert mask.tolist() == [[False, False, True, True, True, True], [False] * 4 + [True, True]]
    base = norm_pixel_loss(pred, target, mask)
    p2 = pred.clone()
    p2[0, :2] += 100
    p2[1, :4] -= 100
    assert torch.allclose(norm_pixel_loss(p2, target, mask), base)
    p2[0, 2] += 1
    assert not torch.allclose(norm_pixel_loss(p2, target, mask), base)


def test_invariant_to_affine_target_rescaling():
    torch.manual_seed(0)
    pred, target = torch.randn(1, 4, 27), torch.randn(1, 4, 27)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert torch.allclose(norm_pixel_loss(pred, target, mask), norm_pixel_loss(pred, 7 * target + 3, mask), atol=1e-5)


def test_raw_voxel_regression_without_normalisation():
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    pred = torch.zeros(1, 2, 2)
    both = torch.ones(1, 2, dtype=torch.bool)
    assert torch.isclose(norm_pixel_loss(pred, target, both, normalize=False), torch.tensor((1 + 9 + 4 + 4) / 4))
    assert norm_pixel_loss(target, target, both, normalize=False) == 0  # the raw voxels themselves
    assert not torch.isclose(norm_pixel_loss(pred, 7 * target + 3, both, normalize=False),
                             norm_pixel_loss(pred, target, both, normalize=False))  # the intensity now matters


def test_prefix_sampling():
    g = torch.Generator().manual_seed(0)
    p = sample_prefix_len(10000, 512, g)
    assert p.min() == 0 and p.max() == 511 and abs(p.float().mean().item() - 255.5) < 8
    assert torch.equal(sample_prefix_len(4, 512, random_start=False), torch.zeros(4, dtype=torch.long))


def test_empty_mask_gives_zero_not_nan():
    pred = torch.randn(1, 3, 4, requires_grad=True)
    loss = norm_pixel_loss(pred, torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None


def test_each_channel_of_a_token_is_normalised_on_its_own():
    torch.manual_seed(0)
    a, b = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    two = torch.cat([a, 100 * b + 50], dim=-1)  # channel 1 on another scale, as another HU window
    target = norm_pixel_target(two, channels=2)
    assert torch.allclose(target[..., :8], norm_pixel_target(a), atol=1e-5)
    assert torch.allclose(target[..., 8:], norm_pixel_target(b), atol=1e-5)
    assert not torch.allclose(norm_pixel_target(two), target, atol=1e-2)  # one norm over both would mix their ranges
    mask = torch.ones(1, 3, dtype=torch.bool)
    expected = (norm_pixel_loss(torch.zeros(1, 3, 8), a, mask) + norm_pixel_loss(torch.zeros(1, 3, 8), b, mask)) / 2
    assert torch.isclose(norm_pixel_loss(torch.zeros(1, 3, 16), two, mask, channels=2), expected)
    with pytest.raises(ValueError, match="channels"):
        norm_pixel_target(torch.zeros(1, 2, 9), channels=2)
