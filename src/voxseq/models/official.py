"""The official AR-SSL4M release (github.com/serena9525/AR-SSL4M) -> voxseq ViT3D weights.

The official pretraining model (``pretrain/model.py``: ``ReconModel`` holding ``model = BaseModel``)
is a LLaMA-style decoder around a Conv3d patch embedding; its state dict (``torch.save`` of
``model.state_dict()``; the released file nests it under ``state_dict``, which the official
downstream code reads with ``torch.load(path)["state_dict"]`` and keeps the keys under ``model.``)
has, for width E, depth L, patch p and MLP width H::

    model.patchifier.proj.weight            (E, 1, p, p, p)  Conv3d over (x, y, z) arrays, with bias
    model.patchifier.proj.bias              (E,)
    model.embed_tokens.weight               (4, E)   nn.Embedding: id 1 = start token, id 2 = end token
    model.layers.i.input_layernorm.{weight,bias}            nn.LayerNorm(E), eps 1e-5
    model.layers.i.self_attn.{q,k,v}_proj.weight  (E, E)   no bias
    model.layers.i.self_attn.o_proj.{weight,bias}           with bias
    model.layers.i.post_attention_layernorm.{weight,bias}   nn.LayerNorm(E), eps 1e-5
    model.layers.i.mlp.linear1.{weight,bias}  (H, E)       MONAI MLPBlock: Linear, GELU (exact), Linear
    model.layers.i.mlp.linear2.{weight,bias}  (E, H)
    model.norm.{weight,bias}                                final nn.LayerNorm(E), eps 1e-5
    decoder_pred.{weight,bias}              (p^3, E)  pixel head (pretraining only)

Positions are fixed 3-axis sin-cos (``pos_type='sincos3d'``, E/3 channels per array axis) with a zero
vector for the start token; the official downstream models (segmentation, COVID, nodule
``base_model.py``) prepend the start token (``embed_tokens`` row 1) to the image tokens, attend
bidirectionally and drop its output. The faithful voxseq encoder is therefore a ViT3D with
``qkv_bias=False``, ``norm_eps=1e-5``, ``pos_embed='sincos3'`` and ``start_token=True``; see
``docs/architecture.md`` for the whole mapping and what is not converted.
"""

from __future__ import annotations

import torch

from voxseq import VoxseqError
from voxseq.models.vit3d import ViTConfig

Q_PROJ = "layers.0.self_attn.q_proj.weight"
OFFICIAL_HEAD_DIM = 64  # the release: 768 wide, 12 heads (not stored in the weights)

_LAYER_MAP = {
    "input_layernorm.weight": "norm1.weight", "input_layernorm.bias": "norm1.bias",
    "self_attn.o_proj.weight": "attn.proj.weight", "self_attn.o_proj.bias": "attn.proj.bias",
    "post_attention_layernorm.weight": "norm2.weight", "post_attention_layernorm.bias": "norm2.bias",
    "mlp.linear1.weight": "mlp.fc1.weight", "mlp.linear1.bias": "mlp.fc1.bias",
    "mlp.linear2.weight": "mlp.fc2.weight", "mlp.linear2.bias": "mlp.fc2.bias",
}


def official_prefix(state: dict[str, torch.Tensor]) -> str | None:
    """The key prefix of the official ``BaseModel`` in ``state`` (``"model."`` in the release and in
    ``ReconModel``, ``""`` for a bare ``BaseModel``, ``"vit."`` in the official UNETR), or None when
    ``state`` is not in the official format."""
    for k in state:
        if k == Q_PROJ or k.endswith("." + Q_PROJ):
            prefix = k[: len(k) - len(Q_PROJ)]
            if prefix + "patchifier.proj.weight" in state:
                return prefix
    return None


def is_official_ar_ssl4m(state: dict[str, torch.Tensor]) -> bool:
    return official_prefix(state) is not None


