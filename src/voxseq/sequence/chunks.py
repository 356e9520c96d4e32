"""Chunk-text pairs for SigVLP: a CT volume of any size is a sequence of z-slabs ("chunks"), and each chunk
is paired with the sentences of the organs it shows, not with the whole report.

Pairing. A sentence belongs to an organ made of one or more label ids (:func:`sentence_labels`); the organ
counts as shown by a chunk when the chunk holds at least ``organ_fraction`` of the organ's voxels in the
volume (a small organ seen whole) or when the organ fills at least ``chunk_fraction`` of the chunk (a big
organ seen in part: a thin slab through the liver is about the liver even if it holds 10% of it). Volumes
with RadGenome region masks (``Cache.regions``) use region bits instead of labels, with a sentence's name
equal to its region's name. Volumes without masks but with a report fall back to report-level pairing.
A sentence that describes a lesion is local: when the record has lesion boxes of an organ's category, the
organ counts as shown only by chunks holding at least ``lesion_fraction`` of one of them
(:func:`lesion_in_window`). Sentence keys mask numbers (:func:`sentence_key`), so findings that differ only in
their measurements are one positive class.

Organ-focused groups. With ``focus_fraction`` > 0, that share of the groups of ``focus_group`` consecutive
items (a training batch holds ``chunks_per_batch / focus_group`` groups) is drawn around one organ: every
chunk of the group shows it and carries its sentence, from different volumes. Telling those chunks apart
takes the findings ("the heart is enlarged" against "normal in size"), not the anatomy: hard negatives
that a small batch of random chunks rarely holds.

Organ-centred crops. With an in-plane ``crop_yx`` and ``crop_center: organ``, each window is placed around a
voxel of one organ drawn from those with a sentence, or, when the volume has lesion boxes of that organ, so
that it holds one of them whole at a uniformly random place in the window. Small crops keep a lesion from
drowning in a whole slice's tokens, and a training step of short chunks is cheap.

Variable size. Chunks have a free number of slices (``min_slices``..``max_slices``, multiples of the patch)
and any in-plane size, so items have different token counts. Instead of padding every item to the longest,
:func:`collate_packed` packs several chunks into one row (first-fit decreasing) and attention is kept inside
each chunk by a block-diagonal mask (``voxseq.models.vit3d.packed_attention_mask``); ``voxseq.models.vlp.segment_mean`` pools one
embedding per chunk. Padding stays under ~10% of the tokens on a realistic mix.

Like :class:`voxseq.sequence.SequenceDataset`, item ``i`` is a pure function of ``(cfg.seed, i)``: it does
not depend on DataLoader workers, and resuming at step ``s`` means starting at index ``s * chunks_per_batch``.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from voxseq import VoxseqError
from voxseq.sequence.patches import patch_grid_coords, patchify
from voxseq.sequence.samplers import VolumeSource, read_window

TEXT_MODES = ("all", "one")
CROP_CENTERS = ("random", "organ")
_RETRIES = 8  # redraws of a chunk's z range before a volume with masks falls back to its report


@dataclass
class ChunkConfig:
    """How chunks are cut and paired with text. Sizes are voxels of the cache grid."""

    patch_size: int = 16
    min_slices: int = 32  # chunk thickness along z: a multiple of patch_size drawn in [min, max]
    max_slices: int = 128
    crop_yx: list[int] | None = None  # in-plane crop; None = the whole slice padded up to a multiple of the patch
    crop_center: str = "random"  # "random" crops, or "organ": around an organ (its lesion when it has one)
    lesion_centred: bool = True  # organ windows hold the organ's lesion when it has one; false: placed from the
    # organ alone and never redrawn (evaluation: where a window sits says nothing about the findings)
    organ_jitter: float = 0.25  # an organ window without a lesion holds a random organ voxel up to this fraction
    # of the window from its centre; 0.5: anywhere in the window, as a lesion-centred window holds its lesion
    organ_fraction: float = 0.3  # shown: the chunk holds >= this fraction of the organ's voxels ...
    chunk_fraction: float = 0.05  # ... or the organ fills >= this fraction of the chunk
    lesion_fraction: float = 0.5  # an organ with lesion boxes is shown only by chunks holding this share of one
    focus_fraction: float = 0.0  # share of groups of focus_group consecutive items that all show one organ ...
    focus_group: int = 8  # ... and carry its sentence: hard negatives (same organ, other findings) in every batch
    max_sentences: int = 4  # at most this many organs' sentences per chunk (the ones filling most of it)
    text_mode: str = "all"  # "all": the organs' sentences in anatomical order; "one": one drawn from them
    pad_value: float = 0.0  # set it to the cache's out_range[0] (air) for CT
    seed: int = 0

    def __post_init__(self) -> None:
        p = self.patch_size
        if p < 1:
            raise VoxseqError(f"chunks.patch_size must be positive, not {p}")
        if self.min_slices % p or self.max_slices % p or not 0 < self.min_slices <= self.max_slices:
            raise VoxseqError(f"chunks.min_slices {self.min_slices} and max_slices {self.max_slices} must be positive "
                              f"multiples of patch_size {p} with min <= max")
        if self.crop_yx is not None and (len(self.crop_yx) != 2 or any(s <= 0 or s % p for s in self.crop_yx)):
            raise VoxseqError(f"chunks.crop_yx {self.crop_yx} must be two positive multiples of patch_size {p} (or null)")
        for name in ("organ_fraction", "chunk_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise VoxseqError(f"chunks.{name} must be in (0, 1], not {getattr(self, name)}")
        if not 0 <= self.organ_jitter <= 0.5:
            raise VoxseqError(f"chunks.organ_jitter must be in [0, 0.5], not {self.organ_jitter}")
        if not 0 <= self.lesion_fraction <= 1:
            raise VoxseqError(f"chunks.lesion_fraction must be in [0, 1], not {self.lesion_fraction}")
        if not 0 <= self.focus_fraction <= 1:
            raise VoxseqError(f"chunks.focus_fraction must be in [0, 1], not {self.focus_fraction}")
        if self.focus_group < 1:
            raise VoxseqError(f"chunks.focus_group must be at least 1, not {self.focus_group}")
        if self.max_sentences < 1:
            raise VoxseqError(f"chunks.max_sentences must be at least 1, not {self.max_sentences}")
        if self.crop_center not in CROP_CENTERS:
            raise VoxseqError(f"chunks.crop_center must be one of {CROP_CENTERS}, not {self.crop_center!r}")
        if self.crop_center == "organ" and self.crop_yx is None:
            raise VoxseqError("chunks.crop_center: organ needs chunks.crop_yx (an in-plane crop to centre)")
        if self.text_mode not in TEXT_MODES:
            raise VoxseqError(f"chunks.text_mode must be one of {TEXT_MODES}, not {self.text_mode!r}")


# ---------------------------------------------------------------------------- sentences and organs


_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")


def sentence_key(text: str) -> int:
    """A stable 63-bit id of a sentence (lower-cased, whitespace-normalised, numbers masked), equal in every
    process and run.

    SigLIP marks a chunk and a text as a positive pair when they share a sentence; Python's ``hash`` is
    salted per process, so ranks and workers would disagree. Numbers are masked so that measurements do
    not make a finding unique: "a 1.2 cm hypodense lesion" and "a 2.5 cm hypodense lesion" are the same
    finding, and two chunks showing it are positives of each other's sentence, not negatives.
    """
    norm = _NUMBER.sub("#", " ".join(text.lower().split())).encode()
    return int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "big") >> 1


def sentence_labels(entry: dict) -> dict[str, list[int]]:
    """Sentence (organ) name -> the label ids that make up that organ, in anatomical order.

    ``entry["extra"]["sentence_labels"]`` when the dataset gives it; the phantom organs for CT phantoms;
    otherwise {} (the volume is paired at report level).
    """
    extra = entry.get("extra") or {}
    if extra.get("sentence_labels"):
        return {name: [int(i) for i in ids] for name, ids in extra["sentence_labels"].items()}
    if extra.get("kind") == "ct":
        from voxseq.data.phantoms import SENTENCE_ORGANS

        return {name: list(ids) for name, ids in SENTENCE_ORGANS.items()}
    return {}


def label_counts(labels: np.ndarray, n_bits: int = 0) -> np.ndarray:
    """Voxels per label id: (256,) for a uint8 label map, or (n_bits,) per bit for packed region masks (uint32).

    Bits are counted a slab of slices at a time, so a whole-volume count never holds more than a slab in memory.
    """
    if labels.dtype != np.uint32:
        return np.bincount(np.asarray(labels, np.uint8).ravel(), minlength=256).astype(np.int64)
    counts = np.zeros(n_bits, np.int64)
    for z in range(0, labels.shape[0], 32):
        slab = np.asarray(labels[z:z + 32])
        counts += [np.count_nonzero(slab & np.uint32(1 << r)) for r in range(n_bits)]
    return counts


def organs_in_chunk(label_chunk: np.ndarray, label_counts_volume: np.ndarray, mapping: dict[str, list[int]],
                    organ_fraction: float = 0.3, chunk_fraction: float = 0.05) -> list[str]:
    """Organs of ``mapping`` that a chunk shows, most of the chunk first.

    ``label_chunk``: the chunk's real (unpadded) voxels, uint8 labels or uint32 region bits;
    ``label_counts_volume``: :func:`label_counts` of the whole volume (so the organ's share is exact).
    """
    here = label_counts(label_chunk, len(label_counts_volume))
    size = max(1, label_chunk.size)
    shown = []
    for name, ids in mapping.items():
        total = int(label_counts_volume[ids].sum())
        inside = int(here[ids].sum())
        if inside > 0 and (inside >= organ_fraction * total or inside >= chunk_fraction * size):
            shown.append((inside, name))
    order = {name: k for k, name in enumerate(mapping)}
    return [name for _, name in sorted(shown, key=lambda t: (-t[0], order[t[1]]))]


def organ_masks(source, v: int) -> tuple[np.ndarray | None, dict[str, list[int]]]:
    """Volume ``v``'s organ masks (uint8 labels or uint32 region bits) and organ (sentence name) -> ids / bits,
    or (None, {}) when it has none. Every organ its masks can show is listed, with a sentence or without."""
    entry = source.entry(v)
    regions = source.regions(v) if hasattr(source, "regions") else None
    if regions is not None:
        mapping = {name: [r] for r, name in enumerate(entry.get("regions", []))}
        return (regions, mapping) if mapping else (None, {})
    label = source.label(v)
    mapping = sentence_labels(entry)
    return (label, mapping) if label is not None and mapping else (None, {})


def window_organs(masks: np.ndarray, counts: np.ndarray, mapping: dict[str, list[int]], start_zyx, size_zyx,
                  organ_fraction: float = 0.3, chunk_fraction: float = 0.05) -> list[str]:
    """:func:`organs_in_chunk` of the window at ``start_zyx`` of ``size_zyx`` (it may pass the volume's edges)."""
    lo = [max(0, s) for s in start_zyx]
    hi = [min(n, s + k) for n, s, k in zip(masks.shape, start_zyx, size_zyx)]
    chunk = np.asarray(masks[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])  # real voxels only
    return organs_in_chunk(chunk, counts, mapping, organ_fraction, chunk_fraction)


def box_organ(box: dict) -> str:
    """The organ (sentence name) a lesion box belongs to: its ``organ`` when set, else its category."""
    return box.get("organ") or box.get("category", "")


def lesion_in_window(boxes: list[dict], organ: str, start_zyx, size_zyx, fraction: float = 0.5) -> bool:
    """Whether a window may carry ``organ``'s sentence given the volume's lesion boxes (cache grid, zyx).

    An organ without boxes always may. An organ with boxes has a sentence that describes its lesions, which
    is true of a window only when the window holds at least ``fraction`` of one box's voxels (a slab through
    the liver above its lesion does not show "a hypodense lesion") or, for a finding bigger than the window
    (a basal effusion), when one box fills at least ``fraction`` of the window.
    """
    own = [b["bbox_zyx"] for b in boxes if box_organ(b) == organ]
    if not own:
        return True
    window = max(1, int(np.prod(size_zyx)))
    for b in own:
        lo, hi = np.asarray(b[:3]), np.asarray(b[3:])
        inter = np.prod(np.clip(np.minimum(hi, np.add(start_zyx, size_zyx)) - np.maximum(lo, start_zyx), 0, None))
        if inter >= fraction * max(1, int(np.prod(hi - lo))) or inter >= fraction * window:
            return True
    return False


def window_sentence(sentence: str, boxes: list[dict], organ: str, start_zyx, size_zyx, fraction: float = 0.5) -> str:
    """``organ``'s sentence as a window tells it: without the words (``text``) of each of the organ's boxes that
    the window does not hold (:func:`lesion_in_window`), so a window holding the basal atelectasis of a lung that
    also has a nodule elsewhere reads "There is basal atelectasis.", not both findings. Boxes without ``text``,
    and words not found verbatim in the sentence, leave it as it is; so does dropping every word of it."""
    out = sentence
    for b in boxes:
        words = b.get("text")
        if words and box_organ(b) == organ and not lesion_in_window([b], organ, start_zyx, size_zyx, fraction):
            out = out.replace(words, "")
    out = " ".join(out.split())
    return out or sentence


# ---------------------------------------------------------------------------- reading chunks


def _round_up(n: int, p: int) -> int:
    return -(-n // p) * p


def _chunk_tokens(window: np.ndarray, p: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """(C, t, Y, X) window -> tokens (L, C*p^3) float32, pos (L, 3) float32 (z, y, x) in patches, grid."""
    x = torch.from_numpy(np.ascontiguousarray(window)).float()[None]  # (1, C, t, Y, X)
    grid = tuple(s // p for s in window.shape[1:])
    pos = torch.from_numpy(patch_grid_coords(grid).astype(np.float32))
    return patchify(x, p)[0], pos, grid  # type: ignore[return-value]


def _tile_starts(n: int, k: int) -> list[int]:
    """Starts of windows of ``k`` covering ``n`` voxels with half-window overlap (one centred window if n <= k)."""
    if n <= k:
        return [-((k - n) // 2)]
    starts = list(range(0, n - k + 1, max(1, k // 2)))
    return starts if starts[-1] + k >= n else starts + [n - k]


def volume_chunks(image: np.ndarray, patch_size: int = 16, chunk_slices: int | None = None,
                  pad_value: float = 0.0, tile_yx: list[int] | None = None,
                  z_overlap: bool = False) -> list[dict[str, Any]]:
    """A whole (C, Z, Y, X) volume of any size as consecutive z-chunks of tokens, for inference.

    Each axis is padded (centred in-plane, at the end along z) up to a multiple of the patch; ``chunk_slices``
    (a multiple of the patch) cuts the volume into slabs, None keeps it one chunk. Each chunk: ``tokens``
    (L, C*p^3), ``pos`` (L, 3) with z counted from the chunk's first slice (as in training), ``grid``,
    ``z0``, ``z1`` (its slices in the volume, z1 may pass the end where padded). ``tile_yx`` (multiples of the
    patch) also cuts each slab in-plane into windows of that size overlapping by half (as a model trained on
    ``crop_yx`` crops saw them). Every chunk has ``y0``, ``x0``: its in-plane start (negative where the window is
    padded beyond the slice). ``z_overlap``: slabs overlap by half
    along z as well (a finding cut by one slab's edge is whole in the next).
    """
    p = patch_size
    if image.ndim == 3:
        image = image[None]
    _, nz, ny, nx = image.shape
    if chunk_slices is not None and (chunk_slices <= 0 or chunk_slices % p):
        raise VoxseqError(f"chunk_slices {chunk_slices} must be a positive multiple of the patch size {p}")
    if tile_yx is not None and (len(tile_yx) != 2 or any(k <= 0 or k % p for k in tile_yx)):
        raise VoxseqError(f"tile_yx {tile_yx} must be two positive multiples of the patch size {p}")
    if tile_yx is None:
        size_yx = [_round_up(ny, p), _round_up(nx, p)]
        starts = [[-((s - n) // 2) for s, n in zip(size_yx, (ny, nx))]]
    else:
        size_yx = list(tile_yx)
        starts = [[y0, x0] for y0 in _tile_starts(ny, size_yx[0]) for x0 in _tile_starts(nx, size_yx[1])]
    thick = chunk_slices or _round_up(nz, p)
    z_starts = _tile_starts(nz, thick) if z_overlap and chunk_slices else list(range(0, nz, thick))
    chunks = []
    for z0 in z_starts:
        t = min(thick, _round_up(nz - z0, p))
        for start_yx in starts:
            window, _ = read_window(image, [z0, *start_yx], [t, *size_yx], pad_value)
            tokens, pos, grid = _chunk_tokens(window, p)
            chunks.append({"tokens": tokens, "pos": pos, "grid": grid, "z0": z0, "z1": z0 + t,
                           "y0": start_yx[0], "x0": start_yx[1]})
    return chunks


# ---------------------------------------------------------------------------- the dataset


class ChunkTextDataset(torch.utils.data.Dataset):
    """Map-style dataset of (chunk, text) pairs; ``dataset[i]`` depends only on (cfg.seed, i).

    Each item: ``tokens`` float32 (L, C*p^3), ``pos`` float32 (L, 3) = (z, y, x) of each token in patch
    units, z from the chunk's first slice; ``grid`` (gz, gy, gx); ``text`` str; ``sentence_keys`` the
    :func:`sentence_key` of each sentence in ``text`` (the report's for report-level pairs); ``shown_keys``
    the keys of all sentences of the organs shown (before ``max_sentences`` and ``text_mode``: what the
    chunk is a positive for); ``organs`` the organs in ``text``; ``volume_index``; ``z0``, ``z1`` the
    chunk's slices in the volume (the range may pass the volume's ends where it is padded); ``y0``, ``x0`` the
    in-plane window's first voxel (negative where it is padded).
    """

    def __init__(self, source: VolumeSource, cfg: ChunkConfig, length: int = 10**9, max_cached: int = 4096):
        self.source, self.cfg, self.length = source, cfg, length
        self.volumes = [i for i in range(len(source)) if _has_text(source.entry(i))]
        if not self.volumes:
            raise VoxseqError("no volume has a text (sentences or report) to pair chunks with")
        self.max_cached = max_cached
        self._counts: OrderedDict[int, np.ndarray] = OrderedDict()  # volume -> label_counts (small), LRU
        self._points: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()  # (volume, organ) -> voxels, LRU
        self._with_organ = self._organ_index() if cfg.focus_fraction > 0 else {}

    def __len__(self) -> int:
        return self.length

    # -- per-volume masks

    def _masks(self, v: int) -> tuple[np.ndarray | None, dict[str, list[int]]]:
        """The volume's organ masks (uint8 labels or uint32 region bits) and sentence -> ids / bits, or (None, {})."""
        sentences = self.source.entry(v).get("sentences") or {}
        masks, every = organ_masks(self.source, v)
        mapping = {name: ids for name, ids in every.items() if name in sentences}
        return (masks, mapping) if masks is not None and mapping else (None, {})

    def _volume_counts(self, v: int, masks: np.ndarray) -> np.ndarray:
        """Voxels per label id in the whole volume: read once per volume, then kept (a few KB each)."""
        counts = self._counts.get(v)
        if counts is None:
            n_bits = len(self.source.entry(v).get("regions", []))
            counts = self._counts[v] = label_counts(masks, n_bits)
            if len(self._counts) > self.max_cached:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(v)
        return counts

    # -- organ-focused groups

    def _organ_index(self) -> dict[str, list[int]]:
        """Organ -> volumes whose masks can show it and that carry its sentence (from the entries only), for
        organs whose sentence differs between volumes (a finding in some, not in others): only there do
        chunks of one organ have something to tell apart."""
        index: dict[str, list[int]] = {}
        keys: dict[str, set[int]] = {}
        for v in self.volumes:
            entry = self.source.entry(v)
            sentences = entry.get("sentences") or {}
            names = entry.get("regions") or (sentence_labels(entry) if entry.get("has_label", True) else {})
            for name in names:
                if name in sentences:
                    index.setdefault(name, []).append(v)
                    keys.setdefault(name, set()).add(sentence_key(sentences[name]))
        return {name: vols for name, vols in sorted(index.items()) if len(keys[name]) >= 2}

    def focus(self, index: int) -> str | None:
        """The organ that item ``index``'s group is focused on, or None: a pure function of (seed, group)."""
        if not self._with_organ:
            return None
        rng = np.random.default_rng([self.cfg.seed, int(index) // self.cfg.focus_group, 7])
        if rng.random() >= self.cfg.focus_fraction:
            return None
        names = list(self._with_organ)
        return names[int(rng.integers(len(names)))]

    # -- sampling

    def __getitem__(self, index: int) -> dict[str, Any]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, int(index)])
        focus = self.focus(index)
        candidates = self._with_organ[focus] if focus else self.volumes
        v = candidates[int(rng.integers(len(candidates)))]
        image = self.source.image(v)  # (C, Z, Y, X)
        masks, mapping = self._masks(v)
        thickness = self._thickness(rng, image.shape[1])
        start_yx, size_yx = self._inplane(rng, image.shape[2:])
        organs: list[str] = []
        redraw = True
        if cfg.crop_center == "organ" and mapping:
            z0, start_yx, centred = self._organ_window(rng, v, masks, mapping, [thickness, *size_yx], focus)
            organs = self._organs(v, masks, mapping, [z0, *start_yx], [thickness, *size_yx])
            focus = focus or centred  # the text is the centred organ's sentence when the window shows it
            # without lesion centring the window stays where it was drawn: redrawing until the organ is shown
            # would, for an organ with a lesion, hunt for the lesion
            redraw = cfg.lesion_centred
        for _ in range(0 if organs or not redraw else _RETRIES * (2 if focus else 1) if mapping else 1):
            z0 = int(rng.integers(0, image.shape[1] - thickness + 1)) if image.shape[1] >= thickness \
                else -((thickness - image.shape[1]) // 2)
            if mapping:
                organs = self._organs(v, masks, mapping, [z0, *start_yx], [thickness, *size_yx])
                if organs and (focus is None or focus in organs):
                    break
        entry = self.source.entry(v)
        told = self._window_sentences(entry, organs, [z0, *start_yx], [thickness, *size_yx])
        text, keys, organs, shown = self._text(rng, entry, organs, focus, told)
        window, _ = read_window(image, [z0, *start_yx], [thickness, *size_yx], cfg.pad_value)
        tokens, pos, grid = _chunk_tokens(window, cfg.patch_size)
        return {"tokens": tokens, "pos": pos, "grid": grid, "text": text, "sentence_keys": keys,
                "shown_keys": shown, "organs": organs, "volume_index": v, "z0": z0, "z1": z0 + thickness,
                "y0": start_yx[0], "x0": start_yx[1]}

    def _thickness(self, rng, nz: int) -> int:
        """A multiple of the patch in [min_slices, max_slices] that fits the volume; a volume thinner than
        min_slices is taken whole (padded up to a multiple of the patch)."""
        p = self.cfg.patch_size
        hi = min(self.cfg.max_slices, nz // p * p)
        if hi < self.cfg.min_slices:
            return _round_up(nz, p)
        return int(rng.integers(self.cfg.min_slices // p, hi // p + 1)) * p

    def _inplane(self, rng, shape_yx) -> tuple[list[int], list[int]]:
        """Start and size of the in-plane window: a random crop_yx crop (centred padding where the slice is
        smaller), or the whole slice padded (centred) up to a multiple of the patch."""
        p = self.cfg.patch_size
        size = list(self.cfg.crop_yx) if self.cfg.crop_yx else [_round_up(n, p) for n in shape_yx]
        start = [int(rng.integers(0, n - k + 1)) if n >= k else -((k - n) // 2) for n, k in zip(shape_yx, size)]
        return start, size

    def _organ_window(self, rng, v: int, masks: np.ndarray, mapping, size_zyx, focus: str | None
                      ) -> tuple[int, list[int], str]:
        """(z0, in-plane start, organ) of a window around one organ of volume ``v`` (``focus`` when given and
        present): holding one of its lesion boxes whole (at a uniformly random place) when it has some and
        ``lesion_centred``, else centred near a random voxel of it (jittered by up to ``organ_jitter`` of the
        window; 0.5 puts the voxel anywhere in it, as the lesion is put). Without lesion centring the place does
        not depend on the findings: an evaluation then cannot tell a lesion by where the window sits."""
        counts = self._volume_counts(v, masks)
        names = [n for n, ids in mapping.items() if counts[ids].sum() > 0] or list(mapping)
        name = focus if focus in names else names[int(rng.integers(len(names)))]
        boxes = [b["bbox_zyx"] for b in self.source.entry(v).get("boxes") or [] if box_organ(b) == name]
        if boxes and self.cfg.lesion_centred:
            box = boxes[int(rng.integers(len(boxes)))]
            start = []
            for lo, hi, k in zip(box[:3], box[3:], size_zyx):
                a, b = sorted((hi - k, lo))  # the window holds the box, or lies inside a box bigger than it
                start.append(int(rng.integers(a, b + 1)))
        else:
            point = self._organ_points(v, masks, name, mapping[name])
            centre = point[int(rng.integers(len(point)))] if len(point) else np.asarray(masks.shape) // 2
            start = []
            for c, k in zip(centre, size_zyx):
                a = min(int(k * self.cfg.organ_jitter + 1e-9), k // 2)  # the voxel's largest offset from the centre
                # where in the window the voxel falls: k // 2 - offset, kept inside the window (uniform over the
                # window at jitter 0.5)
                at = k // 2 - int(rng.integers(-min(a, k - 1 - k // 2), a + 1))
                start.append(int(c) - at)
        return start[0], start[1:], name

    def _organ_points(self, v: int, masks: np.ndarray, name: str, ids: list[int]) -> np.ndarray:
        """Up to 4096 voxel coordinates (z, y, x) of an organ, drawn once per volume and organ, then kept."""
        key = (v, name)
        points = self._points.get(key)
        if points is None:
            m = np.asarray(masks)
            if m.dtype == np.uint32:  # region bits: any of the organ's bits set
                inside = (m & np.uint32(sum(1 << r for r in ids))) != 0
            else:
                inside = np.isin(m, ids)
            points = np.argwhere(inside)
            if len(points) > 4096:
                points = points[np.random.default_rng([self.cfg.seed, v]).choice(len(points), 4096, replace=False)]
            self._points[key] = points
            if len(self._points) > self.max_cached:
                self._points.popitem(last=False)
        return points

    def _organs(self, v: int, masks: np.ndarray, mapping, start_zyx, size_zyx) -> list[str]:
        cfg = self.cfg
        shown = window_organs(masks, self._volume_counts(v, masks), mapping, start_zyx, size_zyx,
                              cfg.organ_fraction, cfg.chunk_fraction)
        boxes = self.source.entry(v).get("boxes") or []
        if cfg.lesion_fraction <= 0 or not boxes:
            return shown
        return [o for o in shown if lesion_in_window(boxes, o, start_zyx, size_zyx, cfg.lesion_fraction)]

    def _window_sentences(self, entry: dict, organs: list[str], start_zyx, size_zyx) -> dict[str, str]:
        """The entry's organ sentences as a window tells them (:func:`window_sentence`), in the entry's order."""
        sentences = entry.get("sentences") or {}
        boxes = entry.get("boxes") or []
        if not boxes or self.cfg.lesion_fraction <= 0:
            return sentences
        return {name: window_sentence(text, boxes, name, start_zyx, size_zyx, self.cfg.lesion_fraction)
                if name in organs else text for name, text in sentences.items()}

    def _text(self, rng, entry: dict, organs: list[str], focus: str | None, sentences: dict[str, str]
              ) -> tuple[str, list[int], list[str], list[int]]:
        """(text, its sentence keys, its organs, keys of every shown organ's sentence); ``focus``: the organ whose
        sentence alone is the text when the chunk shows it; ``sentences``: the organ sentences as the window tells
        them (:meth:`_window_sentences`)."""
        if not organs:  # report-level pairing
            report = _report(entry)
            return report, [sentence_key(report)], [], [sentence_key(report)]
        shown = [sentence_key(sentences[o]) for o in organs]
        if focus in organs:
            return sentences[focus], [sentence_key(sentences[focus])], [focus], shown
        kept = organs[: self.cfg.max_sentences]  # the organs filling most of the chunk
        if self.cfg.text_mode == "one":
            kept = [kept[int(rng.integers(len(kept)))]]
        kept = [name for name in sentences if name in kept]  # anatomical (the dataset's) order
        return " ".join(sentences[o] for o in kept), [sentence_key(sentences[o]) for o in kept], kept, shown


def _report(entry: dict) -> str:
    text = (entry.get("text") or "").strip()
    return text or " ".join((entry.get("sentences") or {}).values())


def _has_text(entry: dict) -> bool:
    return bool(_report(entry).strip())


# ---------------------------------------------------------------------------- packing variable-size chunks


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Each item, longest first (ties in index order), into the first row with room; else a new row."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        row = next((r for r, free in enumerate(room) if n <= free), None)
        if row is None:
            rows.append([i])
            room.append(max(0, capacity - n))
        else:
            rows[row].append(i)
            room[row] -= n
    return rows


def pack_lengths(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Item indices grouped into rows of at most ``max_tokens`` tokens, by first-fit decreasing.

    An item longer than ``max_tokens`` gets a row of its own. The batch is as long as its longest row, so
    once FFD has set the number of rows, the rows are rebalanced: the smallest capacity that still packs
    into that many rows is found by bisection (a last, half-empty row would otherwise waste up to 1/R of
    the batch). Deterministic.
    """
    if max_tokens < 1:
        raise VoxseqError(f"max_tokens must be positive, not {max_tokens}")
    lengths = [int(n) for n in lengths]
    rows = _first_fit_decreasing(lengths, max_tokens)
    longest = lambda rs: max(sum(lengths[i] for i in r) for r in rs)  # noqa: E731
    fitting = [n for n in lengths if n <= max_tokens]
    if not fitting:
        return rows
    lo, hi = max(-(-sum(fitting) // len(rows)), max(fitting)), longest(rows) - 1
    while lo <= hi:
        cap = (lo + hi) // 2
        trial = _first_fit_decreasing(lengths, cap)
        if len(trial) <= len(rows):
            rows, hi = (trial if longest(trial) <= longest(rows) else rows), cap - 1
        else:
            lo = cap + 1
    return rows


def collate_packed(items: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """Pack chunks of different lengths into rows (see :func:`pack_lengths`).

    Returns ``tokens`` (R, Lmax, C*p^3), ``pos`` (R, Lmax, 3), ``segment`` (R, Lmax) long = the item (0..N-1)
    each token belongs to, -1 for padding; ``lengths`` (N,); ``volume_index``, ``z0``, ``z1`` (N,); and the
    per-item lists ``text``, ``sentence_keys``, ``shown_keys``, ``organs``. Lmax is the longest row, not
    ``max_tokens``.
    """
    lengths = [int(it["tokens"].shape[0]) for it in items]
    rows = pack_lengths(lengths, max_tokens)
    lmax = max(sum(lengths[i] for i in row) for row in rows)
    dim = items[0]["tokens"].shape[1]
    tokens = torch.zeros(len(rows), lmax, dim, dtype=items[0]["tokens"].dtype)
    pos = torch.zeros(len(rows), lmax, 3)
    segment = torch.full((len(rows), lmax), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            tokens[r, at:at + n] = items[i]["tokens"]
            pos[r, at:at + n] = items[i]["pos"]
            segment[r, at:at + n] = i
            at += n
    batch: dict[str, Any] = {"tokens": tokens, "pos": pos, "segment": segment, "lengths": torch.tensor(lengths)}
    for key in ("volume_index", "z0", "z1"):
        batch[key] = torch.tensor([int(it.get(key, -1)) for it in items])
    for key in ("text", "sentence_keys", "shown_keys", "organs"):
        batch[key] = [it.get(key) for it in items]
    return batch


def padding_waste(segment: torch.Tensor) -> float:
    """Fraction of the packed tokens that are padding."""
    return float((segment < 0).sum()) / max(1, segment.numel())


class ChunkBatchSampler(torch.utils.data.Sampler):
    """Index lists for training steps: step ``s`` on rank ``r`` of ``world_size`` gets the
    ``chunks_per_batch`` indices starting at ``(s * world_size + r) * chunks_per_batch``.

    Use it as a DataLoader ``batch_sampler`` with ``collate_fn=functools.partial(collate_packed, max_tokens=...)``;
    resuming at step ``s`` is ``start_step=s``, and the batches are those of an uninterrupted run.
    """

    def __init__(self, chunks_per_batch: int, start_step: int = 0, num_steps: int = 10**12,
                 world_size: int = 1, rank: int = 0):
        self.chunks_per_batch, self.start_step, self.num_steps = chunks_per_batch, start_step, num_steps
        self.world_size, self.rank = world_size, rank

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.start_step + self.num_steps):
            first = (step * self.world_size + self.rank) * self.chunks_per_batch
            yield list(range(first, first + self.chunks_per_batch))

    def __len__(self) -> int:
        return self.num_steps


def chunk_batches(dataset: ChunkTextDataset, step: int, chunks_per_batch: int, max_tokens: int) -> dict[str, Any]:
    """The packed batch of training step ``step`` (single process): items ``step * chunks_per_batch`` onwards."""
    indices = next(iter(ChunkBatchSampler(chunks_per_batch, start_step=step, num_steps=1)))
    return collate_packed([dataset[i] for i in indices], max_tokens)
