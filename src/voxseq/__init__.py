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
