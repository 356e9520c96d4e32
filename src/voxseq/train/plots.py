"""Training plots (matplotlib, Agg backend, imported only when a plot is made)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, float)
    if len(v) < 2 or window <= 1:
        return v
    w = min(window, len(v))
    kernel = np.ones(w) / w
    padded = np.concatenate([np.full(w - 1, v[0]), v])
    return np.convolve(padded, kernel, mode="valid")


def plot_loss_curve(rows: list[dict[str, Any]], path: str | os.PathLike, key: str = "loss", title: str = "") -> Path:
    """Loss per step (raw and smoothed) with the learning rate on a second axis."""
    plt = _plt()
    rows = [r for r in rows if key in r]
    steps = [r["step"] for r in rows]
    loss = [r[key] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label=key)
    ax.plot(steps, smooth(loss, max(1, len(loss) // 20)), color="tab:blue", lw=2, label=f"{key} (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    if rows and "lr" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", lw=1, label="lr")
        ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(title or key)
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
