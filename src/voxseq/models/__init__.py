"""Models: the 3D ViT encoder and the AR-SSL4M pretraining model (no losses here)."""

from voxseq.models.vit3d import (
    VIT_PRESETS,
    ARViT3D,
    ViT3D,
    ViTConfig,
    build_ar_model,
    count_params,
    apply_rope,
    flops_per_token,
    key_padding_mask,
    prefix_causal_mask,
    rope_angles,
    sincos3_embed,
    sincos_embed,
    vit_config,
)

__all__ = ["VIT_PRESETS", "ARViT3D", "ViT3D", "ViTConfig", "build_ar_model", "count_params", "flops_per_token",
           "apply_rope", "key_padding_mask", "prefix_causal_mask", "rope_angles", "sincos3_embed", "sincos_embed",
           "vit_config"]
