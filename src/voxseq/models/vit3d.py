"""A 3D Vision Transformer for volumes and token sequences, and the AR-SSL4M pretraining model.

One file, read top to bottom like the paper: config -> positions -> attention (prefix-causal) ->
blocks -> encoder (``ViT3D``) -> autoregressive model (``ARViT3D``). Models compute no losses.

Shapes: images (B, C, D, H, W); flattened patches ("tokens" before embedding) (B, L, C*p^3);
embedded tokens (B, L, E); positions (B, L, 4) = (sub-volume, z, y, x) in patch units (sin-cos), or
(B, L, 3) = (z, y, x) (3-axis sin-cos and 3D rotary; a 4-column position's first column is ignored there).

Positions come in three kinds (``ViTConfig.pos_embed``): ``sincos`` adds fixed sin-cos vectors of
(sub-volume, z, y, x) to the tokens (AR-SSL4M); ``sincos3`` adds the official AR-SSL4M release's 3-axis
sin-cos (x, y, z) (models converted from it, see ``voxseq.models.official``); ``rope3d`` rotates
queries and keys inside attention by angles proportional to each token's (z, y, x), the head
dimension split between the three axes (SigVLP). Rotary attention scores depend only on relative
positions, so the number of slices is unconstrained: a model trained on 64-slice chunks runs on a
300-slice volume without interpolating anything.

``ViTConfig.start_token`` prepends a learned token (position zero) to image inputs and drops its
output, as the official AR-SSL4M downstream models do with their pretrained start token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from voxseq import VoxseqError
from voxseq.sequence.samplers import POS_ORIGINS


@dataclass
class ViTConfig:
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    # sincos: fixed sin-cos over (sub-volume, z, y, x); sincos3: official AR-SSL4M 3-axis; rope3d: rotary (z, y, x)
    pos_embed: str = "sincos"
    pos_theta: float = 10000.0
    rope_split: list[float] = field(default_factory=lambda: [2.0, 3.0, 3.0])  # head-dim shares of (z, y, x)
    attn_backend: str = "sdpa"  # "sdpa" everywhere; "flex" (CUDA only) skips fully masked blocks
    use_end_token: bool = False  # AR model: append a learned end token after the last token
    # AR model: residual MLP blocks between the encoder and the pixel head (AIM's prediction head), dropped after
    # pretraining; 0 = the linear pixel head of the paper and the official code
    head_depth: int = 0
    start_token: bool = False  # prepend a learned token (position 0) to images, drop its output (official AR-SSL4M)
    # where positions count from: "crop" - the corner of whatever the encoder is given (the paper: crops in
    # pretraining, ROI crops in fine-tuning); "volume" - the scan's first voxel, so that a token has one position
    # in pretraining crops, fine-tuning crops, sliding windows and whole-volume embedding alike (callers pass each
    # input's start, ``origin_zyx``)
    pos_origin: str = "crop"

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise VoxseqError(f"model.embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pos_embed == "sincos" and self.embed_dim % 8:
            raise VoxseqError(f"model.embed_dim {self.embed_dim} must be a multiple of 8 for 4-axis sin-cos positions")
        if self.pos_embed == "sincos3" and self.embed_dim % 6:
            raise VoxseqError(f"model.embed_dim {self.embed_dim} must be a multiple of 6 for 3-axis sin-cos positions")
        if self.pos_embed not in ("sincos", "sincos3", "rope3d"):
            raise VoxseqError(f"model.pos_embed {self.pos_embed!r} is not supported (known: sincos, sincos3, rope3d)")
        if self.pos_embed == "rope3d":
            if len(self.rope_split) != 3 or min(self.rope_split) < 0 or sum(self.rope_split) <= 0:
                raise VoxseqError(f"model.rope_split must be three non-negative shares (z, y, x), not {self.rope_split}")
            if (self.embed_dim // self.num_heads) % 2:
                raise VoxseqError("model.pos_embed=rope3d needs an even head dimension (embed_dim / num_heads)")
        if self.pos_origin not in POS_ORIGINS:
            raise VoxseqError(f"model.pos_origin must be one of {POS_ORIGINS}, not {self.pos_origin!r}")
        if self.attn_backend not in ("sdpa", "flex"):
            raise VoxseqError(f"model.attn_backend must be 'sdpa' or 'flex', not {self.attn_backend!r}")
        if self.head_depth < 0:
            raise VoxseqError(f"model.head_depth must be >= 0, not {self.head_depth}")

    @property
    def token_dim(self) -> int:
        return self.in_chans * self.patch_size**3


VIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
    "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),  # the paper's ViT-B
    "large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
}


def vit_config(preset: str = "base", **overrides: Any) -> ViTConfig:
    """A :class:`ViTConfig` from a preset name plus field overrides."""
    if preset not in VIT_PRESETS:
        raise VoxseqError(f"unknown model preset {preset!r} (known: {', '.join(VIT_PRESETS)})")
    return ViTConfig(**{**VIT_PRESETS[preset], **overrides})


# ---------------------------------------------------------------------------- positions


def sincos_embed(pos: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos embedding of (..., 4) positions (sub-volume, z, y, x) -> (..., dim).

    Each of the four components gets dim/4 channels (half sin, half cos, geometric frequencies), so
    tokens at the same place in different sub-volumes (contrast or semantic sequences) still differ,
    and fractional positions (slabs offset by half a patch) are represented exactly.
    """
    d = dim // 4
    freqs = theta ** (-torch.arange(0, d // 2, device=pos.device, dtype=torch.float32) / (d // 2))  # (d/2,)
    angles = pos.float()[..., None] * freqs  # (..., 4, d/2)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 4, d)
    return emb.flatten(-2)


def sincos3_embed(pos: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The official AR-SSL4M 3-axis sin-cos of (..., 3|4) positions (..., z, y, x) -> (..., dim).

    As in the official ``SinCosPosEmbed`` (pretrain/model.py): dim/3 channels per axis, each
    [sin | cos] of pos * theta^(-i / (dim/6)) for i < dim/6, the axes concatenated in the official
    arrays' order (x, y, z) - the official code reads volumes as (x, y, z) arrays, voxseq as (z, y, x).
    A 4-column position's first column (sub-volume) is ignored.
    """
    d = dim // 3
    freqs = theta ** (-torch.arange(0, d // 2, device=pos.device, dtype=torch.float32) / (d // 2))  # (d/2,)
    xyz = pos[..., -3:].float().flip(-1)  # (z, y, x) -> (x, y, z)
    angles = xyz[..., None] * freqs  # (..., 3, d/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def grid_positions(grid_dhw: tuple[int, int, int], device=None) -> torch.Tensor:
    """(N, 4) positions (0, z, y, x) of an image's patch grid in z-major token order."""
    zz, yy, xx = torch.meshgrid(*[torch.arange(g, device=device, dtype=torch.float32) for g in grid_dhw], indexing="ij")
    return torch.stack([torch.zeros_like(zz), zz, yy, xx], dim=-1).reshape(-1, 4)


def rope_axis_dims(head_dim: int, split: list[float]) -> list[int]:
    """Rotated channels per axis (z, y, x): even shares of the head dimension; what is left stays unrotated.

    The reference split 2:3:3 of a 64-wide head gives (16, 24, 24)."""
    total = float(sum(split))
    return [int(head_dim * s / total) // 2 * 2 for s in split]


def rope_angles(pos: torch.Tensor, head_dim: int, split: list[float], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (B, 1, L, R/2), of 3D rotary embedding for positions (B, L, 3) = (z, y, x).

    Axis a gets d_a rotated channels (pairs) with frequencies theta^(-2i/d_a), as 1D RoPE per axis; the
    pairs of the three axes are concatenated. Fractional positions are fine.
    """
    pos = pos[..., -3:].float()
    parts = []
    for a, d in enumerate(rope_axis_dims(head_dim, split)):
        if d == 0:
            continue
        freqs = theta ** (-torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d)  # (d/2,)
        parts.append(pos[..., a, None] * freqs)  # (B, L, d/2)
    angles = torch.cat(parts, dim=-1)[:, None]  # (B, 1, L, R/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (B, h, L, d) by the angles; channels past 2 * R/2 pass unchanged."""
    cos, sin = rope
    r = 2 * cos.shape[-1]
    rot = x[..., :r].float().unflatten(-1, (-1, 2))  # (B, h, L, R/2, 2)
    a, b = rot[..., 0], rot[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([out, x[..., r:]], dim=-1) if r < x.shape[-1] else out


# ---------------------------------------------------------------------------- attention


def prefix_causal_mask(length: int, prefix_len: torch.Tensor | int, device=None) -> torch.Tensor:
    """(B, 1, L, L) boolean mask, True where query i may attend to key j.

    The first ``prefix_len[b]`` tokens attend to each other in both directions; every later token
    attends causally (to all tokens before it and to itself). ``prefix_len`` 0 or 1 is plain causal.
    """
    if isinstance(prefix_len, int):
        prefix_len = torch.tensor([prefix_len], device=device)
    prefix_len = prefix_len.to(device)
    i = torch.arange(length, device=device)
    causal = i[None, :] <= i[:, None]  # (L, L): key j <= query i
    in_prefix = i[None, :] < prefix_len[:, None]  # (B, L)
    both = in_prefix[:, :, None] & in_prefix[:, None, :]  # (B, L, L)
    return (causal[None] | both)[:, None]


def key_padding_mask(token_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) True for real tokens -> (B, 1, 1, N) attention mask: no token attends to padding."""
    return token_mask[:, None, None, :].bool()


def packed_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """(R, L) segment ids -> (R, 1, L, L) bool, True where query and key are tokens of the same chunk.

    A padding query attends to itself only, so no row is all False (SDPA would return NaN for it).
    """
    same = (segment[:, :, None] == segment[:, None, :]) & (segment >= 0)[:, :, None]
    pad_self = torch.eye(segment.shape[1], dtype=torch.bool, device=segment.device) & (segment < 0)[:, :, None]
    return (same | pad_self)[:, None]


def _flex_prefix_attention(q, k, v, prefix_len):  # pragma: no cover - CUDA path
    """flex_attention with a block mask: blocks that are fully masked are skipped, not computed."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, qi, kv):
        return (kv <= qi) | ((qi < prefix_len[b]) & (kv < prefix_len[b]))

    block = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
    return flex_attention(q, k, v, block_mask=block)


@dataclass
class SegmentPlan:
    """Where the tokens of each packed segment sit in the flattened (R * L) rows, grouped into buckets of
    segments of similar length: per bucket a (n, m) flat index and a (n, m) validity mask (m = its longest
    segment). Built once per forward by :func:`segment_plan` and shared by every block."""

    buckets: list[tuple[torch.Tensor, torch.Tensor]]


def segment_plan(segment: torch.Tensor, bucket_ratio: float = 0.75) -> SegmentPlan:
    """Plan attention within each segment of packed rows: ``segment`` (R, L) ids, -1 for padding (ids are
    compared within a row, as :func:`packed_attention_mask` does). Segments sorted by
    length go into one bucket while they are at least ``bucket_ratio`` of its longest, so padding inside a
    bucket stays small and each bucket is one SDPA call on (n, m) instead of every row's L x L scores."""
    r, length = segment.shape
    seg = segment.detach().to("cpu", torch.long)
    flat = (seg + (seg.max().clamp_min(0) + 1) * torch.arange(r)[:, None]).reshape(-1)  # ids unique across rows
    flat[seg.reshape(-1) < 0] = -1
    where = torch.nonzero(flat >= 0).squeeze(1)
    keys = flat[where]
    order = torch.argsort(keys, stable=True)
    where, keys = where[order], keys[order]
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    groups = list(torch.split(where, counts.tolist()))
    groups.sort(key=len, reverse=True)
    buckets, current = [], []
    for g in groups:
        if current and len(g) < bucket_ratio * len(current[0]):
            buckets.append(current)
            current = []
        current.append(g)
    if current:
        buckets.append(current)
    plan = []
    for bucket in buckets:
        m = len(bucket[0])
        idx = torch.zeros(len(bucket), m, dtype=torch.long)
        valid = torch.zeros(len(bucket), m, dtype=torch.bool)
        for i, g in enumerate(bucket):
            idx[i, :len(g)], valid[i, :len(g)] = g, True
        plan.append((idx.to(segment.device), valid.to(segment.device)))
    return SegmentPlan(plan)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """Attention of (B, h, L, d) packed rows within each segment only, bucket by bucket through SDPA; equal
    to SDPA with the block-diagonal ``packed_attention_mask`` (a padding token attends to itself only, so its
    output is its own value)."""
    b, h, n, d = q.shape
    qf, kf, vf = (t.transpose(1, 2).reshape(b * n, h, d) for t in (q, k, v))
    out = vf
    for idx, valid in plan.buckets:
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        o = F.scaled_dot_product_attention(qf[idx].transpose(1, 2), kf[idx].transpose(1, 2), vf[idx].transpose(1, 2),
                                           attn_mask=mask)  # (n_seg, h, m, d)
        out = out.index_put((idx[valid],), o.transpose(1, 2)[valid])
    return out.view(b, n, h, d).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, through SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                prefix_len: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                segments: SegmentPlan | None = None) -> torch.Tensor:
        b, n, e = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, d)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if segments is not None:
            out = segment_attention(q, k, v, segments)
        elif self.backend == "flex" and prefix_len is not None and x.is_cuda:
            out = _flex_prefix_attention(q, k, v, prefix_len)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        return self.proj(out.transpose(1, 2).reshape(b, n, e))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch for whole samples with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig, drop_path_rate: float = 0.0):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        hidden = int(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, mask=None, is_causal: bool = False, prefix_len=None, rope=None,
                segments: SegmentPlan | None = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), mask, is_causal, prefix_len, rope, segments), self.drop_path_rate,
                          self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


# ---------------------------------------------------------------------------- the encoder


class ViT3D(nn.Module):
    """3D ViT encoder: Conv3d patch embedding, 3D positions (sin-cos or rotary), pre-LN blocks, final LN.

    Takes images of any D, H, W that are multiples of the patch size (positions are computed for
    the actual grid, no interpolation), or flattened token sequences with explicit positions.
    ``token_mask`` (B, N), True for real tokens, keeps padding tokens out of every token's attention.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embed = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=p, stride=p)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList([Block(cfg, r) for r in rates])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.apply(_init_weights)
        w = self.patch_embed.weight.data  # as MAE: init the patch projection like a Linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        self.start_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.start_token else None
        if self.start_token is not None:
            nn.init.normal_(self.start_token, std=0.02)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay besides norms and biases (positions are fixed)."""
        return {"start_token"} if self.start_token is not None else set()

    # -- embeddings

    @property
    def uses_rope(self) -> bool:
        return self.cfg.pos_embed == "rope3d"

    def rope_for(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary (cos, sin) for positions (B, L, 3|4), or None with sin-cos positions."""
        if not self.uses_rope:
            return None
        return rope_angles(pos, self.cfg.embed_dim // self.cfg.num_heads, self.cfg.rope_split, self.cfg.pos_theta)

    def position_embedding(self, pos: torch.Tensor) -> torch.Tensor:
        """Additive position vectors (..., E) of positions (..., 4) (sin-cos kinds only)."""
        if self.cfg.pos_embed == "sincos3":
            return sincos3_embed(pos, self.cfg.embed_dim, self.cfg.pos_theta)
        return sincos_embed(pos, self.cfg.embed_dim, self.cfg.pos_theta)

    def embed_tokens(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Flattened patches (B, L, C*p^3) + positions (B, L, 4) -> (B, L, E) (sin-cos added; rotary: none here).

        Uses the Conv3d weight as a linear map, so image and token paths share weights exactly.
        """
        w = self.patch_embed.weight.flatten(1)  # (E, C*p^3), in (C, pz, py, px) order
        x = F.linear(tokens, w, self.patch_embed.bias)
        if self.uses_rope:
            return x
        return x + self.position_embedding(pos).to(x.dtype)

    def image_positions(self, grid: tuple[int, int, int], origin_zyx=None, device=None) -> torch.Tensor:
        """(1 or B, N, 4) positions of an image's patch grid: counted from its corner, or with
        ``pos_origin="volume"`` from the scan's first voxel, ``origin_zyx`` (B, 3) or (3,) being where each
        input starts in its scan, in voxels (None: at the scan's origin). Ignored with ``pos_origin="crop"``."""
        pos = grid_positions(grid, device)[None]  # (1, N, 4)
        if origin_zyx is None or self.cfg.pos_origin == "crop":
            return pos
        origin = torch.as_tensor(origin_zyx, dtype=torch.float32, device=device).reshape(-1, 3) / self.cfg.patch_size
        return pos + F.pad(origin, (1, 0))[:, None, :]  # (B, N, 4): the sub-volume column stays 0

    def embed_image(self, x: torch.Tensor, origin_zyx=None) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(B, C, D, H, W) -> tokens (B, N, E) (sin-cos positions added), and the (gd, gh, gw) grid."""
        p = self.cfg.patch_size
        if any(s % p for s in x.shape[2:]):
            raise VoxseqError(f"input size {tuple(x.shape[2:])} is not a multiple of the patch size {p}; pad it first")
        x = self.patch_embed(x)  # (B, E, gd, gh, gw)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # (B, N, E)
        if self.uses_rope:
            return x, grid  # type: ignore[return-value]
        pos = self.image_positions(grid, origin_zyx, x.device)  # type: ignore[arg-type]
        return x + self.position_embedding(pos).to(x.dtype), grid  # type: ignore[return-value]

    # -- trunk

    def run_blocks(self, x: torch.Tensor, mask=None, is_causal: bool = False, prefix_len=None,
                   indices: set[int] | None = None, rope=None,
                   segments: SegmentPlan | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        taken = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask, is_causal, prefix_len, rope, segments)
            if indices is not None and i in indices:
                taken.append(x)
        return x, taken

    def _image_trunk(self, x: torch.Tensor, token_mask: torch.Tensor | None, indices: set[int] | None = None,
                     origin_zyx=None):
        x, grid = self.embed_image(x, origin_zyx)
        pos = self.image_positions(grid, origin_zyx, x.device)  # (1 or B, N, 4)
        if self.start_token is not None:  # [start, t_0, ...]: the start token sits at position 0 (nothing added)
            x = torch.cat([self.start_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            pos = torch.cat([pos.new_zeros(pos.shape[0], 1, pos.shape[-1]), pos], dim=1)
            if token_mask is not None:
                token_mask = torch.cat([token_mask.new_ones(token_mask.shape[0], 1), token_mask.bool()], dim=1)
        rope = self.rope_for(pos) if self.uses_rope else None
        mask = key_padding_mask(token_mask) if token_mask is not None else None
        x, taken = self.run_blocks(x, mask, indices=indices, rope=rope)
        if self.start_token is not None:  # outputs of the image tokens only
            x, taken = x[:, 1:], [t[:, 1:] for t in taken]
        return x, taken

    def forward_features(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                         origin_zyx=None) -> torch.Tensor:
        """(B, C, D, H, W) -> normalised token features (B, N, E), bidirectional attention. ``origin_zyx``:
        where each input starts in its scan, in voxels (used with ``pos_origin="volume"``)."""
        x, _ = self._image_trunk(x, token_mask, origin_zyx=origin_zyx)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: list[int], token_mask: torch.Tensor | None = None,
                              origin_zyx=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Outputs (B, N, E) of the given blocks (0-based; UNETR skips: 3, 6, 9 of 12) and the final features."""
        bad = [i for i in indices if not 0 <= i < self.num_layers]
        if bad:
            raise VoxseqError(f"block indices {bad} outside 0..{self.num_layers - 1}")
        x, taken = self._image_trunk(x, token_mask, set(indices), origin_zyx)
        order = sorted(set(indices))
        by_index = dict(zip(order, taken))
        return [by_index[i] for i in indices], self.norm(x)

    def forward_tokens(self, tokens: torch.Tensor, pos: torch.Tensor, mask=None, is_causal: bool = False,
                       segment: torch.Tensor | None = None) -> torch.Tensor:
        """Token sequences (B, L, C*p^3) with positions (B, L, 4) ((B, L, 3) suffices for rotary) -> (B, L, E).

        ``mask`` (B, 1, L, L) bool, e.g. block-diagonal for several chunks packed into one row. ``segment``
        (B, L) ids (-1: padding) instead: tokens attend within their segment only, computed per segment
        (:func:`segment_attention`), not as L x L scores of which most are masked; equal to
        ``mask=packed_attention_mask(segment)`` within float tolerance."""
        if self.start_token is not None:
            raise VoxseqError("model.start_token applies to image inputs (forward_features, forward_intermediates), "
                              "not to token sequences")
        if segment is not None and mask is not None:
            raise VoxseqError("forward_tokens takes a mask or segment ids, not both")
        plan = segment_plan(segment) if segment is not None else None
        x, _ = self.run_blocks(self.embed_tokens(tokens, pos), mask, is_causal, rope=self.rope_for(pos), segments=plan)
        return self.norm(x)

    def forward(self, x: torch.Tensor, origin_zyx=None) -> torch.Tensor:
        return self.forward_features(x, origin_zyx=origin_zyx)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------- AR-SSL4M


class ARViT3D(nn.Module):
    """The autoregressive pretraining model: encoder + learned start (and end) token + pixel head.

    The transformer reads ``[start, t_0, ..., t_{L-1}]`` (and a learned end token when
    ``use_end_token``); its output at the position of ``t_{j-1}`` (or of ``start`` for j = 0) is the
    prediction of ``t_j``. With prefix length P, the start token and ``t_0..t_{P-1}`` attend to each
    other in both directions and later tokens causally, so predictions of ``t_j`` for j >= P never see
    ``t_j``; those for j < P do, and the loss excludes them. ``forward`` returns (B, L, C*p^3).

    With ``cfg.head_depth`` > 0, that many residual MLP blocks (pre-LN, each token on its own) sit between
    the encoder's final norm and the linear pixel head, as in AIM (El-Nouby et al. 2024, whose attention
    scheme AR-SSL4M extends): the head takes over the last steps of pixel prediction, so the encoder's
    own blocks need not specialise in it. The head is dropped with the rest of the AR model downstream.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.pos_embed != "sincos":
            raise VoxseqError("AR-SSL4M pretraining uses sin-cos positions (model.pos_embed=sincos)")
        if cfg.start_token:
            raise VoxseqError("model.start_token is an encoder option (official AR-SSL4M downstream models); "
                              "the AR model prepends its own start token")
        self.cfg = cfg
        self.encoder = ViT3D(cfg)
        self.start_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.end_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.use_end_token else None
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.head_blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps), nn.Linear(cfg.embed_dim, hidden), nn.GELU(),
                          nn.Linear(hidden, cfg.embed_dim)) for _ in range(cfg.head_depth))
        self.head_blocks.apply(_init_weights)
        self.head = nn.Linear(cfg.embed_dim, cfg.token_dim)
        nn.init.normal_(self.start_token, std=0.02)
        if self.end_token is not None:
            nn.init.normal_(self.end_token, std=0.02)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        names = {"start_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return names | ({"end_token"} if self.end_token is not None else set())

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        b, length, _ = tokens.shape
        x = self.encoder.embed_tokens(tokens, pos)  # (B, L, E)
        parts = [self.start_token.expand(b, -1, -1).to(x.dtype), x]
        if self.end_token is not None:
            parts.append(self.end_token.expand(b, -1, -1).to(x.dtype))
        x = torch.cat(parts, dim=1)  # (B, 1 + L [+ 1], E)
        prefix_len = prefix_len.to(x.device)
        if bool((prefix_len == 0).all()):  # pure causal: SDPA's fused causal path, no mask tensor
            mask, causal = None, True
        else:
            mask, causal = prefix_causal_mask(x.shape[1], prefix_len + 1, x.device), False
        x, _ = self.encoder.run_blocks(x, mask, causal, prefix_len + 1)
        x = self.encoder.norm(x[:, :length])  # outputs at start, t_0 .. t_{L-2}
        for block in self.head_blocks:
            x = x + block(x)
        return self.head(x)  # (B, L, C*p^3): prediction of t_0 .. t_{L-1}


def build_ar_model(cfg: ViTConfig | str, **overrides: Any) -> ARViT3D:
    """The AR-SSL4M model from a config or a preset name."""
    cfg = vit_config(cfg, **overrides) if isinstance(cfg, str) else replace(cfg, **overrides)
    return ARViT3D(cfg)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: ViTConfig, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token of the trunk (and embedding/head): 2 * params-in-matmuls + attention.

    Training counts forward + backward as 3x forward (the usual 6 * N * tokens rule).
    """
    e, h = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    per_layer = 2 * (3 * e * e + e * e + 2 * e * h) + 2 * 2 * seq_len * e  # qkv, proj, mlp; QK^T and AV
    total = cfg.depth * per_layer + 2 * 2 * e * cfg.token_dim + cfg.head_depth * 2 * 2 * e * h  # + embedding, head
    return total * (3 if training else 1)


__all__ = ["ARViT3D", "Attention", "Block", "VIT_PRESETS", "ViT3D", "ViTConfig", "apply_rope", "build_ar_model",
           "count_params", "flops_per_token", "grid_positions", "key_padding_mask", "packed_attention_mask", "prefix_causal_mask", "rope_angles",
           "rope_axis_dims", "segment_attention", "segment_plan", "sincos3_embed", "sincos_embed", "vit_config"]
