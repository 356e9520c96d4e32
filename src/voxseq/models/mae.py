"""A masked autoencoder on the 3D ViT (MAE, He et al. 2022; MAE3D in medical imaging): the baseline that
AR-SSL4M is measured against, on the same encoder.

Read like MAE's ``models_mae.py``: random masking (keep a random subset of each sequence's tokens),
the encoder (``ViT3D``) on the visible tokens only, a light decoder that puts a learned mask token at
every hidden place, adds positions and predicts every token's voxels. The model computes no loss;
``voxseq.objectives.ar.norm_pixel_loss`` over the masked tokens is MAE's norm-pixel loss.

Shapes: tokens (B, L, C*p^3), positions (B, L, 4) = (sub-volume, z, y, x) in patch units, as the
sequence samplers give them; ``mask`` (B, L) True where a token was hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from voxseq import VoxseqError
from voxseq.models.vit3d import Block, ViT3D, ViTConfig, sincos_embed


@dataclass
class MAEDecoderConfig:
    embed_dim: int = 512  # MAE's ViT-B decoder: 8 blocks of width 512
    depth: int = 8
    num_heads: int = 16


def random_masking(batch: int, length: int, ratio: float, generator: torch.Generator | None = None,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep (B, K) indices of the visible tokens in sequence order, mask (B, L) True where hidden).

    Each sequence hides ``round(L * ratio)`` tokens chosen uniformly (MAE: argsort of uniform noise);
    at least one token stays visible."""
    if not 0.0 <= ratio < 1.0:
        raise VoxseqError(f"mask_ratio must be in [0, 1), not {ratio}")
    n_keep = max(1, length - int(round(length * ratio)))
    noise = torch.rand(batch, length, generator=generator)
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values  # (B, K), in sequence order
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask.scatter_(1, keep, False)
    return keep.to(device), mask.to(device)


class MAEViT3D(nn.Module):
    """The MAE pretraining model: ``encoder`` (the ViT3D every downstream command loads) + decoder."""

    def __init__(self, cfg: ViTConfig, decoder: MAEDecoderConfig | None = None):
        super().__init__()
        if cfg.pos_embed != "sincos":
            raise VoxseqError("MAE pretraining uses sin-cos positions (model.pos_embed=sincos)")
        if cfg.start_token:
            raise VoxseqError("model.start_token is an encoder option of official AR-SSL4M models, not of MAE")
        dec = decoder or MAEDecoderConfig()
        if dec.embed_dim % dec.num_heads or dec.embed_dim % 8:
            raise VoxseqError(f"mae decoder embed_dim {dec.embed_dim} must divide by num_heads {dec.num_heads} and by 8")
        self.cfg, self.decoder_cfg = cfg, dec
        self.encoder = ViT3D(cfg)
        dcfg = replace(cfg, embed_dim=dec.embed_dim, depth=dec.depth, num_heads=dec.num_heads, drop_path_rate=0.0)
        self.decoder_embed = nn.Linear(cfg.embed_dim, dec.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec.embed_dim))
        self.decoder_blocks = nn.ModuleList([Block(dcfg) for _ in range(dec.depth)])
        self.decoder_norm = nn.LayerNorm(dec.embed_dim, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(dec.embed_dim, cfg.token_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def forward_encoder(self, tokens: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Visible tokens only: (B, K, E) normalised encoder features."""
        x = self.encoder.embed_tokens(tokens, pos)  # (B, L, E), positions added before dropping tokens
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, E)
        x, _ = self.encoder.run_blocks(x)
        return self.encoder.norm(x)

    def forward_decoder(self, latent: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, K, E) visible features -> (B, L, C*p^3) predictions of every token."""
        b, length = pos.shape[:2]
        y = self.decoder_embed(latent)  # (B, K, Ed)
        full = self.mask_token.to(y.dtype).expand(b, length, -1).clone()  # (B, L, Ed)
        full.scatter_(1, keep[..., None].expand(-1, -1, y.shape[-1]), y)
        full = full + sincos_embed(pos, full.shape[-1], self.cfg.pos_theta).to(full.dtype)
        for blk in self.decoder_blocks:
            full = blk(full)
        return self.decoder_pred(self.decoder_norm(full))

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Predictions (B, L, C*p^3) of every token, the encoder having seen the ``keep`` tokens only."""
        return self.forward_decoder(self.forward_encoder(tokens, pos, keep), pos, keep)


__all__ = ["MAEDecoderConfig", "MAEViT3D", "random_masking"]
