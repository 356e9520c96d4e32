"""Objectives: losses that take model outputs and targets (models never compute losses)."""

from voxseq.objectives.ar import norm_pixel_loss, norm_pixel_target, prefix_loss_mask, sample_prefix_len

__all__ = ["norm_pixel_loss", "norm_pixel_target", "prefix_loss_mask", "sample_prefix_len"]
