"""voxseq: foundation models of 3D medical images.

Two methods, end to end: AR-SSL4M (autoregressive sequence pretraining of a 3D ViT) and SigVLP
(variable-size CT vision-language pretraining). Heavy modules (torch, MONAI) are imported only by the
subpackages that need them, so ``import voxseq`` and the CLI's help stay fast.
"""

__version__ = "0.1.0"


class VoxseqError(Exception):
    """An error caused by the user's input (a bad file, a missing path, a wrong setting).

    The CLI prints its message as one line, without a traceback, and exits with code 2.
    Messages name the file or setting at fault and the cause.
    """


# The Python API, imported on first use (PEP 562) so that ``import voxseq`` loads no torch:
#   from voxseq import read_volume, load_encoder, embed
#   encoder, preprocess, meta = load_encoder("runs/ar_tiny")
#   features = embed(encoder, preprocess, "scan.nii.gz", per_token=True)["features"]
_API = {
    "read_volume": "voxseq.io.volume",
    "Volume": "voxseq.io.volume",
    "Preprocess": "voxseq.data.preprocess",
    "ViT3D": "voxseq.models.vit3d",
    "ViTConfig": "voxseq.models.vit3d",
    "vit_config": "voxseq.models.vit3d",
    "token_features": "voxseq.models.features",
    "load_encoder": "voxseq.models.hub",
    "load_model": "voxseq.models.hub",
    "create_model": "voxseq.models.hub",
    "embed": "voxseq.tasks.encoders",
    "TrainConfig": "voxseq.train.loop",
    "fit": "voxseq.train.loop",
}
__all__ = ["VoxseqError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'voxseq' has no attribute {name!r}")
