"""Volume IO: ``read_volume`` / ``write_volume`` and the canonical :class:`Volume`."""

from voxseq.io.volume import (
    CANONICAL_ORIENTATION,
    VOLUME_FORMATS,
    VOLUME_SUFFIXES,
    Volume,
    VolumeReadError,
    list_dicom_series,
    orientation_code,
    read_volume,
    register_volume_format,
    write_volume,
)

__all__ = ["CANONICAL_ORIENTATION", "VOLUME_FORMATS", "VOLUME_SUFFIXES", "Volume", "VolumeReadError", "list_dicom_series",
           "orientation_code", "read_volume", "register_volume_format", "write_volume"]
