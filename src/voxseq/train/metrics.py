"""Run folders, metrics.jsonl and progress bars."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from voxseq.files import atomic_write_text


def loss_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean loss of the first and the last tenth of the steps (single steps are too noisy to compare)."""
    head, tail = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10):]
    first = sum(r["loss"] for r in head) / len(head)
    last = sum(r["loss"] for r in tail) / len(tail)
    return {"steps": rows[-1]["step"] + 1, "loss_start": first, "loss_end": last, "loss_drop": 1 - last / first}


class MetricsLogger:
    """Appends one JSON object per logged step to ``RUN_DIR/metrics.jsonl`` (flushed each line).

    ``resume_step``: rows with a step beyond it (written after the checkpoint we resume from) are
    dropped, so the file holds each step once and matches an uninterrupted run.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            rows = [r for r in read_metrics(self.path.parent) if r.get("step", -1) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self._f = open(self.path, "a")

    def log(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self.enabled:
            self._f.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                continue
    return rows


class Progress:
    """A rich progress bar over training steps showing loss, lr and throughput (silent when disabled)."""

    def __init__(self, total: int, start: int = 0, description: str = "train", enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        self.bar.start()
        self.task = self.bar.add_task(description, total=total, completed=start, info="")

    def update(self, step: int, **info: float) -> None:
        if self.enabled:
            text = "  ".join(f"{k} {v:.4g}" for k, v in info.items())
            self.bar.update(self.task, completed=step, info=text)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
