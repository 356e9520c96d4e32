"""Optimisers and schedules: AdamW groups without decay on norms/biases/positions/special tokens,
MAE-style layer-wise lr decay, Muon for hidden weight matrices (SigVLP), linear warmup + cosine."""

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
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return _decay_groups(model, named, weight_decay)


def _decay_groups(model: nn.Module, named: list[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    no_decay = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, rest = [], []
    for name, p in named:
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


def set_lr_all(optimizers: list[torch.optim.Optimizer], base_lr: float, multiplier: float) -> float:
    """:func:`set_lr` on each optimiser (Muon and AdamW follow one schedule); returns the base lr now."""
    for opt in optimizers:
        set_lr(opt, base_lr, multiplier)
    return base_lr * multiplier


# --- Muon for hidden weight matrices, AdamW for the rest (SigVLP) ---------------------------------

# a transformer hidden layer: our ViT's ``blocks.<i>.``, Hugging Face's ``layer.<i>.`` / ``layers.<i>.`` (BERT,
# SigLIP, LLaMA-style) and T5's ``block.<i>.``
_HIDDEN_LAYER = re.compile(r"(?:^|\.)(?:blocks?|layers?)\.\d+\.")


def _outside_hidden_layers(prefix: str) -> bool:
    """True when the module path holding a layer stack is itself a head, pooler, projection or embedding
    (e.g. an attention-pool head built from blocks): those stay on AdamW like the rest of the heads."""
    return any(part in ("head", "heads", "pool", "pooler") or part.startswith("proj_") or part.endswith("_proj")
               or "embed" in part for part in prefix.split("."))


def is_muon_param(name: str, param: torch.Tensor, embedding_ids: set[int]) -> bool:
    """Muon orthogonalises updates of matrices that map one hidden activation to another; embeddings
    (lookup tables, patch convolutions), heads, norms, biases and scalars are not such maps (Muon's
    authors keep them on AdamW), even when they happen to be 2-D."""
    if param.ndim != 2 or not name.endswith("weight") or id(param) in embedding_ids:
        return False
    m = _HIDDEN_LAYER.search(name)
    return m is not None and not _outside_hidden_layers(name[: m.start()])


def muon_param_split(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(muon_named, adamw_named) trainable parameters: hidden-layer weight matrices for Muon, the rest for AdamW."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if is_muon_param(name, p, embedding_ids) else adamw).append((name, p))
    return muon, adamw


def _adamw_groups(model: nn.Module, named: list[tuple[str, torch.Tensor]], weight_decay: float,
                  lr_scales: dict[str, float] | None) -> list[dict]:
    """The no-decay rules of :func:`param_groups`; parameters named in ``lr_scales`` get a group of their
    own (no decay) whose lr is scaled."""
    lr_scales = lr_scales or {}
    groups = _decay_groups(model, [(n, p) for n, p in named if n not in lr_scales], weight_decay)
    return groups + [{"params": [p], "weight_decay": 0.0, "lr_scale": float(lr_scales[n])} for n, p in named if n in lr_scales]


def build_optimizers(model: nn.Module, name: str, lr: float, weight_decay: float, betas=(0.9, 0.95),
                     muon_lr: float | None = None, momentum: float = 0.95,
                     lr_scales: dict[str, float] | None = None) -> list[torch.optim.Optimizer]:
    """``"adamw"``: [AdamW]; ``"muon"``: [Muon(hidden matrices), AdamW(the rest)], the no-decay rules of
    :func:`param_groups` applied to the AdamW part.

    Muon adjusts its lr to match AdamW's update RMS (``match_rms_adamw``), so one ``lr`` serves both;
    ``muon_lr`` overrides it through the group's ``lr_scale``, which :func:`set_lr_all` respects. A model
    without any hidden weight matrix gets the AdamW optimiser alone. ``lr_scales`` multiplies the lr of
    named AdamW parameters (e.g. SigLIP's ``logit_scale``/``logit_bias`` in short runs).
    """
    if name == "adamw":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [build_optimizer(_adamw_groups(model, named, weight_decay, lr_scales), lr, betas)]
    if name != "muon":
        raise ValueError(f"unknown optimizer {name!r} (adamw, muon)")
    muon_named, adamw_named = muon_param_split(model)
    muon_base_lr = lr if muon_lr is None else muon_lr
    scale = muon_base_lr / lr if lr else 1.0  # lr = 0 (a frozen run) keeps Muon at 0 too
    optimizers = []
    if muon_named:
        group = {"params": [p for _, p in muon_named], "lr": lr * scale, "weight_decay": weight_decay, "lr_scale": scale}
        optimizers.append(torch.optim.Muon([group], lr=lr * scale, weight_decay=weight_decay, momentum=momentum,
                                           adjust_lr_fn="match_rms_adamw"))
    optimizers.append(build_optimizer(_adamw_groups(model, adamw_named, weight_decay, lr_scales), lr, betas))
    return optimizers
