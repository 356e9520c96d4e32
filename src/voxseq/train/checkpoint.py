"""The checkpoint store under its former name: everything lives in :mod:`voxseq.checkpoint` (neutral, so the
model hub can read checkpoints without importing the training package). Kept so existing imports work."""

from voxseq.checkpoint import (
    STATE_DICT_KEYS,
    WEIGHTS_SUFFIXES,
    WRAPPER_PREFIXES,
    Checkpoint,
    LoadReport,
    checkpoint_paths,
    checkpoint_to_resume,
    clean_state_dict,
    get_rng_state,
    is_bare_weights,
    latest_checkpoint,
    load_checkpoint,
    load_state_dict_checked,
    read_weights_file,
    save_checkpoint,
    set_rng_state,
    unwrap_model,
)

__all__ = ["STATE_DICT_KEYS", "WEIGHTS_SUFFIXES", "WRAPPER_PREFIXES", "Checkpoint", "LoadReport", "checkpoint_paths",
           "checkpoint_to_resume", "clean_state_dict", "get_rng_state", "is_bare_weights", "latest_checkpoint",
           "load_checkpoint", "load_state_dict_checked", "read_weights_file", "save_checkpoint", "set_rng_state",
           "unwrap_model"]
