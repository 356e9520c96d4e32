"""SigVLP end to end on tiny phantoms: run folder, learning, exact resume, zero-shot / retrieval / embed /
finetune on the checkpoint, volumes longer than any training chunk, DDP with 2 gloo processes.

The text tower is a tiny randomly initialised BERT saved to a local folder with the packaged MiniLM's
tokenizer: fast, and it exercises loading "any local Hugging Face checkpoint by path"."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from voxseq.cli import main
from voxseq.config import from_dict
from voxseq.data.cache import Cache
from voxseq.sequence.chunks import ChunkConfig, ChunkTextDataset
from voxseq.train.checkpoint import load_checkpoint
from voxseq.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "vlp_tiny.yaml"
PROMPTS = ROOT / "configs" / "prompts_phantom.yaml"


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    from voxseq.models.vlp import default_text_model

    folder = tmp_path_factory.mktemp("tiny_bert")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_text_model() / name, folder / name)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)
    return folder


def test_frozen_text_tower_has_no_dropout_and_computes_each_sentence_once(text_model):
    import torch

    from voxseq.models.vit3d import ViTConfig
    from voxseq.models.vlp import SigVLP, VLPModelConfig, load_tokenizer
    from voxseq.tasks.pretrain_vlp import tokenize

    torch.manual_seed(0)
    vision = ViTConfig(patch_size=4, embed_dim=16, depth=1, num_heads=2, pos_embed="rope3d")
    model = SigVLP(VLPModelConfig(vision=vision, text_model=str(text_model), embed_dim=8, freeze_text=True))
    for m in model.text.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5  # would make the features differ from the eval-mode ones below if it were active
    model.train()
    assert model.training and not model.text.training
    texts = ["The liver is unremarkable.", "The heart is enlarged.", "The liver is unremarkable."]
    t = tokenize(load_tokenizer(str(text_model)), texts, 32)
    calls = []
    model.text.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    a = model.encode_text(t["input_ids"], t["attention_mask"])
    b = model.encode_text(t["input_ids"], t["attention_mask"])
    assert calls == [2]  # two distinct sentences, computed once; the second call comes from the cache
    assert torch.equal(a, b) and torch.equal(a[0], a[2])
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model.text_proj(model.text(t["input_ids"], t["attention_mask"])), dim=-1)
    assert torch.allclose(a, direct, atol=1e-6)
    a.sum().backward()  # the projection learns, the tower does not
    assert model.text_proj.weight.grad is not None and all(p.grad is None for p in model.text.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["text.model.embeddings.word_embeddings.weight"] += torch.randn_like(state["text.model.embeddings.word_embeddings.weight"])
    model.load_state_dict(state)  # new text weights: the kept features are dropped
    c = model.encode_text(t["input_ids"], t["attention_mask"])
    assert calls == [2, 3, 2] and not torch.allclose(c, a)


def tiny(text_model: Path) -> list[str]:
    return ["model.vision.depth=2", "model.vision.embed_dim=32", "model.vision.num_heads=2", "model.embed_dim=32",
            f"model.text_model={text_model}", "model.freeze_text=false", "model.text_max_length=32",
            "chunks.min_slices=8", "chunks.max_slices=16", "chunks_per_batch=6", "max_tokens=256", "warmup_steps=2",
            "data.phantoms.n_ct=4", "data.phantoms.size_xy=48", "data.phantoms.max_slices=48", "data.workers=1",
            "data.preprocess.spacing_xyz=[6,6,6]", "log_every=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, text_model) -> Path:
    run = tmp_path_factory.mktemp("prep")
    assert main(["pretrain", "vlp", "--config", str(CONFIG), "--out", str(run / "r"), *tiny(text_model), "max_steps=1",
                 f"data.cache={run / 'cache'}"]) == 0
    return run / "cache"


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_model, cache) -> Path:
    out = tmp_path_factory.mktemp("vlp") / "run"
    assert main(["pretrain", "vlp", "--config", str(CONFIG), "--out", str(out), *tiny(text_model), "max_steps=24",
                 "checkpoint_every=12", f"data.cache={cache}", "lr=0.003"]) == 0
    return out


def test_run_folder_contents_and_learning(tmp_path, trained, text_model, cache):
    rows = read_metrics(trained)
    assert [r["step"] for r in rows] == list(range(24))
    assert all(k in rows[-1] for k in ("step", "loss", "lr", "tokens_per_s", "padding_waste", "temperature", "bias"))
    assert max(r["padding_waste"] for r in rows) < 0.5 and np.mean([r["padding_waste"] for r in rows]) < 0.2
    assert sorted(p.name for p in (trained / "checkpoints").glob("*.json")) == ["model_00000012.json", "model_00000024.json"]
    for plot in ("loss_curve.png", "similarity.png"):
        assert (trained / "plots" / plot).stat().st_size > 5000
    meta = json.loads((trained / "checkpoints" / "model_00000024.json").read_text())
    assert meta["model"]["pos_embed"] == "rope3d" and meta["vlp_model"]["text_model"] == str(text_model)
    # the same batches without learning (lr=0): training must beat it on the last steps
    frozen = tmp_path / "frozen"
    assert main(["pretrain", "vlp", "--config", str(CONFIG), "--out", str(frozen), *tiny(text_model), "max_steps=24",
                 f"data.cache={cache}", "lr=0.0"]) == 0
    late = range(16, 24)
    assert sum(losses(trained)[s] for s in late) < 0.7 * sum(losses(frozen)[s] for s in late)


def test_resume_reproduces_uninterrupted_losses(tmp_path, text_model, cache):
    common = ["pretrain", "vlp", "--config", str(CONFIG), *tiny(text_model), "checkpoint_every=2", "max_steps=6",
              f"data.cache={cache}"]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--out", str(tmp_path / "cut")]) == 0
    for step in (4, 6):  # as if killed after the step-2 checkpoint
        (tmp_path / "cut" / "checkpoints" / f"model_{step:08d}.json").unlink()
    assert main([*common, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_zero_shot_organ_chunks_are_placed_alike_for_every_checkpoint(trained, cache):
    from voxseq.tasks.eval_vlp import organ_chunks

    meta = load_checkpoint(trained).meta
    placed = {}
    for jitter in (0.0, 0.5):  # checkpoints trained with organ windows placed differently ...
        m = copy.deepcopy(meta)
        m["config"]["chunks"].update(crop_yx=[16, 16], crop_center="organ", organ_jitter=jitter)
        placed[jitter] = [(c["z0"], c["y0"], c["x0"]) for c in organ_chunks(Cache(cache), m, 40)]
    assert placed[0.0] and placed[0.0] == placed[0.5]  # ... are scored on the same organ chunks
    # (what the pin prevents: the checkpoint's own jitter would move the windows)
    cfg = {**meta["config"]["chunks"], "crop_yx": [16, 16], "crop_center": "organ", "lesion_centred": False,
           "focus_fraction": 0.0, "seed": 12345}
    own = [ChunkTextDataset(Cache(cache), from_dict(ChunkConfig, {**cfg, "organ_jitter": j}))[i]["y0"]
           for j in (0.0, 0.5) for i in range(40)]
    assert own[:40] != own[40:]


def test_zero_shot_retrieval_embed_and_finetune_take_the_checkpoint(tmp_path, trained):
    from voxseq.data.phantoms import write_phantoms

    # held-out phantoms with more slices (48 at 6 mm... up to 64 at 3 mm) than any 16-slice training chunk
    manifest = write_phantoms(tmp_path / "heldout", n_ct=4, n_mri=0, seed=7, size_xy=48, max_slices=48, progress=False)
    out = tmp_path / "zs"
    assert main(["evaluate", "zero-shot", "--checkpoint", str(trained), "--prompts", str(PROMPTS), "--out", str(out),
                 str(manifest)]) == 0
    r = json.loads((out / "zero_shot.json").read_text())
    assert r["n_volumes"] == 4 and max(r["slices"]) > 16
    assert set(r["per_label"]) == {"lung nodule", "pleural effusion", "cardiomegaly", "liver lesion", "kidney cyst",
                                   "bone lesion"}
    for m in r["per_label"].values():
        assert 0.0 <= m["acc"] <= 1.0 and (np.isnan(m["auc"]) or 0.0 <= m["auc"] <= 1.0)
    o = r["organ_classification"]
    assert 0.0 <= o["top1_accuracy"] <= 1.0 and 0.0 < o["top1_chance"] <= o["top1_majority"] <= 1.0
    f = r["finding_in_organ_chunks"]  # the prompts name an organ for every finding but the (box-less) effusion
    assert f["per_label"] and set(f["per_label"]) <= {"lung nodule", "cardiomegaly", "liver lesion", "kidney cyst", "bone lesion"}
    for m in f["per_label"].values():
        assert m["n"] >= m["positives"] and m["volumes"] <= 4 and (np.isnan(m["auc"]) or 0.0 <= m["auc"] <= 1.0)
    assert (out / "roc.png").is_file() and "Zero-shot abnormality" in (out / "zero_shot.md").read_text()
    assert "findings in organ chunks" in (out / "zero_shot.md").read_text()
    # the CT-RATE protocol: Youden operating point, 1000 bootstrap resamples, one CSV row per volume by its id
    assert r["rule"] == "youden" and r["bootstrap"]["resamples"] == 1000 and r["predictions"] == "zero_shot_predictions.csv"
    assert len(r["ids"]) == 4 and 0.0 < r["temperature"] < 1.0
    for m in r["per_label"].values():
        assert "precision" in m and ("note" in m or m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1])
    rows = (out / "zero_shot_predictions.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["id", "lung nodule"] and [row.split(",")[0] for row in rows[1:]] == r["ids"]
    assert main(["evaluate", "zero-shot", "--checkpoint", str(trained), "--aggregate", "chunks", "--chunk-slices", "8",
                 "--labels", "liver lesion", "--prompts", str(PROMPTS), "--out", str(tmp_path / "zs2"), str(out / "cache"),
                 "--organ-chunks", "30", "--organ-chunk-slices", "32", "--operating-point", "0.5",
                 "--bootstrap", "0"]) == 0  # organ chunks twice the training's thickest
    r2 = json.loads((tmp_path / "zs2" / "zero_shot.json").read_text())
    assert list(r2["per_label"]) == ["liver lesion"] and r2["organ_chunk_slices"] == 32
    assert r2["rule"] == "fixed" and r2["per_label"]["liver lesion"]["threshold"] == 0.5 and "bootstrap" not in r2
    assert 0 < r2["organ_classification"]["n_chunks"] <= 30 and "32 slices each" in (tmp_path / "zs2" / "zero_shot.md").read_text()

    # volume scores from tiles of the training chunk, each label pooled over the tiles that show its organ
    assert main(["evaluate", "zero-shot", "--checkpoint", str(trained), "--aggregate", "organ", "--pool", "max",
                 "--prompts", str(PROMPTS), "--out", str(tmp_path / "zs3"), str(out / "cache"), "--organ-chunks", "10",
                 "--bootstrap", "0"]) == 0
    r3 = json.loads((tmp_path / "zs3" / "zero_shot.json").read_text())
    a = r3["aggregation"]
    assert (a["localise"], a["pool"], a["top_k"]) == ("masks", "max", 3) and len(a["tiles_per_volume"]) == 4
    assert a["label_organs"]["liver lesion"] == "liver" and a["label_organs"]["pleural effusion"] is None
    assert set(a["comparison"]) == {"masks", "prompts", "none"}
    assert all(set(row) == {"topk", "max", "noisy-or", "mean"} for row in a["comparison"].values())
    assert a["comparison"]["masks"]["max"]["mean_auc"] == pytest.approx(r3["mean_auc"], nan_ok=True)
    assert "Volume scores from tiles" in (tmp_path / "zs3" / "zero_shot.md").read_text()
    tiles = np.load(tmp_path / "zs3" / a["tiles"])  # every tile's scores, to pool again without embedding
    assert tiles["p"].shape == (sum(a["tiles_per_volume"]), len(r3["per_label"])) and len(tiles["ids"]) == 4
    assert tiles["shows"].shape == (len(tiles["p"]), len(tiles["organs"])) and "liver" in list(tiles["organs"])
    box = tiles["box_zyx"]  # where each tile sits: training-chunk sized, overlapping by half, covering the volume
    assert box.shape == (len(tiles["p"]), 6) and (box[:, 3:] > box[:, :3]).all()
    first = box[tiles["volume"] == 0]
    cache = Cache(out / "cache")
    shape = next(cache.entry(i)["shape_zyx"] for i in range(len(cache)) if cache.entry(i)["id"] == tiles["ids"][0])
    assert first[:, 0].min() == 0 and first[:, 3].max() >= shape[0] and len(np.unique(first[:, 0])) > 1
    assert main(["evaluate", "zero-shot", "--checkpoint", str(trained), "--aggregate", "organ", "--pool", "median",
                 "--out", str(tmp_path / "zs4"), str(out / "cache")]) == 2

    assert main(["evaluate", "retrieval", "--checkpoint", str(trained), "--aggregate", "organ",
                 "--out", str(tmp_path / "rt2"), str(out / "cache")]) == 0
    rt2 = json.loads((tmp_path / "rt2" / "retrieval.json").read_text())
    assert rt2["aggregate"] == "organ" and rt2["localise"] == "masks" and rt2["volume_to_report"]["R@5"] == 1.0
    assert "MAP@5" in rt2["volume_to_volume"]
    assert main(["evaluate", "retrieval", "--checkpoint", str(trained), "--out", str(tmp_path / "rt"), str(out / "cache")]) == 0
    rt = json.loads((tmp_path / "rt" / "retrieval.json").read_text())
    assert rt["n"] == 4 and rt["volume_to_report"]["R@5"] == 1.0  # 4 volumes: every report is in the top 5
    assert 0.0 <= rt["volume_to_report"]["R@1"] <= 1.0
    assert list(rt["volume_to_volume"]) == ["MAP@1", "MAP@5", "MAP@10", "MAP@50", "MAP@100"]
    assert "lung nodule" in rt["volume_to_volume_labels"] and rt["volume_to_volume_queries"] <= 4

    assert main(["embed", "--checkpoint", str(trained), "--per-token", "--out", str(tmp_path / "e.npz"),
                 str(ROOT / "data" / "samples" / "lung1_image.nrrd")]) == 0
    e = np.load(tmp_path / "e.npz")
    assert e["features"].shape[1] == 32 and e["voxel_ijk"].shape == (e["features"].shape[0], 3)

    seg = ROOT / "configs" / "seg_phantom_tiny.yaml"
    assert main(["finetune", "seg", "--config", str(seg), "--init", str(trained), "--out", str(tmp_path / "seg"),
                 "max_steps=2", "roi_zyx=[16,16,16]", "batch_size=1", "data.phantoms.n_ct=3", "data.phantoms.size_xy=48",
                 "data.phantoms.max_slices=48", "data.workers=1"]) == 0
    meta = json.loads(sorted((tmp_path / "seg" / "checkpoints").glob("model_*.json"))[-1].read_text())
    assert meta["model"]["pos_embed"] == "rope3d"  # the UNETR encoder is the rotary SigVLP vision tower


def test_zero_shot_bad_prompts_and_foreign_cache_are_clear_errors(tmp_path, trained, cache, text_model, capsys):
    bad = tmp_path / "prompts.yaml"
    bad.write_text("liver lesion: only one prompt\n")
    assert main(["evaluate", "zero-shot", "--checkpoint", str(trained), "--prompts", str(bad), "--out", str(tmp_path / "o"),
                 str(cache)]) == 2
    assert "needs [present prompt, absent prompt]" in capsys.readouterr().err
    other = tmp_path / "other_cache"  # the same volumes prepared with another window: would drift from training
    assert main(["prepare", str(cache.parent / "phantoms_ct4_mri0_seed0_48" / "manifest.jsonl"), "--out", str(other),
                 "--window", "liver", "-j", "1"]) == 0
    assert main(["evaluate", "retrieval", "--checkpoint", str(trained), "--out", str(tmp_path / "r"), str(other)]) == 2
    assert "other settings than the checkpoint's preprocessing" in capsys.readouterr().err
    # a one-channel cache under a three-channel (three-window) vision tower: said before any step
    assert main(["pretrain", "vlp", "--config", str(CONFIG), "--out", str(tmp_path / "c3"), *tiny(text_model),
                 "model.vision.in_chans=3", f"data.cache={cache}"]) == 2
    assert "1] channel(s)" in capsys.readouterr().err and not (tmp_path / "c3" / "checkpoints").exists()
    # a cache that lists more volumes than the configured data: refused, its index left whole
    before = (cache / "index.jsonl").read_text()
    assert main(["pretrain", "vlp", "--config", str(CONFIG), "--out", str(tmp_path / "fewer"), *tiny(text_model),
                 "data.phantoms.n_ct=2", f"data.cache={cache}"]) == 2
    assert "would drop them from its index" in capsys.readouterr().err
    assert (cache / "index.jsonl").read_text() == before


def torchrun(out: Path, cache: Path, text_model: Path, port: int, *extra: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "voxseq.cli", "pretrain", "vlp", "--config", str(CONFIG), "--out", str(out), *tiny(text_model),
           "checkpoint_every=2", f"data.cache={cache}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_gloo_processes_train_and_resume_exactly(tmp_path, cache, text_model):
    torchrun(tmp_path / "full", cache, text_model, 29537, "max_steps=4")
    assert [x["step"] for x in read_metrics(tmp_path / "full")] == list(range(4))
    torchrun(tmp_path / "cut", cache, text_model, 29537, "max_steps=4")
    (tmp_path / "cut" / "checkpoints" / "model_00000004.json").unlink()
    torchrun(tmp_path / "cut", cache, text_model, 29537, "max_steps=4", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_vision_tower_starts_from_an_ar_run(tmp_path, text_model, cache):
    """`pretrain vlp --init AR_RUN`: the AR encoder's weights become the rotary vision tower's (lr 0 keeps them),
    the run records where they came from, and another architecture is refused naming the override."""
    import torch

    from voxseq.models.hub import load_checkpoint

    ar = tmp_path / "ar"
    assert main(["pretrain", "ar", "--config", str(ROOT / "configs" / "ar_tiny.yaml"), "--out", str(ar),
                 "model.patch_size=8", "sequence.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                 "batch_size=1", "max_steps=2", "warmup_steps=1", "data.phantoms.n_ct=2", "data.phantoms.n_mri=0",
                 "data.phantoms.size_xy=48", "data.phantoms.max_slices=48", "data.samples=false", "data.workers=1",
                 "data.preprocess.spacing_xyz=[6,6,6]", "data.preprocess.min_shape_zyx=[32,32,32]",
                 "sequence.crop_zyx=[32,32,32]", "sequence.subvolume_zyx=[8,32,32]",
                 "sequence.kind_weights={spatial: 1.0}"]) == 0
    vlp = tmp_path / "vlp"
    assert main(["pretrain", "vlp", "--config", str(CONFIG), "--out", str(vlp), "--init", str(ar), *tiny(text_model),
                 "max_steps=1", f"data.cache={cache}", "lr=0.0"]) == 0
    a, v = load_checkpoint(ar), load_checkpoint(vlp)
    assert v.meta["init"]["path"] == str(ar) and v.meta["init"]["from_pos_embed"] == "sincos"
    keys = [k for k in a.state_dict if k.startswith("encoder.blocks.") or k.startswith("encoder.patch_embed.")]
    assert len(keys) > 10 and v.meta["init"]["loaded"] >= len(keys)
    for k in keys:
        torch.testing.assert_close(v.state_dict[k], a.state_dict[k], msg=k)
    assert main(["pretrain", "vlp", "--config", str(CONFIG), "--out", str(tmp_path / "bad"), "--init", str(ar),
                 *tiny(text_model), "model.vision.depth=3", "max_steps=1", f"data.cache={cache}"]) == 2


def test_one_channel_patch_embedding_spreads_over_several(tmp_path):
    """A 1-channel encoder starts a 3-channel tower: three equal channels give what the one channel gave."""
    import dataclasses

    import torch

    from voxseq.checkpoint import save_checkpoint
    from voxseq.models.vit3d import ViT3D, ViTConfig
    from voxseq.models.vlp import SigVLP, VLPModelConfig
    from voxseq.tasks.pretrain_vlp import init_vision_tower

    torch.manual_seed(0)
    one = ViTConfig(patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    src = ViT3D(one)
    save_checkpoint(tmp_path / "enc", 1, {f"encoder.{k}": v for k, v in src.state_dict().items()},
                    meta={"task": "pretrain-ar", "model": dataclasses.asdict(one)})
    dst = SigVLP(VLPModelConfig(vision=dataclasses.replace(one, in_chans=3, pos_embed="rope3d"), embed_dim=8,
                                text_model=None))
    info = init_vision_tower(dst, tmp_path / "enc")
    assert "1 -> 3 channel" in info["summary"] and info["from_task"] == "pretrain-ar"
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(dst.encoder.patch_embed(x.repeat(1, 3, 1, 1, 1)), src.patch_embed(x))
        torch.testing.assert_close(dst.encoder.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
