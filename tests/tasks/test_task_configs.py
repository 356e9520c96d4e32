"""The shipped task presets: every configs/seg_*.yaml and cls_*.yaml loads, and the downstream ones
carry the paper's settings (REFERENCE.md section 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from voxseq import VoxseqError

from voxseq.tasks.finetune_cls import load_cls_config, run_finetune_cls
from voxseq.tasks.finetune_seg import load_seg_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# task -> (HU window, classes including background), REFERENCE.md section 1
MSD = {"task03_liver": ((-21, 189), 3), "task06_lung": ((-1000, 1000), 2), "task07_pancreas": ((-87, 199), 3),
       "task08_hepaticvessel": ((0, 230), 3), "task09_spleen": ((-57, 175), 2), "task10_colon": ((-57, 175), 2)}
VIT_B = {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}


def _vit_b(model) -> bool:
    return {k: getattr(model, k) for k in VIT_B} == VIT_B


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("seg_*.yaml")), ids=lambda p: p.stem)
def test_seg_configs_load(path):
    cfg = load_seg_config(path)
    assert cfg.name == path.stem
    assert all(r % cfg.model.patch_size == 0 for r in cfg.roi_zyx) and cfg.unetr.out_channels >= 2


def test_label_map_must_fit_the_classes():
    cfg = load_seg_config(CONFIGS / "seg_phantom_organs5.yaml")
    assert cfg.unetr.out_channels == 5 and sorted(set(cfg.data.label_map.values())) == [1, 2, 3, 4]
    with pytest.raises(VoxseqError, match="out_channels is 4"):
        load_seg_config(CONFIGS / "seg_phantom_organs5.yaml", ["unetr.out_channels=4"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("cls_*.yaml")), ids=lambda p: p.stem)
def test_cls_configs_load(path):
    cfg = load_cls_config(path)
    assert cfg.name == path.stem and cfg.label_key
    assert all(s % cfg.model.patch_size == 0 for s in cfg.input_zyx)


def test_downstream_presets_exist():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {f"seg_msd_{t}" for t in MSD} | {"seg_la", "cls_ricord", "cls_nodulemnist3d"} <= names


@pytest.mark.parametrize("task", sorted(MSD))
def test_msd_presets_follow_the_paper(task):
    cfg = load_seg_config(CONFIGS / f"seg_msd_{task}.yaml")
    window, classes = MSD[task]
    pre = cfg.data.preprocess
    assert _vit_b(cfg.model) and cfg.roi_zyx == [96, 96, 96] and cfg.unetr.skip_indices == [3, 6, 9]
    assert (cfg.lr, cfg.layer_decay) == (3e-4, 0.75) and cfg.unetr.out_channels == classes
    assert pre.intensity == "window" and pre.window_range == window and pre.spacing_xyz == [1.5, 1.5, 2.0]
    assert not cfg.use_init_preprocess  # the task's window and spacing, not the pretraining's


def test_la_and_classification_presets():
    la = load_seg_config(CONFIGS / "seg_la.yaml")
    assert _vit_b(la.model) and la.unetr.out_channels == 2 and la.roi_zyx == [96, 96, 96]
    assert la.data.preprocess.spacing_xyz == [0.625, 0.625, 0.625] and la.data.preprocess.intensity == "percentile"
    ricord = load_cls_config(CONFIGS / "cls_ricord.yaml")
    assert _vit_b(ricord.model) and ricord.label_key == "covid" and ricord.input_zyx == [64, 128, 128]
    nodule = load_cls_config(CONFIGS / "cls_nodulemnist3d.yaml")
    assert _vit_b(nodule.model) and nodule.label_key == "malignant" and min(nodule.input_zyx) > 28
    assert nodule.data.preprocess.window_range == (0.0, 255.0)


def test_nodulemnist3d_preset_trains_from_the_npz(tmp_path):
    """28^3 samples read in place from the npz, cached at 28^3 and upsampled to the model's input."""
    from voxseq.data.cache import Cache

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.arange(n).reshape(n, 1) % 2
    np.savez_compressed(tmp_path / "nodulemnist3d.npz", **arrays)
    tiny = ["model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "input_zyx=[32,32,32]",
            "batch_size=2", "max_steps=2", "warmup_steps=1", f"data.source={tmp_path}", "data.workers=1"]
    cfg = load_cls_config(CONFIGS / "cls_nodulemnist3d.yaml", tiny)
    result = run_finetune_cls(cfg, tmp_path / "run", progress=False)
    assert (result["n_train"], result["n_eval"]) == (6, 4)
    assert 0.0 <= result["metrics"]["auc"] <= 1.0 and result["metrics"]["acc"] in {0.0, 0.25, 0.5, 0.75, 1.0}
    cache = Cache(tmp_path / "run" / "cache")
    i = next(k for k in range(len(cache)) if cache.entry(k)["id"] == "nodulemnist3d_test_0002")
    image = np.asarray(cache.image(i), np.float32)
    assert image.shape == (1, 28, 28, 28) and cache.entry(i)["classes"] == {"malignant": 0.0}
    assert np.allclose(image[0], arrays["test_images"][2] / 255.0, atol=1e-3)  # hu_range [0, 255] -> [0, 1]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("vlp_*.yaml")), ids=lambda p: p.stem)
def test_vlp_configs_load(path):
    from voxseq.tasks.pretrain_vlp import load_vlp_config

    cfg = load_vlp_config(path)
    assert cfg.name == path.stem and cfg.model.vision.pos_embed == "rope3d" and cfg.optimizer == "muon"
    assert cfg.chunks.patch_size == cfg.model.vision.patch_size


def test_vlp_reference_setting():
    from voxseq.models.vit3d import rope_axis_dims
    from voxseq.tasks.pretrain_vlp import load_vlp_config

    v = load_vlp_config(CONFIGS / "vlp_vit_l.yaml").model.vision
    assert (v.depth, v.embed_dim, v.num_heads) == (24, 1024, 16)  # ViT-L
    assert rope_axis_dims(v.embed_dim // v.num_heads, v.rope_split) == [16, 24, 24]  # t:h:w = 2:3:3 of 64
    pre = load_vlp_config(CONFIGS / "vlp_vit_l.yaml").data.preprocess
    assert pre.window_range == (-1000.0, 1000.0) and pre.out_range == [-1.0, 1.0] and pre.spacing_xyz[2] == 1.5
