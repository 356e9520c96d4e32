"""metrics.jsonl: one row per step, truncated on resume; loss curve plot."""

from __future__ import annotations

from voxseq.train.metrics import MetricsLogger, read_metrics
from voxseq.train.plots import plot_loss_curve


def test_resume_truncates_rows_after_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path)
    for s in range(8):
        log.log({"step": s, "loss": 1.0 / (s + 1), "lr": 0.1})
    log.close()
    log = MetricsLogger(tmp_path, resume_step=4)  # resumed from the checkpoint after step 4
    log.log({"step": 5, "loss": 0.5, "lr": 0.1})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]
    png = plot_loss_curve(read_metrics(tmp_path), tmp_path / "plots" / "loss.png")
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
