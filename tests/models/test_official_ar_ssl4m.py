"""The official AR-SSL4M release format (github.com/serena9525/AR-SSL4M): detection, conversion to ViT3D,
the same load report as voxseq checkpoints, forward equivalence with the official downstream encoder,
and no code execution from the file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from voxseq import VoxseqError
from voxseq.cli import main
from voxseq.models import ARViT3D, ViT3D, ViTConfig
from voxseq.models.official import convert_ar_ssl4m, official_prefix
from voxseq.models.vit3d import sincos3_embed
from voxseq.tasks.encoders import encoder_from_checkpoint
from voxseq.models.hub import load_checkpoint

E, DEPTH, HIDDEN, P, HEADS = 192, 2, 384, 4, 3  # 64-wide heads, as the release's 768 = 12 x 64


def official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the names and shapes of the official ReconModel (pretrain/model.py)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    sd = {"model.embed_tokens.weight": r(4, E, scale=1.0), "model.patchifier.proj.weight": r(E, 1, P, P, P, scale=0.2),
          "model.patchifier.proj.bias": r(E), "model.norm.weight": 1 + r(E), "model.norm.bias": r(E),
          "decoder_pred.weight": r(P**3, E), "decoder_pred.bias": r(P**3)}
    for i in range(DEPTH):
        q = f"model.layers.{i}."
        sd.update({q + "input_layernorm.weight": 1 + r(E), q + "input_layernorm.bias": r(E),
                   q + "self_attn.q_proj.weight": r(E, E, scale=0.15), q + "self_attn.k_proj.weight": r(E, E, scale=0.15),
                   q + "self_attn.v_proj.weight": r(E, E), q + "self_attn.o_proj.weight": r(E, E),
                   q + "self_attn.o_proj.bias": r(E),
                   q + "post_attention_layernorm.weight": 1 + r(E), q + "post_attention_layernorm.bias": r(E),
                   q + "mlp.linear1.weight": r(HIDDEN, E), q + "mlp.linear1.bias": r(HIDDEN),
                   q + "mlp.linear2.weight": r(E, HIDDEN), q + "mlp.linear2.bias": r(E)})
    return sd


def official_sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """The official _get_1d_sincos_pos_embed_from_grid: [sin | cos] of pos / 10000^(i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2).float() / (dim / 2.0))
    out = pos.reshape(-1)[:, None].float() * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def official_downstream_forward(sd: dict[str, torch.Tensor], x_xyz: torch.Tensor, take: tuple[int, ...] = ()):
    """The official downstream BaseModel.forward (segmentation/COVID/nodule base_model.py) on an (x, y, z)
    array: Conv3d patches + 3-axis sin-cos, the start token (embed_tokens row 1, position zero) prepended,
    bidirectional LLaMA-style pre-LN layers, final LayerNorm, start token dropped. Tokens in the official
    order (x slowest, z fastest); also the outputs of the blocks in ``take``."""
    m = "model."
    b = x_xyz.shape[0]
    t = F.conv3d(x_xyz, sd[m + "patchifier.proj.weight"], sd[m + "patchifier.proj.bias"], stride=P)
    gx, gy, gz = t.shape[2:]
    t = t.flatten(2).transpose(1, 2)
    gridx, gridy, gridz = torch.meshgrid(torch.arange(gx), torch.arange(gy), torch.arange(gz), indexing="ij")
    pe = torch.cat([official_sincos_1d(E // 3, g) for g in (gridx, gridy, gridz)], dim=1)
    start = sd[m + "embed_tokens.weight"][1].expand(b, 1, E)
    h = torch.cat([start, t + pe], dim=1)
    n = h.shape[1]
    inter = []
    for i in range(DEPTH):
        q = f"{m}layers.{i}."
        a = F.layer_norm(h, (E,), sd[q + "input_layernorm.weight"], sd[q + "input_layernorm.bias"], eps=1e-5)
        heads = [F.linear(a, sd[q + f"self_attn.{k}_proj.weight"]).view(b, n, HEADS, E // HEADS).transpose(1, 2)
                 for k in "qkv"]
        scores = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(E // HEADS)  # no mask: all ones
        o = (scores.softmax(-1) @ heads[2]).transpose(1, 2).reshape(b, n, E)
        h = h + F.linear(o, sd[q + "self_attn.o_proj.weight"], sd[q + "self_attn.o_proj.bias"])
        a = F.layer_norm(h, (E,), sd[q + "post_attention_layernorm.weight"], sd[q + "post_attention_layernorm.bias"], eps=1e-5)
        h = h + F.linear(F.gelu(F.linear(a, sd[q + "mlp.linear1.weight"], sd[q + "mlp.linear1.bias"])),
                         sd[q + "mlp.linear2.weight"], sd[q + "mlp.linear2.bias"])
        if i in take:
            inter.append(h[:, 1:])
    h = F.layer_norm(h, (E,), sd[m + "norm.weight"], sd[m + "norm.bias"], eps=1e-5)
    return h[:, 1:], inter


def to_voxseq_order(tokens: torch.Tensor, grid_xyz) -> torch.Tensor:
    """Official token order (x, y, z; z fastest) -> voxseq's (z, y, x; x fastest)."""
    b, _, e = tokens.shape
    return tokens.reshape(b, *grid_xyz, e).permute(0, 3, 2, 1, 4).reshape(b, -1, e)


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("official") / "ssl_checkpoint.pth"
    torch.save({"state_dict": official_state(), "epoch": 99}, path)  # the release nests under "state_dict"
    return path


def test_sincos3_formula_on_known_positions():
    pos = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # (sub-volume, z, y, x): sub-volume ignored
    got = sincos3_embed(pos, 6)[0]  # 2 channels per axis: [sin p, cos p] with omega 1, axes (x, y, z)
    want = torch.tensor([math.sin(3), math.cos(3), math.sin(2), math.cos(2), math.sin(1), math.cos(1)])
    assert torch.allclose(got, want, atol=1e-6)
    zyx = torch.tensor([[2.0, 5.0, 7.0], [0.0, 0.0, 0.0]])
    e = sincos3_embed(zyx, 48)
    want = torch.cat([official_sincos_1d(16, zyx[:, a]) for a in (2, 1, 0)], dim=1)
    assert torch.allclose(e, want, atol=1e-5)
    with pytest.raises(VoxseqError, match="multiple of 6"):
        ViTConfig(embed_dim=32, num_heads=2, pos_embed="sincos3")


def test_conversion_places_every_tensor():
    sd = official_state()
    assert official_prefix(sd) == "model." and official_prefix({"x": torch.zeros(1)}) is None
    out, cfg = convert_ar_ssl4m(sd)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.mlp_ratio) == (E, DEPTH, HEADS, P, 2.0)
    assert not cfg.qkv_bias and cfg.norm_eps == 1e-5 and cfg.pos_embed == "sincos3" and cfg.start_token
    for i in range(DEPTH):
        q = f"model.layers.{i}.self_attn."
        assert torch.equal(out[f"encoder.blocks.{i}.attn.qkv.weight"],
                           torch.cat([sd[q + "q_proj.weight"], sd[q + "k_proj.weight"], sd[q + "v_proj.weight"]]))
        assert torch.equal(out[f"encoder.blocks.{i}.attn.proj.bias"], sd[q + "o_proj.bias"])
        assert torch.equal(out[f"encoder.blocks.{i}.mlp.fc1.weight"], sd[f"model.layers.{i}.mlp.linear1.weight"])
        assert torch.equal(out[f"encoder.blocks.{i}.norm2.bias"], sd[f"model.layers.{i}.post_attention_layernorm.bias"])
    w = sd["model.patchifier.proj.weight"]
    assert torch.equal(out["encoder.patch_embed.weight"][:, 0, 1, 2, 3], w[:, 0, 3, 2, 1])  # (x, y, z) -> (z, y, x)
    assert torch.equal(out["encoder.start_token"][0, 0], sd["model.embed_tokens.weight"][1])
    assert torch.equal(out["end_token"][0, 0], sd["model.embed_tokens.weight"][2])
    # pixel head: official patch order (x, y, z) -> voxseq's (z, y, x)
    iz, iy, ix = 1, 2, 3
    assert torch.equal(out["head.weight"][(iz * P + iy) * P + ix], sd["decoder_pred.weight"][(ix * P + iy) * P + iz])
    enc = ViT3D(cfg)
    missing, unexpected = enc.load_state_dict({k[8:]: v for k, v in out.items() if k.startswith("encoder.")}, strict=True)
    assert not missing and not unexpected
    with pytest.raises(VoxseqError, match="learnable positions"):
        convert_ar_ssl4m({**sd, "model.pos_embed_learn": torch.zeros(3, E)})


def test_official_pth_loads_with_a_clean_report(official_pth):
    enc, pre, meta, report = encoder_from_checkpoint(official_pth)
    assert report.loaded and not report.missing and not report.unexpected and not report.mismatched
    assert len(report.loaded) == 2 + 1 + 2 + DEPTH * 11  # patch embed, start token, final norm, 11 per block (no qkv bias)
    assert meta["task"] == "ar-ssl4m-official" and enc.cfg.start_token and enc.cfg.pos_embed == "sincos3"
    assert pre.orientation == "RAS" and pre.percentiles == [1.0, 99.9]  # the official arrays and normalisation
    with pytest.raises(VoxseqError, match="no voxseq training state"):
        load_checkpoint(official_pth).training_state()


def test_converted_encoder_matches_the_official_forward(official_pth):
    sd = official_state()
    enc, _, _, _ = encoder_from_checkpoint(official_pth)
    enc.eval()
    x_xyz = torch.randn(2, 1, 16, 12, 8, generator=torch.Generator().manual_seed(1))  # official (x, y, z) arrays
    want, want_inter = official_downstream_forward(sd, x_xyz, take=(0,))
    x_zyx = x_xyz.permute(0, 1, 4, 3, 2)  # the same volumes as voxseq arrays (z, y, x)
    with torch.no_grad():
        got = enc.forward_features(x_zyx)
        inter, final = enc.forward_intermediates(x_zyx, [0])
    grid = (16 // P, 12 // P, 8 // P)
    assert got.shape == (2, 4 * 3 * 2, E)
    assert torch.allclose(got, to_voxseq_order(want, grid), atol=1e-4)
    assert torch.allclose(final, got) and torch.allclose(inter[0], to_voxseq_order(want_inter[0], grid), atol=1e-4)
    # the start token matters: without it the features differ
    enc.start_token = None
    with torch.no_grad():
        assert not torch.allclose(enc.forward_features(x_zyx), got, atol=1e-3)


def test_safetensors_and_bare_state_dicts_load_the_same(tmp_path, official_pth):
    from safetensors.torch import save_file

    sd = official_state()
    save_file(sd, str(tmp_path / "official.safetensors"))
    torch.save({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}, tmp_path / "base_model.pt")
    ref = load_checkpoint(official_pth).state_dict
    for f in ("official.safetensors", "base_model.pt"):
        ck = load_checkpoint(tmp_path / f)
        for k, v in ck.state_dict.items():
            if k.startswith("encoder."):
                assert torch.equal(v, ref[k]), (f, k)
    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(3, 1)}}, tmp_path / "other.pth")
    with pytest.raises(VoxseqError, match="nor an official AR-SSL4M state dict"):
        load_checkpoint(tmp_path / "other.pth")


class Evil:
    """Unpickling this would create a file; weights_only loading must refuse it."""

    marker: Path

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_official_looking_pth_is_refused(tmp_path):
    evil = Evil()
    evil.marker = tmp_path / "pwned"
    sd = official_state()
    sd["model.norm.weight"] = evil  # type: ignore[assignment]
    path = tmp_path / "ssl_checkpoint.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(VoxseqError, match="refused to load weights"):
        load_checkpoint(path)
    assert main(["embed", "--checkpoint", str(path), "--out", str(tmp_path / "e.npz"), str(tmp_path / "x.nii.gz")]) != 0
    assert not evil.marker.exists()


def test_official_weights_init_segmentation_and_embed(tmp_path, official_pth):
    from voxseq.tasks.finetune_seg import SegConfig, build_seg_model

    model, pre, how = build_seg_model(SegConfig(), str(official_pth))
    assert f"{2 + 1 + 2 + DEPTH * 11} tensors loaded, 0 missing" in how and pre.orientation == "RAS"
    assert torch.equal(model.encoder.start_token, load_checkpoint(official_pth).state_dict["encoder.start_token"])
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16, 8)).shape == (1, 2, 16, 16, 8)  # UNETR on the start-token encoder
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((8, 12, 16)).astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / "v.nii.gz"))
    assert main(["embed", "--checkpoint", str(official_pth), "--out", str(tmp_path / "f.npz"), str(tmp_path / "v.nii.gz")]) == 0
    assert np.load(tmp_path / "f.npz")["features"].shape == (1, E)


