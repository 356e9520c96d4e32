"""`voxseq demo --quick` end to end: cache, sequences, AR pretraining, report."""

from __future__ import annotations

import json

from voxseq.cli import main


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["volumes"] == 6 + 2 + 3  # CT and MRI phantoms plus the three real samples
    assert metrics["pretrain"]["steps"] == 40
    assert metrics["pretrain"]["loss_drop"] > 0.1  # the model learns: last tenth of steps well below the first
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "voxseq pretrain ar" in page
    assert (out / "report.md").is_file()
    # a re-run reuses the cache and the finished pretraining
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["pretrain"]["reused"] is True and again["wall_s"] < metrics["wall_s"]
