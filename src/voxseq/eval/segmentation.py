"""Segmentation scoring: sliding-window prediction (MONAI), Dice per class (MONAI DiceMetric), the evaluation
of a model on cached volumes, and its report (``evaluation.json`` / ``evaluation.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn


def uses_volume_positions(model: nn.Module) -> bool:
    """Whether a model's encoder counts positions from the scan's origin (``ViTConfig.pos_origin="volume"``):
    then every window it is given must come with where it starts."""
    encoder = getattr(model, "encoder", model)
    return getattr(getattr(encoder, "cfg", None), "pos_origin", "crop") == "volume"


@torch.no_grad()
def sliding_predict(model: nn.Module, image: np.ndarray, roi: Sequence[int], overlap: float) -> np.ndarray:
    """Class map (Z, Y, X) of a (C, Z, Y, X) volume by MONAI sliding-window inference (each window's start
    in the volume passed to models whose encoder uses volume positions)."""
    from monai.inferers import sliding_window_inference

    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    device = next(model.parameters()).device  # windows on the model's device, the whole volume's logits on the CPU
    with_coord = uses_volume_positions(model)
    # MONAI centres a volume smaller than the ROI in padding and gives windows in the padded grid
    pad = torch.tensor([max(r - n, 0) // 2 for r, n in zip(roi, image.shape[1:])])

    def placed(win: torch.Tensor, slices) -> torch.Tensor:
        return model(win, origin_zyx=torch.tensor([[sl[k].start for k in range(2, 5)] for sl in slices]) - pad)

    logits = sliding_window_inference(x, roi, 1, placed if with_coord else model, overlap=overlap, mode="gaussian",
                                      sw_device=device, device="cpu", with_coord=with_coord)
    model.train()
    return logits.argmax(1)[0].numpy().astype(np.uint8)


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """MONAI DiceMetric per foreground class (NaN where a class is absent from both)."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    p = one_hot(torch.from_numpy(pred.astype(np.int64))[None, None], num_classes)
    y = one_hot(torch.from_numpy(np.asarray(label).astype(np.int64))[None, None], num_classes)
    return [float(v) for v in metric(p, y)[0]]


def evaluate_segmentation(model: nn.Module, cache, indices: list[int], roi: Sequence[int], overlap: float,
                          num_classes: int) -> dict[str, Any]:
    """Dice of ``model`` on the cached volumes ``indices``: ``mean_dice`` (over classes of the per-class
    means over cases), ``dice_per_class`` and ``per_case`` (case id -> Dice per foreground class)."""
    per_case = {}
    for i in indices:
        pred = sliding_predict(model, np.asarray(cache.image(i)), roi, overlap)
        per_case[cache.entry(i)["id"]] = dice_per_class(pred, cache.label(i), num_classes)
    arr = np.array(list(per_case.values()), float)  # (cases, classes-1)
    per_class = np.nanmean(arr, axis=0) if len(arr) else np.array([])
    return {"mean_dice": float(np.nanmean(per_class)) if len(per_class) else float("nan"),
            "dice_per_class": [float(v) for v in per_class], "per_case": per_case}


def write_segmentation_report(result: dict[str, Any], out: str | Path, checkpoint: str | Path, split: str,
                              n_volumes: int) -> Path:
    """``evaluation.json`` (the checkpoint, the split and ``result``) and ``evaluation.md`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps({"checkpoint": str(checkpoint), "split": split, **result}, indent=1))
    lines = [f"# Segmentation evaluation ({split}, {n_volumes} volumes)", "", f"checkpoint: `{checkpoint}`", "",
             f"mean Dice: **{result['mean_dice']:.4f}**", "", "| class | Dice |", "|---|---|"]
    lines += [f"| {c + 1} | {d:.4f} |" for c, d in enumerate(result["dice_per_class"])]
    (out / "evaluation.md").write_text("\n".join(lines) + "\n")
    return out


__all__ = ["dice_per_class", "evaluate_segmentation", "sliding_predict", "uses_volume_positions",
           "write_segmentation_report"]
