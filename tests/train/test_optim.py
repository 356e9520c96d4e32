"""Parameter groups, layer-wise lr decay and the warmup-cosine schedule."""

from __future__ import annotations

import math

import pytest

from voxseq.models import ViTConfig, build_ar_model
from voxseq.train.optim import layer_id, param_groups, param_groups_lrd, warmup_cosine


def test_no_decay_on_norms_biases_and_special_tokens():
    model = build_ar_model(ViTConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2))
    decay, rest = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    rest_names = {names[id(p)] for p in rest["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "start_token" in rest_names and "encoder.norm.weight" in rest_names
    assert "encoder.blocks.0.attn.qkv.bias" in rest_names
    assert "encoder.blocks.0.attn.qkv.weight" in decay_names and "encoder.patch_embed.weight" in decay_names
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0


def test_layer_wise_decay_scales():
    model = build_ar_model(ViTConfig(patch_size=4, embed_dim=32, depth=4, num_heads=2))
    assert layer_id("encoder.patch_embed.weight", 4) == 0 and layer_id("encoder.blocks.2.mlp.fc1.weight", 4) == 3
    assert layer_id("head.weight", 4) == 5
    groups = param_groups_lrd(model, 0.05, 0.75, 4)
    by_layer = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert by_layer[5] == 1.0 and by_layer[0] == pytest.approx(0.75**5) and by_layer[3] == pytest.approx(0.75**2)


def test_warmup_cosine_values():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(35, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
