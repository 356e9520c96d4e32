"""`voxseq experiment compare`: scratch, random-frozen, MAE and AR arms paired by seed, and the token probe."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from voxseq.cli import main
from voxseq.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DATA = ["data.phantoms.n_ct=4", "data.phantoms.n_mri=0", "data.phantoms.size_xy=48", "data.phantoms.max_slices=48",
        "data.phantoms.version=2", "data.samples=false", "data.workers=1", "data.preprocess.spacing_xyz=[6,6,6]",
        "data.preprocess.min_shape_zyx=[32,32,32]", "sequence.crop_zyx=[32,32,32]"]
VIT = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "batch_size=2", "warmup_steps=2", "max_steps=3"]
SEG = ["unetr.feature_size=4", "roi_zyx=[16,16,16]", "batch_size=1", "warmup_steps=1", "max_steps=2",
       "data.phantoms.n_ct=10", "data.phantoms.size_xy=48", "data.phantoms.max_slices=48", "data.phantoms.version=2",
       "eval_splits=[val]", "overlap=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("pre")
    assert main(["pretrain", "ar", "--config", str(ROOT / "configs" / "ar_tiny.yaml"), "--out", str(tmp / "ar"), *VIT,
                 *DATA, "sequence.subvolume_zyx=[8,32,32]", "sequence.kind_weights={spatial: 1.0}"]) == 0
    assert main(["pretrain", "mae", "--config", str(ROOT / "configs" / "mae_tiny.yaml"), "--out", str(tmp / "mae"), *VIT,
                 *DATA, "sequence.subvolume_zyx=[32,32,32]", "decoder.embed_dim=16", "decoder.depth=1",
                 "decoder.num_heads=2"]) == 0
    return tmp / "ar", tmp / "mae"


def test_compare_runs_every_arm_pairs_by_seed_and_probes(tmp_path, runs):
    ar, mae = runs
    out = tmp_path / "cmp"
    args = ["experiment", "compare", "--config", str(ROOT / "configs" / "seg_phantom_organs5.yaml"), "--ar", str(ar),
            "--mae", str(mae), "--out", str(out), "--ratios", "0.5", "--seeds", "0",
            "--arms", "scratch,random-frozen,mae,ar-frozen", *SEG]
    assert main(args) == 0
    r = json.loads((out / "compare.json").read_text())
    assert sorted(x["arm"] for x in r["runs"]) == sorted(("scratch", "random-frozen", "mae", "ar-frozen"))
    assert all(0 <= x["mean_dice"] <= 1 for x in r["runs"])
    by = {x["arm"]: x["mean_dice"] for x in r["runs"]}
    for arm in ("random-frozen", "mae", "ar-frozen"):  # every arm minus scratch, seed by seed
        (p,) = r["paired"][arm]
        assert p["seeds"] == [0] and p["differences"] == pytest.approx([by[arm] - by["scratch"]])
    # frozen arms train the decoder only: the encoder is the one they started from
    ar_ck, frozen = load_checkpoint(ar), load_checkpoint(out / "ar-frozen_r0.5_s0")
    mae_tuned = load_checkpoint(out / "mae_r0.5_s0")
    enc = [k for k in frozen.state_dict if k.startswith("encoder.") and k in ar_ck.state_dict]
    assert len(enc) > 10 and all(torch.equal(frozen.state_dict[k], ar_ck.state_dict[k]) for k in enc)
    assert not all(torch.equal(mae_tuned.state_dict[k], load_checkpoint(mae).state_dict[k]) for k in enc)
    rnd = load_checkpoint(out / "random-frozen_r0.5_s0")
    assert rnd.meta["init"] is None  # random weights, the AR run's architecture
    # the probe: random, MAE and AR encoders at every layer, headline at each one's default layer
    probe = r["probe"]
    assert set(probe["layers"]) == {"random", "ar", "mae"}
    assert set(probe["layers"]["ar"]) == {"1", "2", "last", "mean"}
    assert probe["headline_layer"]["ar"] == probe["headline_layer"]["random"] == "1"  # the AR run's middle block
    assert probe["headline"]["ar"] == probe["layers"]["ar"]["1"]["balanced_accuracy"]
    md = (out / "compare.md").read_text()
    assert "| 0.5 |" in md and "random-frozen" in md and "| ar-frozen | 0.5 |" in md
    for png in ("label_efficiency.png", "probe_layers.png"):
        assert (out / png).stat().st_size > 1000
    # a re-run reuses every finished fine-tuning
    mtime = (out / "mae_r0.5_s0" / "metrics.jsonl").stat().st_mtime
    assert main([*args, "--no-probe"]) == 0
    again = json.loads((out / "compare.json").read_text())
    assert again["runs"] == r["runs"] and again["probe"] == r["probe"]
    assert (out / "mae_r0.5_s0" / "metrics.jsonl").stat().st_mtime == mtime
    # the reference CNN of examples/ trains on the same cache, crops and classes and scores the same volumes
    ref = example("cnn_reference").main(["--config", str(ROOT / "configs" / "seg_phantom_organs5.yaml"), "--cache", str(out / "cache"),
                    "--steps", "3", "--channels", "4,8", *SEG, "label_ratio=0.5"])
    assert len(ref["dice_per_class"]) == 4 and 0 <= ref["mean_dice"] <= 1
    assert ref["n_train"] == by_arm_train(r, "scratch") and ref["steps"] == 3
    # and the AR run's next-token loss per label of the same volumes
    per_label = example("ar_loss_by_label").main(["--run", str(ar), "--cache", str(out / "cache"), "--splits", "val"])
    assert "0" in per_label and len(per_label) >= 2
    assert all(v["tokens"] > 0 and 0 < v["loss"] < 10 and v["token_sd"] >= 0 for v in per_label.values())
    # slabs of 8 slices at stride 8 do not overlap: every row a later slab predicts is new
    overlap = example("ar_overlap_loss").main(["--run", str(ar), "--sequences", "2"])
    assert sorted(overlap) == ["slab 1", "slab 2", "slab 3"]
    assert all(set(v) == {"new", "new_voxels"} and 0 < v["new"] < 10 for v in overlap.values())


def example(name: str):
    """A script of examples/ as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def by_arm_train(result: dict, arm: str) -> int:
    return next(x["n_train"] for x in result["runs"] if x["arm"] == arm)


