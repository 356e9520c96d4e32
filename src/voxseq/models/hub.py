"""One factory and one loader (timm's ``create_model``, open_clip's ``create_model_and_transforms``).

* :func:`create_model` builds any preset by name: ``tiny``/``small``/``base``/``large`` (a ViT3D
  encoder; ``vit_<size>`` too), ``ar_<size>`` (the AR-SSL4M model; ``ar_base`` is the paper's ViT-B),
  ``mae_<size>`` (the MAE3D baseline), ``vlp_<size>`` (SigVLP on a rotary ViT), with config overrides.
* :func:`load_model` gives ``(model, preprocess, meta)`` of any checkpoint or run folder: the class the
  checkpoint names (``model_class``, one registry: :data:`MODEL_CLASSES`), its weights (checked) and the
  preprocessing it was trained with. :func:`load_encoder` gives its ViT3D encoder alone.
* :func:`load_checkpoint` reads voxseq checkpoints first (``voxseq.checkpoint``) and converts foreign
  formats as a fallback: the official AR-SSL4M release (``voxseq.models.official``).

SigVLP's temperature and bias start at 0 here; SigLIP's initial values belong to its objective
(``voxseq.objectives.siglip``), and the training task passes them (``init_logit_scale``/``init_logit_bias``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from torch import nn

from voxseq import VoxseqError
from voxseq import checkpoint as store
from voxseq.checkpoint import Checkpoint, LoadReport, load_state_dict_checked
from voxseq.config import from_dict, to_dict
from voxseq.data.preprocess import Preprocess
from voxseq.models.classifier import Classifier
from voxseq.models.mae import MAEDecoderConfig, MAEViT3D
from voxseq.models.unetr import UNETR3D, UNETRConfig
from voxseq.models.vit3d import VIT_PRESETS, ARViT3D, ViT3D, ViTConfig, vit_config
from voxseq.models.vlp import SigVLP, VLPModelConfig

OFFICIAL_FORMAT = "ar-ssl4m-official"

# Keys of the other parts of voxseq models (AR heads and tokens, UNETR decoder, SigVLP pooling, projections
# and text tower): expected in a checkpoint, not part of the encoder.
NOT_ENCODER = ("head.", "start_token", "end_token", "mask_token", "decoder", "stem", "skip_blocks", "up_blocks", "out.",
               "pool.", "vision_proj.", "text.", "text_proj.", "logit_scale", "logit_bias")


# ---------------------------------------------------------------------------- the registry of model classes


@dataclass(frozen=True)
class ModelClass:
    cls: type[nn.Module]
    from_meta: Callable[[dict[str, Any]], nn.Module]  # checkpoint metadata -> the untrained model


MODEL_CLASSES: dict[str, ModelClass] = {}


def register_model_class(cls: type[nn.Module]):
    """Register ``from_meta(meta) -> model`` for ``cls``; checkpoints name it by ``cls.__name__``."""
    def register(from_meta: Callable[[dict[str, Any]], nn.Module]):
        MODEL_CLASSES[cls.__name__] = ModelClass(cls, from_meta)
        return from_meta
    return register


def model_class_name(model: nn.Module | type[nn.Module]) -> str:
    """The ``model_class`` a checkpoint of ``model`` (an instance or a class) records."""
    cls = model if isinstance(model, type) else type(store.unwrap_model(model))
    for name, entry in MODEL_CLASSES.items():
        if entry.cls is cls:
            return name
    raise VoxseqError(f"{cls.__name__} is not a registered model class (known: {', '.join(MODEL_CLASSES)})")


def encoder_config(meta: dict[str, Any]) -> ViTConfig:
    """The ViT3D config a checkpoint's metadata records (every voxseq model has one, under ``model``)."""
    if "model" not in meta:
        raise VoxseqError("checkpoint metadata has no model config")
    return from_dict(ViTConfig, meta["model"])


@register_model_class(ViT3D)
def _encoder(meta: dict[str, Any]) -> ViT3D:
    return ViT3D(encoder_config(meta))


@register_model_class(ARViT3D)
def _ar(meta: dict[str, Any]) -> ARViT3D:
    return ARViT3D(encoder_config(meta))


@register_model_class(MAEViT3D)
def _mae(meta: dict[str, Any]) -> MAEViT3D:
    return MAEViT3D(encoder_config(meta), from_dict(MAEDecoderConfig, meta.get("config", {}).get("decoder") or {}))


