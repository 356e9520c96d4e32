"""The AR-SSL4M objective: next-token normalised-pixel regression after a random prefix."""

from __future__ import annotations

import torch


def norm_pixel_target(target: torch.Tensor, eps: float = 1e-6, channels: int = 1) -> torch.Tensor:
    """Normalise each token by its own mean and variance: (x - mean) / sqrt(var + eps) (MAE's norm_pix).

    A token of ``channels`` channels (C*p^3 values in (C, pz, py, px) order, e.g. several HU windows of one
    place) has each channel normalised on its own, so a window's range does not leak into another's target
    and one channel gives exactly the single-channel target.
    """
    shape = target.shape
    if shape[-1] % channels:
        raise ValueError(f"a token of {shape[-1]} values does not split into {channels} channels")
    t = target.reshape(*shape[:-1], channels, shape[-1] // channels)
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True, unbiased=False)
    return ((t - mean) / (var + eps).sqrt()).reshape(shape)


def norm_pixel_loss(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor, eps: float = 1e-6,
                    normalize: bool = True, channels: int = 1) -> torch.Tensor:
    """MSE between predicted tokens (B, L, P) and per-token-normalised targets, over ``loss_mask`` (B, L).

    Averaged over the voxels of every token where the mask is True; a batch without any such token
    gives 0 (with a gradient) rather than NaN. ``normalize=False`` regresses the raw voxels instead (the
    ablation: the token's own mean intensity then has to be predicted too). ``channels``: see
    :func:`norm_pixel_target`.
    """
    goal = norm_pixel_target(target.float(), eps, channels) if normalize else target.float()
    per_token = (pred.float() - goal).pow(2).mean(dim=-1)  # (B, L)
    m = loss_mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def sample_prefix_len(batch: int, length: int, generator: torch.Generator | None = None,
                      random_start: bool = True) -> torch.Tensor:
    """Prefix lengths (B,) drawn uniformly in [0, L-1] (random start), or all 0 (pure causal training)."""
    if not random_start:
        return torch.zeros(batch, dtype=torch.long)
    return torch.randint(0, length, (batch,), generator=generator)


def prefix_loss_mask(prefix_len: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L) True for tokens after the prefix (index >= prefix_len): the ones the loss counts."""
    return torch.arange(length, device=prefix_len.device)[None, :] >= prefix_len[:, None]
