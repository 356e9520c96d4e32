"""Zero-shot evaluation pieces with known answers: prompt files (pairs, organs, errors) and the finding-in-organ
chunk scoring."""

from __future__ import annotations

import numpy as np
import pytest

from voxseq import VoxseqError
from voxseq.eval import zero_shot as eval_vlp


def test_prompt_files_take_pairs_organs_and_mappings(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text('a: ["A is here.", "No A."]\n'
                 'b: ["B is here.", "No B.", liver]\n'
                 'c: {present: "C is here.", absent: "No C.", organ: kidney}\n', encoding="utf-8")
    assert eval_vlp.load_prompts(f, []) == {"a": ("A is here.", "No A."), "b": ("B is here.", "No B."),
                                            "c": ("C is here.", "No C.")}
    assert eval_vlp.prompt_organs(f) == {"b": "liver", "c": "kidney"}
    assert eval_vlp.prompt_organs(None) == {}
    for bad in ('a: ["one"]\n', 'a: ["1", "2", "3", "4"]\n', 'a: {present: "x", organ: liver}\n',
                'a: {present: "x", absent: "y", colour: red}\n', "a: 3\n", ""):
        f.write_text(bad, encoding="utf-8")
        with pytest.raises(VoxseqError, match="present prompt, absent prompt"):
            eval_vlp.load_prompts(f, [])


def test_findings_in_organ_chunks_score_only_chunks_showing_the_organ(monkeypatch):
    texts = {"Lesion.": [1.0, 0.0, 0.0], "Normal.": [0.0, 1.0, 0.0]}
    monkeypatch.setattr(eval_vlp, "embed_texts", lambda model, tok, t, n: np.array([texts[s] for s in t], np.float32))
    entries = [{"classes": {"liver lesion": 1}}, {"classes": {"liver lesion": 0}}, {"classes": {}}]
    items = [{"organs": ["liver"], "volume_index": 0}, {"organs": ["liver", "kidney"], "volume_index": 0},
             {"organs": ["liver"], "volume_index": 1}, {"organs": ["liver"], "volume_index": 1},
             {"organs": ["kidney"], "volume_index": 0},  # does not show the liver: not scored
             {"organs": ["liver"], "volume_index": 2}]  # no label for this volume: not scored
    img = np.array([[0.9, 0.1, 0.4], [0.6, 0.5, 0.1], [0.2, 0.8, 0.5], [0.55, 0.5, 0.0], [0.0, 1.0, 0.0],
                    [1.0, 0.0, 0.0]], np.float32)
    r = eval_vlp.finding_classification(None, None, items, img, entries, {"liver lesion": ("Lesion.", "Normal.")},
                                        {"liver lesion": "liver"}, 8)
    m = r["per_label"]["liver lesion"]
    assert (m["n"], m["positives"], m["volumes"], m["organ"]) == (4, 2, 2, "liver")
    assert m["auc"] == 1.0 and r["mean_auc"] == 1.0 and r["n_chunks"] == 6
    # swap which volume has the lesion: every positive now scores below every negative
    entries[0]["classes"]["liver lesion"], entries[1]["classes"]["liver lesion"] = 0, 1
    r = eval_vlp.finding_classification(None, None, items, img, entries, {"liver lesion": ("Lesion.", "Normal.")},
                                        {"liver lesion": "liver"}, 8)
    assert r["per_label"]["liver lesion"]["auc"] == 0.0
    # no chunk shows the organ: nothing to report
    assert eval_vlp.finding_classification(None, None, items, img, entries, {"x": ("Lesion.", "Normal.")},
                                           {"x": "spleen"}, 8) is None


def test_default_prompts_are_ct_clips_and_a_side_may_average_several(tmp_path, monkeypatch):
    assert eval_vlp.load_prompts(None, ["Lung nodule", "emphysema"]) == {
        "Lung nodule": ("Lung nodule.", "not Lung nodule."), "emphysema": ("emphysema.", "not emphysema.")}
    f = tmp_path / "p.yaml"
    f.write_text('a: [["A.", "A is seen."], "No A."]\n'
                 'b: {present: ["B.", "B is seen."], absent: ["No B.", "B is absent."], organ: lung}\n'
                 'c: [["C."], "No C.", heart]\n', encoding="utf-8")
    pairs = eval_vlp.load_prompts(f, [])
    assert pairs == {"a": (("A.", "A is seen."), "No A."), "b": (("B.", "B is seen."), ("No B.", "B is absent.")),
                     "c": ("C.", "No C.")}  # a one-prompt list is that prompt
    assert eval_vlp.prompt_organs(f) == {"b": "lung", "c": "heart"}
    for bad in ('a: [[], "No A."]\n', 'a: [["A.", 3], "No A."]\n', 'a: ["A.", "No A.", [lung]]\n'):
        f.write_text(bad, encoding="utf-8")
        with pytest.raises(VoxseqError, match="a side may be a list of prompts"):
            eval_vlp.load_prompts(f, [])
    # several prompts on a side: the normalised mean of their unit embeddings, from one text-tower call
    texts = {"A.": [2.0, 0.0], "A is seen.": [0.0, 1.0], "No A.": [-1.0, 0.0]}
    calls = []
    monkeypatch.setattr(eval_vlp, "embed_texts",
                        lambda model, tok, t, n: calls.append(list(t)) or np.array([texts[s] for s in t]))
    emb = eval_vlp.embed_prompts(None, None, [("A.", "A is seen."), "No A."], 8)
    r = 1 / np.sqrt(2)
    np.testing.assert_allclose(emb, [[r, r], [-1.0, 0.0]])
    assert calls == [["A.", "A is seen.", "No A."]]


def test_operating_point_values():
    assert eval_vlp.parse_operating_point("youden") == ("youden", None)
    assert eval_vlp.parse_operating_point("corner") == ("corner", None)
    assert eval_vlp.parse_operating_point("0.5") == ("fixed", 0.5) == eval_vlp.parse_operating_point(0.5)
    with pytest.raises(VoxseqError, match="youden, corner or a threshold"):
        eval_vlp.parse_operating_point("best")


def test_per_volume_predictions_csv(tmp_path):
    import csv

    ids = ["valid_1_a_1", "valid_1_a_2", "valid_2_a_1"]
    names = ["Lung nodule", "Emphysema"]
    scores = np.array([[0.9, 0.125], [0.25, 0.5], [1 / 3, 0.0]])
    truth = np.array([[1, 0], [0, 1], [0, 0]])
    path = eval_vlp.write_predictions(tmp_path / "zero_shot_predictions.csv", ids, names, scores, truth)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "Lung nodule", "Emphysema", "Lung nodule (truth)", "Emphysema (truth)"]
    assert [r[0] for r in rows[1:]] == ids  # one row per volume, in order, by its record id
    got = np.array([[float(v) for v in r[1:3]] for r in rows[1:]])
    np.testing.assert_array_equal(got, scores)  # probabilities written exactly
    assert [r[3:] for r in rows[1:]] == [["1", "0"], ["0", "1"], ["0", "0"]]
    with pytest.raises(ValueError, match="do not agree"):
        eval_vlp.write_predictions(tmp_path / "x.csv", ids[:2], names, scores, truth)


def test_volume_to_volume_labels_are_the_binary_ones_every_volume_has():
    entries = [{"classes": {"a": 1, "b": 0, "grade": 2, "c": 1}}, {"classes": {"a": 0.0, "b": 1.0, "grade": 1}},
               {"classes": {"a": 0, "b": 0, "grade": 0, "d": 1}}]
    assert eval_vlp.shared_binary_labels(entries) == ["a", "b"]  # c and d are not on every volume; grade is not 0/1
    assert eval_vlp.shared_binary_labels([]) == [] and eval_vlp.shared_binary_labels([{"text": "x"}]) == []