def test_ar_model_and_token_paths_refuse_the_start_token():
    cfg = ViTConfig(patch_size=4, embed_dim=48, depth=1, num_heads=2, pos_embed="sincos3", start_token=True)
    with pytest.raises(VoxseqError, match="sin-cos positions"):
        ARViT3D(cfg)
    with pytest.raises(VoxseqError, match="start token"):
        ARViT3D(ViTConfig(patch_size=4, embed_dim=48, depth=1, num_heads=2, start_token=True))
    with pytest.raises(VoxseqError, match="image inputs"):
        ViT3D(cfg).forward_tokens(torch.zeros(1, 2, 64), torch.zeros(1, 2, 4))


def test_official_weights_init_classification(tmp_path, official_pth):
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "cls"
    assert main(["finetune", "cls", "--config", str(root / "configs" / "cls_phantom_tiny.yaml"), "--init", str(official_pth),
                 "--out", str(out), "data.phantoms.n_ct=12", "data.phantoms.size_xy=48", "data.phantoms.max_slices=48",
                 "input_zyx=[32,32,32]", "max_steps=2", "batch_size=2", "linear_probe=true", "label_key=liver lesion"]) == 0
    ck, official = load_checkpoint(out), load_checkpoint(official_pth)
    encoder = {k: v for k, v in ck.state_dict.items() if k.startswith("encoder.")}
    assert len(encoder) == 2 + 1 + 2 + DEPTH * 11
    assert all(torch.equal(v, official.state_dict[k]) for k, v in encoder.items())  # frozen: the official weights
    assert ck.meta["model"]["start_token"] and ck.meta["preprocess"]["orientation"] == "RAS"
