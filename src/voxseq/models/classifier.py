"""Volume classification on the voxseq ViT: mean-pooled tokens -> a linear or MLP head -> one logit."""

from __future__ import annotations

import torch
from torch import nn

from voxseq import VoxseqError
from voxseq.models.vit3d import ViT3D, ViTConfig


class Classifier(nn.Module):
    """Encoder -> mean-pooled tokens (B, E) -> logit (B,)."""

    def __init__(self, vit: ViTConfig, head: str = "linear"):
        super().__init__()
        self.encoder = ViT3D(vit)
        e = vit.embed_dim
        if head == "linear":
            self.head = nn.Linear(e, 1)
        elif head == "mlp":
            self.head = nn.Sequential(nn.Linear(e, e), nn.GELU(), nn.Linear(e, 1))
        else:
            raise VoxseqError(f"head must be 'linear' or 'mlp', not {head!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_features(x).mean(1))[:, 0]


__all__ = ["Classifier"]