def test_compare_refuses_unfair_or_unknown_set_ups(tmp_path, runs, capsys):
    ar, mae = runs
    base = ["experiment", "compare", "--config", str(ROOT / "configs" / "seg_phantom_organs5.yaml"), "--out",
            str(tmp_path / "x"), *SEG]
    assert main([*base, "--ar", str(ar), "--arms", "scratch,mae"]) == 2
    assert "needs --mae" in capsys.readouterr().err
    assert main([*base, "--ar", str(ar), "--arms", "ar"]) == 2
    assert "scratch" in capsys.readouterr().err
    assert main([*base, "--ar", str(ar), "--arms", "scratch,bert"]) == 2
    assert "unknown arm 'bert'" in capsys.readouterr().err
    assert main([*base, "--arms", "scratch"]) == 2
    assert "--ar and/or --mae" in capsys.readouterr().err


def test_ablation_pretrains_variants_and_scores_them(tmp_path):
    out = tmp_path / "abl"
    pre = [*VIT, *DATA, "sequence.subvolume_zyx=[8,32,32]", "sequence.kind_weights={spatial: 1.0}"]
    args = ["experiment", "ablation", "--config", str(ROOT / "configs" / "ar_tiny.yaml"), "--seg-config",
            str(ROOT / "configs" / "seg_phantom_organs5.yaml"), "--out", str(out), "--variants", "full,causal",
            "--steps", "2", "--ratio", "0.5", *pre, *[f"--seg={o}" for o in SEG]]
    assert main(args) == 0
    r = json.loads((out / "ablation.json").read_text())
    assert list(r["variants"]) == ["full", "causal"]
    for name, v in r["variants"].items():
        assert v["steps"] == 2 and (out / f"pretrain_{name}" / "checkpoints").is_dir()
    assert load_checkpoint(out / "pretrain_causal").meta["config"]["random_start"] is False
    assert load_checkpoint(out / "pretrain_full").meta["config"]["random_start"] is True
    assert set(r["probe"]) == {"random", "full", "causal"} and r["probe_layer"] == "1"
    assert sorted(x["arm"] for x in r["runs"]) == ["causal", "full", "scratch"]
    assert set(r["paired"]) == {"full", "causal"}
    md = (out / "ablation.md").read_text()
    assert "| causal | random_start=false |" in md and "| scratch / random init |" in md
    assert main([*args[:-len(SEG)], "--variants", "full,bogus"]) == 2


def test_every_ablation_variant_is_a_valid_change_of_the_cpu_config():
    from voxseq.tasks.experiments import ABLATIONS
    from voxseq.tasks.pretrain_ar import load_ar_config

    base = load_ar_config(ROOT / "configs" / "ar_tiny.yaml")
    seen = set()
    for name, overrides in ABLATIONS.items():
        cfg = load_ar_config(ROOT / "configs" / "ar_tiny.yaml", overrides)
        changed = {k for k in ("random_start", "sequence", "model") if getattr(cfg, k) != getattr(base, k)}
        assert bool(changed) == (name != "full"), name
        seen.add((cfg.random_start, cfg.sequence.stride, tuple(sorted(cfg.sequence.kind_weights.items())),
                  cfg.model.pos_origin))
    assert len(seen) == len(ABLATIONS)  # no two variants train the same thing
    assert {load_ar_config(ROOT / "configs" / "ar_tiny.yaml", ABLATIONS[f"stride{s}"]).sequence.stride
            for s in (4, 12)} == {4, 12}
    assert load_ar_config(ROOT / "configs" / "ar_tiny.yaml", ABLATIONS["volume-positions"]).model.pos_origin == "volume"
