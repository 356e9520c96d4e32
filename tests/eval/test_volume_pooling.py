"""Volume-level scores from tiles: pooling rules on known inputs, organ-localised scoring, prompt-localised
organs, half-overlapping tiles along z and batched chunk embedding equal to one forward per chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxseq import VoxseqError
from voxseq.eval import zero_shot
from voxseq.sequence.chunks import label_counts, volume_chunks, window_organs


def test_pools_on_known_inputs():
    p = np.array([0.1, 0.9, 0.5, 0.2])
    assert zero_shot.pool_probabilities(p, "max") == pytest.approx(0.9)
    assert zero_shot.pool_probabilities(p, "mean") == pytest.approx(0.425)
    assert zero_shot.pool_probabilities(p, "topk", k=2) == pytest.approx(0.7)
    assert zero_shot.pool_probabilities(p, "topk", k=10) == pytest.approx(0.425)  # k beyond the tiles: all of them
    assert zero_shot.pool_probabilities(p, "noisy-or") == pytest.approx(1 - 0.9 * 0.1 * 0.5 * 0.8)
    assert zero_shot.pool_probabilities(np.array([1.0, 0.0]), "noisy-or") == pytest.approx(1.0)
    assert np.isnan(zero_shot.pool_probabilities(np.array([]), "max"))
    with pytest.raises(VoxseqError, match="pool must be one of"):
        zero_shot.pool_probabilities(p, "median")
    with pytest.raises(VoxseqError, match="k >= 1"):
        zero_shot.pool_probabilities(p, "topk", k=0)


def test_localised_scores_pool_only_the_tiles_showing_the_labels_organ():
    # two labels: a liver finding and one without an organ; volume 0 has 3 tiles, volume 1 has 2
    tile_p = [np.array([[0.9, 0.1], [0.2, 0.3], [0.1, 0.8]]), np.array([[0.95, 0.4], [0.3, 0.2]])]
    organs = [[["lung"], ["liver"], ["liver", "kidney"]], [["heart"], ["spleen"]]]
    s = zero_shot.localised_scores(tile_p, organs, ["liver", None], "max")
    # volume 0: the liver label sees tiles 1-2 only (0.2, 0.1), not the lung tile's 0.9
    # volume 1: no tile shows the liver, so every tile counts; the organ-less label always sees every tile
    np.testing.assert_allclose(s, [[0.2, 0.8], [0.95, 0.4]])
    np.testing.assert_allclose(zero_shot.localised_scores(tile_p, None, ["liver", None], "max"), [[0.9, 0.8], [0.95, 0.4]])
    np.testing.assert_allclose(zero_shot.localised_scores(tile_p, organs, ["liver", None], "mean"),
                               [[0.15, 0.4], [0.625, 0.3]])


def test_prompt_localised_organs_are_the_most_similar_prompts():
    organ_emb = np.eye(3, dtype=np.float32)  # lung, liver, heart
    tiles = np.array([[0.9, 0.5, 0.1], [0.0, 0.2, 1.0]], np.float32)
    assert zero_shot.prompt_localised_organs(tiles, organ_emb, ["lung", "liver", "heart"], top=2) == \
        [["lung", "liver"], ["heart", "liver"]]
    assert zero_shot.prompt_localised_organs(tiles, organ_emb, ["lung", "liver", "heart"], top=1) == [["lung"], ["heart"]]


def test_z_overlapping_tiles_cover_the_volume_by_half_steps():
    img = np.arange(40 * 8 * 8, dtype=np.float32).reshape(1, 40, 8, 8)
    plain = volume_chunks(img, 4, 16, 0.0)
    half = volume_chunks(img, 4, 16, 0.0, z_overlap=True)
    assert [c["z0"] for c in plain] == [0, 16, 32]
    assert [c["z0"] for c in half] == [0, 8, 16, 24]  # the last slab ends at the last slice
    assert all(c["z1"] - c["z0"] == 16 for c in half)
    # a slab's tokens are the volume's voxels at its slices
    from voxseq.sequence.patches import patchify

    ref = patchify(torch.from_numpy(img[None, :, 8:24]), 4)[0]
    torch.testing.assert_close(half[1]["tokens"], ref)


def test_window_organs_follow_the_masks():
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[:8] = 5  # liver in the upper half of z
    labels[8:, :4, :4] = 7  # a small kidney below
    counts = label_counts(labels)
    mapping = {"liver": [5], "kidney": [7, 8]}
    assert window_organs(labels, counts, mapping, [0, 0, 0], [8, 16, 16]) == ["liver"]
    assert window_organs(labels, counts, mapping, [8, 0, 0], [8, 16, 16]) == ["kidney"]
    assert window_organs(labels, counts, mapping, [4, -4, -4], [8, 16, 16]) == ["liver", "kidney"]  # passes the edge


def test_batched_chunk_embedding_equals_one_forward_per_chunk():
    from voxseq.models.vit3d import ViTConfig
    from voxseq.models.vlp import SigVLP, VLPModelConfig
    from voxseq.sequence.chunks import collate_packed

    torch.manual_seed(0)
    vision = ViTConfig(in_chans=1, patch_size=4, embed_dim=32, depth=2, num_heads=2, pos_embed="rope3d")
    model = SigVLP(VLPModelConfig(vision=vision, embed_dim=16, text_model=None, freeze_text=True)).eval()
    img = np.random.default_rng(0).normal(size=(1, 24, 16, 20)).astype(np.float32)
    items = volume_chunks(img, 4, 8, -1.0, tile_yx=[8, 8], z_overlap=True) + volume_chunks(img, 4, None, -1.0)
    batched = zero_shot.embed_items(model, items, batch_tokens=64)
    with torch.no_grad():
        single = np.concatenate([model.encode_chunks(b["tokens"], b["pos"], b["segment"], 1).numpy()
                                 for b in (collate_packed([it], it["tokens"].shape[0]) for it in items)])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert batched.shape == (len(items), 16)


def test_report_sentences_meet_the_tiles_of_their_organ():
    from voxseq.eval.retrieval import sentence_tile_similarity
    from voxseq.tasks.eval_vlp import report_sentences

    sent = np.eye(3, dtype=np.float32)  # 0: a lung sentence, 1: a liver sentence, 2: a sentence with no organ
    tiles = [np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32),  # volume 0: lung tile, liver tile, other
             np.array([[0, 1, 0], [0, 1, 0]], np.float32)]  # volume 1: liver tiles only
    organs = [[["lung"], ["liver"], []], [["liver"], ["liver"]]]
    reports = [[("lung", 0), ("liver", 1)], [("liver", 1)], [(None, 2)]]
    sim = sentence_tile_similarity(tiles, organs, reports, sent, k=1)
    # report 0 in volume 0: lung sentence meets the lung tile (1), liver sentence the liver tile (1)
    # report 0 in volume 1: no lung tile, so the lung sentence meets every tile (0); the liver one 1
    np.testing.assert_allclose(sim, [[1.0, 0.5], [1.0, 1.0], [1.0, 0.0]])
    # organs unknown: every sentence meets every tile
    np.testing.assert_allclose(sentence_tile_similarity(tiles, None, reports, sent, k=1), [[1, 0.5], [1, 1], [1, 0]])
    assert report_sentences({"sentences": {"lung": "The lungs are clear.", "heart": " "}}) == [("lung", "The lungs are clear.")]
    assert report_sentences({"text": "No nodule. Heart normal!  Aorta fine."}) == \
        [(None, "No nodule."), (None, "Heart normal!"), (None, "Aorta fine.")]
