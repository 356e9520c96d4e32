"""Downstream use of pretrained encoders: UNETR, loading, embed (voxel_ijk), finetune, evaluate, predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from voxseq import VoxseqError
from voxseq.cli import main
from voxseq.data.preprocess import Preprocess
from voxseq.models.unetr import UNETR3D, UNETRConfig, default_skips
from voxseq.models.vit3d import ViT3D, ViTConfig
from voxseq.tasks.encoders import embed_file, encoder_from_checkpoint
from voxseq.data.adapters import label_subset
from voxseq.tasks.finetune_seg import dice_per_class

ROOT = Path(__file__).resolve().parents[2]
AR_TINY = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "batch_size=2", "warmup_steps=2",
           "data.phantoms.n_ct=4", "data.phantoms.n_mri=0", "data.phantoms.size_xy=48", "data.phantoms.max_slices=48",
           "data.samples=false", "data.workers=1", "data.preprocess.spacing_xyz=[6,6,6]",
           "data.preprocess.min_shape_zyx=[32,32,32]", "sequence.crop_zyx=[32,32,32]",
           "sequence.subvolume_zyx=[8,32,32]", "sequence.kind_weights={spatial: 1.0}"]
SEG_TINY = ["unetr.feature_size=4", "roi_zyx=[16,16,16]", "batch_size=1", "warmup_steps=1", "checkpoint_every=100",
            "data.phantoms.n_ct=4", "data.phantoms.size_xy=48", "data.phantoms.max_slices=48"]


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ar") / "run"
    assert main(["pretrain", "ar", "--config", str(ROOT / "configs" / "ar_tiny.yaml"), "--out", str(out), *AR_TINY,
                 "max_steps=3"]) == 0
    return out


def test_unetr_shapes_and_skips():
    assert default_skips(12, 16) == [3, 6, 9] and default_skips(6, 8) == [2, 4]
    for p, depth in ((16, 4), (8, 3), (4, 2)):
        m = UNETR3D(ViTConfig(patch_size=p, embed_dim=32, depth=depth, num_heads=2), UNETRConfig(out_channels=3, feature_size=4))
        assert m(torch.randn(1, 1, 16, 32, 48)).shape == (1, 3, 16, 32, 48)
    with pytest.raises(VoxseqError, match="skip blocks"):
        UNETR3D(ViTConfig(patch_size=16, embed_dim=32, depth=4, num_heads=2), UNETRConfig(skip_indices=[1]))


def test_dice_known_values():
    label = np.zeros((4, 4, 4), np.uint8)
    label[:2] = 1
    label[2:, :2] = 2
    pred = label.copy()
    pred[0] = 0  # half of class 1 missed
    d1, d2 = dice_per_class(pred, label, 3)
    assert d1 == pytest.approx(2 * 16 / (16 + 32)) and d2 == pytest.approx(1.0)


def test_label_ratio_subset_is_fixed():
    ids = [f"c{i}" for i in range(20)]
    a = label_subset(ids, 0.1, 0)
    assert len(a) == 2 and a == label_subset(list(reversed(ids)), 0.1, 0) and a <= label_subset(ids, 1.0, 0)
    assert len(label_subset(ids, 0.01, 0)) == 1
    with pytest.raises(VoxseqError, match="label_ratio"):
        label_subset(ids, 0.0)


def test_encoder_loads_from_ar_checkpoint(ar_run):
    enc, pre, meta, report = encoder_from_checkpoint(ar_run)
    assert not report.missing and not report.mismatched and not report.unexpected
    assert enc.cfg.embed_dim == 32 and pre.spacing_xyz == [6.0, 6.0, 6.0] and meta["task"] == "pretrain-ar"
    with pytest.raises(VoxseqError):
        encoder_from_checkpoint(ar_run / "nowhere")


def test_embed_voxel_ijk_in_the_files_own_grid(tmp_path):
    """An LAS file (Y flipped relative to voxseq's LPS): token centres map back to the file's indices."""
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32))
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    path = tmp_path / "las.nii.gz"
    sitk.WriteImage(img, str(path))
    enc = ViT3D(ViTConfig(patch_size=8, embed_dim=32, depth=1, num_heads=2))
    out = embed_file(enc, Preprocess(intensity="none"), path, per_token=True)
    assert out["features"].shape == (8, 32)
    got = {tuple(v) for v in out["voxel_ijk"].tolist()}
    # centres at 3.5 / 11.5 in LPS; Y flips: 15 - 3.5 = 11.5; numpy rounds half to even
    c = [int(np.rint(3.5)), int(np.rint(11.5))]
    assert got == {(i, j, k) for i in c for j in c for k in c}
    vol = embed_file(enc, Preprocess(intensity="none"), path)
    assert vol["features"].shape == (32,) and np.allclose(vol["features"], out["features"].mean(0), atol=1e-5)


def test_embed_cli(tmp_path, ar_run, samples):
    assert main(["embed", "--checkpoint", str(ar_run), "--per-token", "--out", str(tmp_path / "e.npz"),
                 str(samples / "breast1_image.nrrd")]) == 0
    d = np.load(tmp_path / "e.npz")
    assert d["features"].shape[1] == 32 and d["voxel_ijk"].shape == (d["features"].shape[0], 3)
    assert (d["voxel_ijk"] >= 0).all() and (d["voxel_ijk"] < np.array([45, 120, 21])).all()
    assert main(["embed", "--random-init", "tiny", "--out", str(tmp_path / "r.npz"), str(samples / "breast1_image.nrrd"),
                 str(samples / "brain1_image.nrrd")]) == 0
    assert np.load(tmp_path / "r.npz")["features"].shape == (2, 192)
    assert main(["embed", "--out", str(tmp_path / "x.npz"), str(samples / "breast1_image.nrrd")]) == 2


def test_embed_windows_and_layers(tmp_path, ar_run, samples, capsys):
    """The default is the whole volume at the AR run's middle block; --window pretraining (the run's crop) and
    explicit windows, --layer last and mean give features of the same tokens; bad values are one-line errors."""
    scan = str(samples / "brain1_image.nrrd")
    feats = {}
    for name, extra in {"default": [], "windows": ["--window", "pretraining"], "last": ["--layer", "last"],
                        "mean": ["--layer", "mean", "--window", "16x32x32", "--overlap", "0.25"]}.items():
        assert main(["embed", "--checkpoint", str(ar_run), "--per-token", "--out", str(tmp_path / f"{name}.npz"),
                     *extra, scan]) == 0
        feats[name] = np.load(tmp_path / f"{name}.npz")
    printed = capsys.readouterr().out
    assert "layer 1, whole volumes" in printed and "layer 1, windows of 32x32x32 voxels" in printed
    shapes = {k: v["features"].shape for k, v in feats.items()}
    assert len(set(shapes.values())) == 1 and shapes["default"][0] > 50, shapes
    assert all(np.array_equal(v["voxel_ijk"], feats["default"]["voxel_ijk"]) for v in feats.values())
    for a, b in (("default", "windows"), ("default", "last"), ("default", "mean")):
        assert not np.allclose(feats[a]["features"], feats[b]["features"], atol=1e-4), (a, b)
    for bad in (["--layer", "9"], ["--window", "10x32x32"], ["--window", "big"]):
        assert main(["embed", "--checkpoint", str(ar_run), "--out", str(tmp_path / "x.npz"), *bad, scan]) == 2


def test_finetune_evaluate_predict(tmp_path, ar_run, samples):
    cfg = str(ROOT / "configs" / "seg_phantom_tiny.yaml")
    out = tmp_path / "seg"
    assert main(["finetune", "seg", "--config", cfg, "--init", str(ar_run), "--out", str(out), *SEG_TINY, "max_steps=3",
                 "--label-ratio", "0.5"]) == 0
    meta = json.loads(next((out / "checkpoints").glob("model_*.json")).read_text())
    assert meta["init"] == str(ar_run) and meta["model"]["embed_dim"] == 32  # the pretrained encoder's shape
    assert meta["preprocess"]["spacing_xyz"] == [6.0, 6.0, 6.0]  # and its preprocessing
    assert len(meta["train_ids"]) == 2 and len(meta["val_ids"]) == 1  # 4 cases: 3 train (half of them kept), 1 val
    assert meta["val"]["mean_dice"] >= 0
    assert main(["evaluate", "--checkpoint", str(out)]) == 0
    ev = json.loads((out / "evaluation.json").read_text())
    assert len(ev["dice_per_class"]) == 10 and (out / "evaluation.md").is_file()
    assert main(["predict", "--checkpoint", str(out), "--out", str(tmp_path / "pred"), str(samples / "brain1_image.nrrd")]) == 0
    src = sitk.ReadImage(str(samples / "brain1_image.nrrd"))
    seg = sitk.ReadImage(str(tmp_path / "pred" / "brain1_image_seg.nii.gz"))
    assert seg.GetSize() == src.GetSize()
    assert np.allclose(seg.GetSpacing(), src.GetSpacing(), atol=1e-4) and np.allclose(seg.GetOrigin(), src.GetOrigin(), atol=1e-3)
    assert np.allclose(seg.GetDirection(), src.GetDirection())  # brain1 is LAS: written back in LAS
    assert main(["predict", "--checkpoint", str(ar_run), "--out", str(tmp_path / "p2"), str(samples / "brain1_image.nrrd")]) == 2


def test_binary_metrics_known_values():
    from voxseq.tasks.finetune_cls import binary_metrics

    m = binary_metrics(np.array([0.9, 0.8, 0.3, 0.2, 0.6]), np.array([1, 1, 1, 0, 0]))
    assert m["auc"] == pytest.approx(5 / 6) and m["acc"] == pytest.approx(0.6)  # 5 of 6 pos/neg pairs ordered
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(0.5)


def test_finetune_cls_linear_probe_keeps_encoder(tmp_path, ar_run):
    from voxseq.train.checkpoint import load_checkpoint

    out = tmp_path / "cls"
    assert main(["finetune", "cls", "--config", str(ROOT / "configs" / "cls_phantom_tiny.yaml"), "--init", str(ar_run),
                 "--out", str(out), "data.phantoms.n_ct=12", "data.phantoms.size_xy=48", "data.phantoms.max_slices=48",
                 "input_zyx=[32,32,32]", "max_steps=3", "batch_size=2", "linear_probe=true", "label_key=liver lesion"]) == 0
    ck = load_checkpoint(out)
    ar = load_checkpoint(ar_run)
    for k, v in ck.state_dict.items():
        if k.startswith("encoder."):
            assert torch.equal(v, ar.state_dict[k])  # frozen encoder: exactly the pretrained weights
    assert set(ck.meta["eval"]) == {"auc", "acc", "sensitivity", "specificity"}


def test_token_linear_probe_runs_on_both_encoders(tmp_path, ar_run):
    out = tmp_path / "probe"
    assert main(["experiment", "linear-probe", "--config", str(ROOT / "configs" / "seg_phantom_tiny.yaml"), "--init",
                 str(ar_run), "--out", str(out), "data.phantoms.n_ct=10", "data.phantoms.size_xy=48",
                 "data.phantoms.max_slices=48", "eval_splits=[val,test]"]) == 0
    r = json.loads((out / "token_probe.json").read_text())
    for name in ("pretrained", "random"):
        assert r[name]["test_tokens"] > 50
        assert 1 / 11 < r[name]["balanced_accuracy"] <= 1  # organs are partly linearly decodable from tokens
        recall = r[name]["recall"]  # per organ label of the test tokens; balanced accuracy is their mean
        assert "0" in recall and len(recall) >= 3 and all(0 <= v <= 1 for v in recall.values())
        assert np.mean(list(recall.values())) == pytest.approx(r[name]["balanced_accuracy"])
    assert r["n_train_volumes"] == 7 and r["n_test_volumes"] == 3
    # the per-layer curve: every block, the final output and the mean of blocks, for both encoders; the
    # headline is the default layer (the middle block of an AR run); whole volumes by default
    assert r["window_zyx"] is None and r["layer"] == 1
    for name in ("pretrained", "random"):
        assert set(r["layers"][name]) == {"1", "2", "last", "mean"}
        assert r["layers"][name]["1"]["balanced_accuracy"] == r[name]["balanced_accuracy"]
    assert (out / "probe_layers.png").stat().st_size > 1000 and "| 1 |" in (out / "token_probe.md").read_text()


def test_label_efficiency_table_pairs_seeds(tmp_path):
    from voxseq.tasks.experiments import paired_differences, write_results

    runs = [{"arm": a, "ratio": r, "seed": s, "mean_dice": d} for a, r, s, d in [
        ("scratch", 0.1, 0, 0.30), ("pretrained", 0.1, 0, 0.40), ("scratch", 0.1, 1, 0.20), ("pretrained", 0.1, 1, 0.25),
        ("scratch", 0.1, 2, 0.50), ("scratch", 1.0, 0, 0.6)]]  # seed 2 has no pretrained arm yet
    (p,) = [row for row in paired_differences(runs) if row["ratio"] == 0.1]
    assert p["seeds"] == [0, 1] and np.allclose(p["differences"], [0.10, 0.05])
    assert p["mean"] == pytest.approx(0.075) and p["std"] == pytest.approx(np.std([0.10, 0.05], ddof=1))
    result = write_results(tmp_path, runs, "init")
    assert [r["ratio"] for r in result["paired"]] == [0.1]  # ratio 1.0 has no pair
    assert "+0.0750 +- 0.0354 (n=2)" in (tmp_path / "results.md").read_text()


def test_label_efficiency_reruns_keep_other_seeds(tmp_path, monkeypatch):
    """A run for seed 1 after one for seed 0 adds to the table instead of replacing it, and reuses rows it has."""
    from voxseq.tasks import experiments

    calls = []

    def fake_finetune(cfg, out, init, load_weights, progress, resume):
        calls.append((cfg.seed, cfg.label_ratio, load_weights))
        return {"val": {"mean_dice": 0.1 * cfg.seed + 0.5 * load_weights}, "n_train": 1, "seconds": 0.0}

    monkeypatch.setattr(experiments, "run_finetune_seg", fake_finetune)
    cfg = str(ROOT / "configs" / "seg_phantom_organs5.yaml")
    experiments.run_label_efficiency(cfg, "init", tmp_path, ratios=(0.1,), seeds=(0,), progress=False)
    experiments.run_label_efficiency(cfg, "init", tmp_path, ratios=(0.1,), seeds=(1,), progress=False)
    result = experiments.run_label_efficiency(cfg, "init", tmp_path, ratios=(0.1,), seeds=(0, 1), progress=False)
    assert sorted((r["seed"], r["arm"]) for r in result["runs"]) == [(0, "pretrained"), (0, "scratch"),
                                                                      (1, "pretrained"), (1, "scratch")]
    assert calls == [(0, 0.1, False), (0, 0.1, True), (1, 0.1, False), (1, 0.1, True)]  # seed 0 ran once
    assert result["paired"][0]["differences"] == pytest.approx([0.5, 0.5])


def test_python_api_embeds_a_scan(tmp_path, ar_run, samples):
    """The README's Python example: load an encoder from a run folder, embed a scan per token."""
    import subprocess
    import sys

    import voxseq
    from voxseq import embed, load_encoder

    encoder, preprocess, meta = load_encoder(ar_run)
    out = embed(encoder, preprocess, samples / "brain1_image.nrrd", per_token=True, meta=meta)
    assert out["features"].shape[1] == 32 and out["voxel_ijk"].shape == (out["features"].shape[0], 3)
    assert main(["embed", "--checkpoint", str(ar_run), "--per-token", "--out", str(tmp_path / "e.npz"),
                 str(samples / "brain1_image.nrrd")]) == 0
    cli = np.load(tmp_path / "e.npz")  # the same features as `voxseq embed` (block 1 of 2)
    assert np.allclose(out["features"], cli["features"], atol=1e-5)
    assert set(voxseq.__all__) >= {"read_volume", "Preprocess", "ViT3D", "load_encoder", "embed", "fit"}
    with pytest.raises(AttributeError):
        voxseq.no_such_thing  # noqa: B018
    probe = subprocess.run([sys.executable, "-c", "import sys, voxseq; print('torch' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False"  # the API is imported lazily



def test_python_api_finetunes(tmp_path, ar_run):
    """The README's fine-tuning example, on a tiny budget: the five-class config from an AR run."""
    from voxseq.tasks.finetune_seg import load_seg_config, run_finetune_seg

    cfg = load_seg_config(ROOT / "configs" / "seg_phantom_organs5.yaml", [*SEG_TINY, "max_steps=3"])
    result = run_finetune_seg(cfg, tmp_path / "seg5", init=str(ar_run))
    assert 0.0 <= result["val"]["mean_dice"] <= 1.0 and len(result["val"]["dice_per_class"]) == 4
    assert (tmp_path / "seg5" / "checkpoints" / "model_00000003.json").is_file()