@register_model_class(UNETR3D)
def _unetr(meta: dict[str, Any]) -> UNETR3D:
    return UNETR3D(encoder_config(meta), from_dict(UNETRConfig, meta["unetr"]))


@register_model_class(Classifier)
def _classifier(meta: dict[str, Any]) -> Classifier:
    return Classifier(encoder_config(meta), meta.get("config", {}).get("head", "linear"))


@register_model_class(SigVLP)
def _sigvlp(meta: dict[str, Any]) -> SigVLP:
    return SigVLP(from_dict(VLPModelConfig, meta["vlp_model"]))


_CLASS_OF_TASK = {"pretrain-ar": "ARViT3D", "pretrain-mae": "MAEViT3D", "finetune-seg": "UNETR3D",
                  "finetune-cls": "Classifier", "pretrain-vlp": "SigVLP"}


def class_of(meta: dict[str, Any]) -> str:
    """The model class of a checkpoint: its ``model_class``, else its task's, else the bare encoder."""
    return meta.get("model_class") or _CLASS_OF_TASK.get(meta.get("task", ""), "ViT3D")


# ---------------------------------------------------------------------------- the factory


MODEL_KINDS = ("vit", "ar", "mae", "vlp")


def list_models() -> list[str]:
    """Every name :func:`create_model` takes."""
    return [*VIT_PRESETS, *(f"{kind}_{size}" for kind in MODEL_KINDS for size in VIT_PRESETS)]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """A freshly initialised model of a preset (:func:`list_models`). ``overrides`` set ViTConfig fields;
    for ``vlp_*`` also VLPModelConfig fields (``text_model``, ``embed_dim``...) and ``init_logit_scale`` /
    ``init_logit_bias``; for ``mae_*`` ``decoder`` (a MAEDecoderConfig or a dict)."""
    kind, _, size = name.rpartition("_")
    kind = kind or "vit"
    if kind not in MODEL_KINDS or size not in VIT_PRESETS:
        raise VoxseqError(f"unknown model {name!r} (known: {', '.join(list_models())})")
    if kind == "vlp":
        vlp_fields = {f.name for f in fields(VLPModelConfig)} - {"vision"}
        init = {k: overrides.pop(k) for k in ("init_logit_scale", "init_logit_bias") if k in overrides}
        vlp = {k: overrides.pop(k) for k in list(overrides) if k in vlp_fields}
        vision = vit_config(size, **{"pos_embed": "rope3d", **overrides})
        return SigVLP(VLPModelConfig(vision=vision, **vlp), **init)
    if kind == "mae":
        decoder = overrides.pop("decoder", None)
        decoder = from_dict(MAEDecoderConfig, decoder) if isinstance(decoder, dict) else decoder
        return MAEViT3D(vit_config(size, **overrides), decoder)
    return (ARViT3D if kind == "ar" else ViT3D)(vit_config(size, **overrides))


# ---------------------------------------------------------------------------- the loader


def load_official_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """An official AR-SSL4M weights file as a voxseq :class:`Checkpoint`: keys converted to voxseq's
    (``encoder.*``), metadata with the faithful encoder config and the official pretraining
    preprocessing (RAS arrays, 1-99.9 percentiles -> [0, 1], no resampling), step 0."""
    from pathlib import Path

    from voxseq.models.official import convert_ar_ssl4m, is_official_ar_ssl4m

    p = Path(path)
    state = store.read_weights_file(p)
    if not is_official_ar_ssl4m(state):
        raise VoxseqError(f"{p}: neither a voxseq checkpoint (no {p.with_suffix('.json').name} metadata beside it) "
                          "nor an official AR-SSL4M state dict (no 'model.layers.0.self_attn.q_proj.weight' and "
                          "'model.patchifier.proj.weight' keys)")
    converted, cfg = convert_ar_ssl4m(state)
    pre = Preprocess(orientation="RAS", intensity="percentile", percentiles=[1.0, 99.9], out_range=[0.0, 1.0])
    meta = {"step": 0, "task": OFFICIAL_FORMAT, "format": OFFICIAL_FORMAT, "source": str(p),
            "model": to_dict(cfg), "preprocess": to_dict(pre)}
    return Checkpoint(p, meta, converted)


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """A voxseq checkpoint (file or run folder -> its latest; checksums verified unless ``verify=False``),
    or a bare weights file (``.pth``/``.pt``/``.bin``/``.ckpt``, ``.safetensors`` without metadata) in
    the official AR-SSL4M format, converted (:func:`load_official_checkpoint`)."""
    if store.is_bare_weights(path):
        return load_official_checkpoint(path)
    return store.load_checkpoint(path, verify=verify)