def _infer_config(state: dict[str, torch.Tensor], prefix: str, num_heads: int | None) -> ViTConfig:
    w = state[prefix + "patchifier.proj.weight"]
    if w.ndim != 5 or len(set(w.shape[2:])) != 1:
        raise VoxseqError(f"official patch embedding {tuple(w.shape)}: voxseq needs cubic 3D patches")
    e, in_chans, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = 0
    while f"{prefix}layers.{depth}.self_attn.q_proj.weight" in state:
        depth += 1
    k = state[f"{prefix}layers.0.self_attn.k_proj.weight"]
    if k.shape[0] != e:
        raise VoxseqError(f"official k_proj {tuple(k.shape)}: grouped key/value heads are not supported")
    hidden = int(state[f"{prefix}layers.0.mlp.linear1.weight"].shape[0])
    if num_heads is None:
        if e % OFFICIAL_HEAD_DIM:
            raise VoxseqError(f"official width {e} is not a multiple of the {OFFICIAL_HEAD_DIM}-wide heads of the "
                              "release; the number of heads is not stored in the weights")
        num_heads = e // OFFICIAL_HEAD_DIM
    cfg = ViTConfig(patch_size=p, in_chans=in_chans, embed_dim=e, depth=depth, num_heads=num_heads,
                    mlp_ratio=hidden / e, qkv_bias=False, norm_eps=1e-5, pos_embed="sincos3", start_token=True)
    if int(e * cfg.mlp_ratio) != hidden:
        raise VoxseqError(f"official MLP width {hidden} is not representable as embed_dim x mlp_ratio")
    return cfg


def convert_ar_ssl4m(state: dict[str, torch.Tensor], num_heads: int | None = None) -> tuple[dict[str, torch.Tensor], ViTConfig]:
    """Official AR-SSL4M weights -> (voxseq state dict, the faithful ViTConfig).

    The result names the encoder ``encoder.*`` (as voxseq's AR checkpoints do), the official end token
    ``end_token`` and the pixel head ``head.*``; keys of other official parts (a fine-tuned UNETR
    decoder, a classification ``score``) keep their names and show up as unexpected in load reports.
    ``num_heads`` defaults to width / 64 (the release's 12 heads of 64).
    """
    prefix = official_prefix(state)
    if prefix is None:
        raise VoxseqError(f"not the official AR-SSL4M format (no '{Q_PROJ}' and 'patchifier.proj.weight' keys)")
    if any(k.startswith(prefix + "pos_embed") for k in state):
        raise VoxseqError("official checkpoint with learnable positions (pos_type='learnable'): only the released "
                          "sin-cos positions (pos_type='sincos3d') are supported")
    cfg = _infer_config(state, prefix, num_heads)
    p = cfg.patch_size
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    # Conv3d over official (x, y, z) arrays -> over voxseq's (z, y, x): kernel axes reversed.
    out["encoder.patch_embed.weight"] = take(prefix + "patchifier.proj.weight").permute(0, 1, 4, 3, 2).contiguous()
    out["encoder.patch_embed.bias"] = take(prefix + "patchifier.proj.bias")
    tokens = take(prefix + "embed_tokens.weight")  # (4, E): ids 0 and 3 are never embedded by the official code
    out["encoder.start_token"] = tokens[1].reshape(1, 1, -1).clone()
    out["end_token"] = tokens[2].reshape(1, 1, -1).clone()
    for i in range(cfg.depth):
        src, dst = f"{prefix}layers.{i}.", f"encoder.blocks.{i}."
        out[dst + "attn.qkv.weight"] = torch.cat([take(src + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0)
        for a, b in _LAYER_MAP.items():
            out[dst + b] = take(src + a)
    out["encoder.norm.weight"] = take(prefix + "norm.weight")
    out["encoder.norm.bias"] = take(prefix + "norm.bias")
    for k in state:  # the pixel head: rows in the official patch order (x, y, z) -> voxseq's (z, y, x)
        for part in ("weight", "bias"):
            if k.endswith("decoder_pred." + part) and state[k].shape[0] == p**3:
                v = take(k)
                out["head." + part] = v.reshape(p, p, p, -1).permute(2, 1, 0, 3).reshape(v.shape).contiguous()
    for k, v in state.items():
        if k not in used:
            out[k] = v
    return out, cfg


__all__ = ["OFFICIAL_HEAD_DIM", "convert_ar_ssl4m", "is_official_ar_ssl4m", "official_prefix"]
