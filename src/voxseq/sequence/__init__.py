"""Token sequences from 3D volumes: patchify/unpatchify and the spatial/contrast/semantic samplers."""

from voxseq.sequence.patches import patch_grid_coords, patchify, patchify_np, unpatchify
from voxseq.sequence.samplers import (
    KINDS,
    ArraySource,
    AugmentConfig,
    ResumableSampler,
    SequenceConfig,
    SequenceDataset,
    VolumeSource,
    collate_sequences,
    measure_sampler,
    read_window,
)

__all__ = ["KINDS", "ArraySource", "AugmentConfig", "ResumableSampler", "SequenceConfig", "SequenceDataset",
           "VolumeSource", "collate_sequences", "measure_sampler", "patch_grid_coords", "patchify", "patchify_np",
           "read_window", "unpatchify"]
