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


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a figure (its folder created) and free it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _plt().close(fig)
    return path


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
    return save_figure(fig, path)


def plot_label_overlays(image: np.ndarray, maps: dict[str, np.ndarray], names: dict[int, str], slices: Sequence[int],
                        path: str | os.PathLike, title: str = "") -> Path:
    """Axial slices (rows) of a (Z, Y, X) image, bare and under each label map (columns), one colour per label.

    Ground truth and predictions side by side on the same slices is how a segmentation is judged at a
    glance; the colours stay fixed per label id so that columns compare directly."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _plt()
    n_labels = max(names) + 1
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[: n_labels]
    cmap = ListedColormap(colours)
    cols = ["image", *maps]
    fig, axes = plt.subplots(len(slices), len(cols), figsize=(2.6 * len(cols), 2.6 * len(slices) + 0.8), dpi=110,
                             squeeze=False)
    lo, hi = np.percentile(image, [1, 99])
    for r, z in enumerate(slices):
        for c, name in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(image[z], cmap="gray", vmin=lo, vmax=hi)
            if name != "image":
                lab = np.asarray(maps[name][z])
                ax.imshow(np.ma.masked_where(lab == 0, lab), cmap=cmap, vmin=0, vmax=n_labels - 1, alpha=0.55,
                          interpolation="nearest")
            if r == 0:
                ax.set_title(name, fontsize=8)
            ax.text(2, 2, f"z {z}", color="white", fontsize=7, va="top")
            ax.axis("off")
    handles = [Patch(color=colours[k], label=n) for k, n in sorted(names.items()) if k > 0]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=7, frameon=False)
    fig.suptitle(title or "Segmentation")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path)
