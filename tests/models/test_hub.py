"""The model hub: presets by name, checkpoints back as (model, preprocess, meta) of the class they record."""

from __future__ import annotations

import pytest
import torch

from voxseq import VoxseqError
from voxseq.checkpoint import save_checkpoint
from voxseq.config import to_dict
from voxseq.data.preprocess import Preprocess
from voxseq.models.hub import MODEL_CLASSES, create_model, list_models, load_encoder, load_model, model_class_name
from voxseq.models.unetr import UNETR3D, UNETRConfig
from voxseq.models.vit3d import ARViT3D, ViT3D, vit_config

TINY = dict(patch_size=4, embed_dim=24, depth=2, num_heads=2)


def test_create_model_builds_presets_by_name():
    assert {"tiny", "ar_base", "mae_tiny", "vlp_large"} <= set(list_models())
    ar = create_model("ar_base", depth=1)
    assert type(ar) is ARViT3D and ar.encoder.cfg.embed_dim == 768 and ar.encoder.num_layers == 1
    enc = create_model("tiny", patch_size=8)
    assert type(enc) is ViT3D and enc.cfg == vit_config("tiny", patch_size=8)
    with pytest.raises(VoxseqError, match="unknown model 'ar_huge'"):
        create_model("ar_huge")


def test_every_model_class_has_one_name():
    assert {"ViT3D", "ARViT3D", "MAEViT3D", "UNETR3D", "Classifier", "SigVLP"} <= set(MODEL_CLASSES)
    assert model_class_name(UNETR3D) == "UNETR3D" and model_class_name(create_model("ar_tiny", **TINY)) == "ARViT3D"
    with pytest.raises(VoxseqError, match="not a registered model class"):
        model_class_name(torch.nn.Linear)


def test_load_model_rebuilds_the_recorded_class_with_its_weights(tmp_path):
    torch.manual_seed(0)
    vit = vit_config("tiny", **TINY)
    unetr = UNETRConfig(out_channels=3)
    model = UNETR3D(vit, unetr)
    pre = Preprocess(intensity="window", window="liver")
    save_checkpoint(tmp_path, 5, model, meta={"task": "finetune-seg", "model": to_dict(vit), "unetr": to_dict(unetr),
                                              "preprocess": to_dict(pre), "model_class": model_class_name(model)})
    loaded, got_pre, meta = load_model(tmp_path)
    assert type(loaded) is UNETR3D and not loaded.training and meta["step"] == 5 and got_pre == pre
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    encoder, enc_pre, _ = load_encoder(tmp_path)
    assert torch.equal(encoder.patch_embed.weight, model.encoder.patch_embed.weight) and enc_pre == pre
    with pytest.raises(VoxseqError, match="not a SigVLP checkpoint .made by finetune-seg.; need a VLP run"):
        load_model(tmp_path, expect="SigVLP", hint="need a VLP run")
