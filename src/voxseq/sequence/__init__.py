"""Token sequences from 3D volumes: patchify/unpatchify, the spatial/contrast/semantic samplers (AR-SSL4M) and
chunk-text pairs with packing (SigVLP)."""

from voxseq.sequence.chunks import (
    ChunkBatchSampler,
    ChunkConfig,
    ChunkTextDataset,
    chunk_batches,
    collate_packed,
    label_counts,
    lesion_in_window,
    organs_in_chunk,
    pack_lengths,
    padding_waste,
    sentence_key,
    sentence_labels,
    volume_chunks,
    window_sentence,
)
from voxseq.sequence.patches import patch_grid_coords, patchify, patchify_np, unpatchify
from voxseq.sequence.samplers import (
    KINDS,
    SEQUENCE_KINDS,
    ArraySource,
    AugmentConfig,
    ResumableSampler,
    SequenceConfig,
    SequenceDataset,
    VolumeSource,
    collate_sequences,
    measure_sampler,
    read_window,
    register_sequence_kind,
)

__all__ = ["KINDS", "SEQUENCE_KINDS", "ArraySource", "AugmentConfig", "ChunkBatchSampler", "ChunkConfig", "ChunkTextDataset",
           "ResumableSampler", "SequenceConfig", "SequenceDataset", "VolumeSource", "chunk_batches", "collate_packed",
           "collate_sequences", "label_counts", "lesion_in_window", "measure_sampler", "organs_in_chunk", "pack_lengths",
           "padding_waste", "patch_grid_coords", "patchify", "patchify_np", "read_window", "register_sequence_kind",
           "sentence_key", "sentence_labels", "unpatchify", "volume_chunks", "window_sentence"]
