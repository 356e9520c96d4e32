"""Objectives: losses that take model outputs and targets (models never compute losses)."""

from voxseq.objectives.ar import norm_pixel_loss, norm_pixel_target, prefix_loss_mask, sample_prefix_len
from voxseq.objectives.siglip import (
    SIGLIP_INIT_LOGIT_BIAS,
    SIGLIP_INIT_LOGIT_SCALE,
    SigLipLoss,
    key_tensor,
    sentence_key,
    siglip_labels,
)

__all__ = ["SIGLIP_INIT_LOGIT_BIAS", "SIGLIP_INIT_LOGIT_SCALE", "SigLipLoss", "key_tensor", "norm_pixel_loss",
           "norm_pixel_target", "prefix_loss_mask", "sample_prefix_len", "sentence_key", "siglip_labels"]