def preprocess_of(meta: dict[str, Any]) -> Preprocess:
    """The preprocessing a checkpoint was trained with (the default one when it records none)."""
    return from_dict(Preprocess, meta.get("preprocess") or {})


def load_model(path: str | os.PathLike, *, expect: str | None = None, hint: str = "",
               device: str = "cpu") -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    """(model of the checkpoint's class with its weights, in eval mode; its preprocessing; its metadata).

    ``expect`` names the class a caller needs (``"UNETR3D"``...): another one is refused with ``hint``.
    Checkpoints that hold only an encoder (official weights) give the ViT3D encoder."""
    ck = load_checkpoint(path)
    name = class_of(ck.meta)
    if expect is not None and name != expect:
        raise VoxseqError(f"{ck.path}: not a {expect} checkpoint (made by {ck.meta.get('task', 'unknown')})"
                          + (f"; {hint}" if hint else ""))
    if name == "ViT3D":
        model = encoder_from(ck)[0]
    else:
        if name not in MODEL_CLASSES:
            raise VoxseqError(f"{ck.path}: unknown model_class {name!r} (known: {', '.join(MODEL_CLASSES)})")
        model = MODEL_CLASSES[name].from_meta(ck.meta)
        load_state_dict_checked(model, ck.state_dict, strict=True)
    return model.to(device).eval(), preprocess_of(ck.meta), ck.meta


def encoder_from(ck: Checkpoint, strict: bool = False, start_token: bool = False) -> tuple[ViT3D, LoadReport]:
    """The ViT3D encoder of a loaded checkpoint (the keys under ``encoder.``) and its load report.

    ``start_token``: an AR-SSL4M pretraining checkpoint's learned start token is prepended to image
    inputs (as every pretraining sequence began with it; the encoder drops its output)."""
    if "model" not in ck.meta:
        raise VoxseqError(f"{ck.path}: checkpoint metadata has no model config")
    cfg = encoder_config(ck.meta)
    if start_token and "start_token" in ck.state_dict and not cfg.start_token:
        cfg = replace(cfg, start_token=True)
    encoder = ViT3D(cfg)
    report = load_encoder_weights(encoder, ck)
    if not report.loaded:
        raise VoxseqError(f"{ck.path}: no encoder weights found (expected keys under 'encoder.')")
    if strict and (report.missing or report.mismatched):
        raise VoxseqError(f"{ck.path}: encoder weights do not fit:\n{report.summary()}")
    return encoder, report


def load_encoder_weights(encoder: ViT3D, ck: Checkpoint) -> LoadReport:
    """Load a checkpoint's encoder weights (its keys under ``encoder.``) into ``encoder``: what fits, and a
    report of the rest (the other parts of voxseq models are not counted as unexpected)."""
    report = load_state_dict_checked(encoder, ck.state_dict, prefix_map={"encoder.": ""})
    report.unexpected = [k for k in report.unexpected if not k.startswith(NOT_ENCODER)]
    return report


def encoder_from_checkpoint(path: str | os.PathLike, strict: bool = False,
                            start_token: bool = False) -> tuple[ViT3D, Preprocess, dict[str, Any], LoadReport]:
    """(encoder, preprocessing, checkpoint metadata, load report) from a checkpoint or run folder."""
    ck = load_checkpoint(path)
    encoder, report = encoder_from(ck, strict, start_token)
    return encoder, preprocess_of(ck.meta), ck.meta, report


def load_encoder(path: str | os.PathLike) -> tuple[ViT3D, Preprocess, dict[str, Any]]:
    """(encoder, preprocessing, checkpoint metadata) of any voxseq checkpoint or run folder (AR, MAE, SigVLP,
    fine-tuned) or official AR-SSL4M weights, in eval mode: the Python face of ``voxseq embed --checkpoint``."""
    encoder, pre, meta, _ = encoder_from_checkpoint(path)
    return encoder.eval(), pre, meta


__all__ = ["MODEL_CLASSES", "MODEL_KINDS", "NOT_ENCODER", "OFFICIAL_FORMAT", "ModelClass", "class_of", "create_model",
           "encoder_config", "encoder_from", "encoder_from_checkpoint", "list_models", "load_checkpoint", "load_encoder",
           "load_encoder_weights", "load_model", "load_official_checkpoint", "model_class_name", "preprocess_of",
           "register_model_class"]
