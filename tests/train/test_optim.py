"""Parameter groups, layer-wise lr decay, the warmup-cosine schedule and the Muon + AdamW split."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from voxseq.models import ViTConfig, build_ar_model
from voxseq.train.optim import (
    build_optimizers,
    layer_id,
    muon_param_split,
    param_groups,
    param_groups_lrd,
    set_lr_all,
    warmup_cosine,
)


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


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.attn.proj(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))


class TinyVLP(nn.Module):
    """A ViT-like image tower, a Hugging-Face-like text tower and the SigLIP scalars, with the names that matter."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.patch_embed = nn.Conv3d(1, dim, 2, stride=2)
        self.blocks = nn.ModuleList([Block(dim)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)
        self.image_proj = nn.Linear(dim, dim, bias=False)
        self.text = nn.Module()
        self.text.embeddings = nn.Module()
        self.text.embeddings.word_embeddings = nn.Embedding(20, dim)
        self.text.encoder = nn.Module()
        self.text.encoder.layer = nn.ModuleList([nn.Module()])
        self.text.encoder.layer[0].query = nn.Linear(dim, dim)
        self.text.encoder.layers = nn.ModuleList([nn.Module()])
        self.text.encoder.layers[0].q_proj = nn.Linear(dim, dim)
        self.text.encoder.layers[0].relative_bias = nn.Embedding(4, 2)  # an embedding inside a layer: AdamW
        self.text.pooler = nn.Linear(dim, dim)
        self.logit_scale, self.logit_bias = nn.Parameter(torch.tensor(2.3)), nn.Parameter(torch.tensor(-10.0))
        self.frozen = nn.Parameter(torch.ones(dim, dim), requires_grad=False)

    def forward(self, x):  # x (B, 1, 4, 4, 4) -> (B, 3)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, 8, dim)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.head(self.norm(tokens).mean(1))


def test_muon_split_is_exact():
    muon, adamw = muon_param_split(TinyVLP())
    assert [n for n, _ in muon] == ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight",
                                    "blocks.0.mlp.fc2.weight", "text.encoder.layer.0.query.weight",
                                    "text.encoder.layers.0.q_proj.weight"]
    assert sorted(n for n, _ in adamw) == sorted([
        "patch_embed.weight", "patch_embed.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
        "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.bias", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.bias",
        "norm.weight", "norm.bias", "head.weight", "head.bias", "image_proj.weight",
        "text.embeddings.word_embeddings.weight", "text.encoder.layer.0.query.bias",
        "text.encoder.layers.0.q_proj.bias", "text.encoder.layers.0.relative_bias.weight",
        "text.pooler.weight", "text.pooler.bias", "logit_scale", "logit_bias"])  # "frozen" is skipped


def test_muon_split_of_the_real_towers():
    from transformers import BertConfig, BertModel

    vit = build_ar_model(ViTConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2))
    muon, adamw = muon_param_split(vit)
    assert len(muon) == 8 and all(".blocks." in n for n, _ in muon)
    assert {"start_token", "encoder.patch_embed.weight", "head.weight"} <= {n for n, _ in adamw}
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                vocab_size=50, max_position_embeddings=20))
    muon, adamw = muon_param_split(bert)
    assert len(muon) == 12 and all(n.startswith("encoder.layer.") for n, _ in muon)  # q, k, v, out, in, out x 2
    assert {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "pooler.dense.weight"} <= {n for n, _ in adamw}


def test_muon_only_receives_matrices_and_lr_scales():
    model = TinyVLP()
    muon_opt, adamw_opt = build_optimizers(model, "muon", lr=1e-3, weight_decay=0.05, muon_lr=2e-2)
    assert isinstance(muon_opt, torch.optim.Muon) and isinstance(adamw_opt, torch.optim.AdamW)
    assert all(p.ndim == 2 for g in muon_opt.param_groups for p in g["params"])
    assert muon_opt.defaults["adjust_lr_fn"] == "match_rms_adamw"
    decay, rest = adamw_opt.param_groups
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert all(p.ndim <= 1 for p in rest["params"])
    assert any(p is model.logit_scale for p in rest["params"])
    assert set_lr_all([muon_opt, adamw_opt], 1e-3, 0.5) == pytest.approx(5e-4)
    assert muon_opt.param_groups[0]["lr"] == pytest.approx(1e-2) and decay["lr"] == pytest.approx(5e-4)
    (only,) = build_optimizers(model, "adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(only, torch.optim.AdamW) and sum(len(g["params"]) for g in only.param_groups) == 21 + 6
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizers(model, "sgd", lr=1e-3, weight_decay=0.0)


def regression_step(model: nn.Module, optimizers: list, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = (model(x) - y).pow(2).mean()
    for opt in optimizers:
        opt.zero_grad()
    loss.backward()
    for opt in optimizers:
        opt.step()
    return loss.item()


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 4, 4, 4, generator=g)
    return x, x.flatten(1)[:, :3] * 2 - 1  # a target the model can fit


def test_muon_and_adamw_lower_a_regression_loss():
    torch.manual_seed(0)
    model, (x, y) = TinyVLP(), regression_data()
    optimizers = build_optimizers(model, "muon", lr=1e-2, weight_decay=0.0)
    losses = [regression_step(model, optimizers, x, y) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]


def test_optimizer_state_round_trips():
    torch.manual_seed(0)
    model, (x, y) = TinyVLP(), regression_data()
    optimizers = build_optimizers(model, "muon", lr=1e-2, weight_decay=0.05)
    for _ in range(3):
        regression_step(model, optimizers, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": [o.state_dict() for o in optimizers]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    clone = TinyVLP()
    clone.load_state_dict(saved["model"])
    clone_opts = build_optimizers(clone, "muon", lr=1e-2, weight_decay=0.05)
    for opt, state in zip(clone_opts, saved["optim"]):
        opt.load_state_dict(state)
    assert clone_opts[0].state[clone.blocks[0].attn.qkv.weight]["momentum_buffer"].abs().sum() > 0
    assert regression_step(model, optimizers, x, y) == regression_step(clone, clone_opts, x, y)
    for (name, a), b in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(a, b), name


def test_named_lr_scales_get_their_own_group():
    from voxseq.models import build_ar_model
    from voxseq.train.optim import build_optimizers, set_lr_all

    model = build_ar_model("tiny", patch_size=4, depth=2, embed_dim=32, num_heads=2)
    for name in ("adamw", "muon"):
        opts = build_optimizers(model, name, 1e-3, 0.01, lr_scales={"start_token": 50.0})
        set_lr_all(opts, 1e-3, 0.5)
        groups = [g for o in opts for g in o.param_groups]
        special = [g for g in groups if any(p is model.start_token for p in g["params"])]
        assert len(special) == 1 and special[0]["params"] == [model.start_token]
        assert special[0]["lr"] == pytest.approx(1e-3 * 0.5 * 50) and special[0]["weight_decay"] == 0.0
        assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
