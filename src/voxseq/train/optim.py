"""Optimisers and schedules: AdamW groups without decay on norms/biases/positions/special tokens,
MAE-style layer-wise lr decay, linear warmup + cosine."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _skip_decay(name: str, param: torch.Tensor, no_decay: set[str]) -> bool:
    return param.ndim <= 1 or name in no_decay or any(name.endswith(n) for n in no_decay)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weights with decay; norms, biases and ``model.no_weight_decay()`` without."""
    no_decay = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if _skip_decay(name, p, no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": rest, "weight_decay": 0.0, "lr_scale": 1.0}]


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings and special tokens, i + 1 for ``blocks.i``, num_layers + 1 for the rest (heads)."""
    m = _BLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    if any(k in name for k in ("patch_embed", "pos_embed", "start_token", "end_token", "cls_token")):
        return 0
    return num_layers + 1


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float, num_layers: int) -> list[dict]:
    """MAE's layer-wise lr decay: a parameter of layer id ``i`` gets lr * layer_decay ** (num_layers + 1 - i)."""
    no_decay = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, num_layers)
        skip = _skip_decay(name, p, no_decay)
        g = groups.setdefault((lid, skip), {"params": [], "weight_decay": 0.0 if skip else weight_decay,
                                            "lr_scale": layer_decay ** (num_layers + 1 - lid), "layer_id": lid})
        g["params"].append(p)
    return list(groups.values())


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr: linear from 0 over ``warmup_steps``, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(groups: list[dict], lr: float, betas=(0.9, 0.95), fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the groups; each group's lr is ``lr * lr_scale`` (set each step by :func:`set_lr`)."""
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, multiplier: float) -> float:
    """Apply the schedule multiplier to every group (respecting its lr_scale); returns the base lr now."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * multiplier * g.get("lr_scale", 1.0)
    return base_lr * multiplier
