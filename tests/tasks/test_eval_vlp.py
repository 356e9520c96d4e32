"""Zero-shot evaluation pieces with known answers: prompt files (pairs, organs, errors) and the finding-in-organ
chunk scoring."""

from __future__ import annotations

import numpy as np
import pytest

from voxseq import VoxseqError
from voxseq.tasks import eval_vlp


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
