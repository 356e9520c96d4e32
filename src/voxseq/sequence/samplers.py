"""Ordered token sequences cut from the voxel cache: spatial, contrast and semantic (AR-SSL4M).

A sequence is N sub-volumes, each cut into k patches of p^3 voxels, so L = N * k tokens:

* spatial  - N slabs of one volume, cut by a window sliding along ``axis`` with stride ``stride``
  (paper: a 128^3 crop -> 4 slabs of 32x128x128 at z offsets 0, 8, 16, 24; 16^3 patches; L = 512);
* contrast - the same crop in N co-registered modalities (channels) of one study (BraTS: t1n, t1c,
  t2w, t2f);
* semantic - lesion-centred crops of N lesions of one category from different studies.

Tokens hold ``channels`` channels each (``ViTConfig.in_chans``; default 1): a CT prepared with several
``hu_windows`` gives spatial and semantic sequences whose tokens carry every window of their place, in
patchify's (C, pz, py, px) order. Contrast sequences are made *of* channels (one per sub-volume) and so
need single-channel tokens.

Token order (``token_order``): ``"subvolume"`` puts sub-volume after sub-volume (as the paper's text
describes: the model reads a whole slab, then predicts the next one); ``"interleave"`` puts the N
tokens of the same patch position next to each other (as the official code does: each next token is
the same place one step further along the sequence). Default: ``subvolume``.

Every sample is a pure function of ``(seed, index)``: results do not depend on the number of
DataLoader workers, and resuming at step s means starting at index ``s * batch_size``.

Reading is built for speed: only the voxels of the sub-volumes are read from the memory map (float16,
one copy), converted to float32 once, flipped/rotated once for the whole sequence, and patchified
with one strided torch copy per sub-volume. MONAI's dictionary transforms add
metadata tracking and per-transform copies of the whole crop (several times slower, below what a
GPU needs), so the built-in augmentations are plain torch ops; any MONAI transform can be added
through ``AugmentConfig.monai`` and runs on the stacked sub-volumes, consistent within a sequence.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from voxseq import VoxseqError
from voxseq.sequence.patches import patch_grid_coords

POS_ORIGINS = ("crop", "volume")  # where token positions count from (ViTConfig.pos_origin)


class VolumeSource(Protocol):
    """What the samplers read: :class:`voxseq.data.cache.Cache` implements it, so does :class:`ArraySource`."""

    def __len__(self) -> int: ...
    def image(self, i: int) -> np.ndarray: ...  # (C, Z, Y, X), float16/32, may be a memmap
    def label(self, i: int) -> np.ndarray | None: ...
    def entry(self, i: int) -> dict: ...


class ArraySource:
    """An in-memory :class:`VolumeSource` over numpy arrays (for tests and small experiments)."""

    def __init__(self, images: list[np.ndarray], entries: list[dict] | None = None, labels: list | None = None):
        self.images = [a if a.ndim == 4 else a[None] for a in images]
        self.entries = entries or [{"id": str(i), "boxes": []} for i in range(len(images))]
        self.labels = labels or [None] * len(images)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        return self.images[i]

    def label(self, i: int) -> np.ndarray | None:
        return self.labels[i]

    def entry(self, i: int) -> dict:
        return self.entries[i]


@dataclass
class AugmentConfig:
    """Augmentations, drawn once per sequence and applied identically to all its sub-volumes."""

    flip_prob: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # per axis (z, y, x)
    rot90_prob: float = 0.0  # in-plane (y, x) rotation by 90/180/270 degrees
    scale_range: float = 0.1  # intensity * U(1 - s, 1 + s)
    shift_range: float = 0.1  # intensity + U(-s, s)
    intensity_prob: float = 0.5
    monai: list[dict[str, Any]] = field(default_factory=list)  # e.g. [{"name": "RandGaussianNoise", "prob": 0.2}]


@dataclass
class SequenceConfig:
    """How sequences are cut. Sizes are (Z, Y, X) voxels; the paper's setting is the default."""

    patch_size: int = 16
    crop_zyx: list[int] = field(default_factory=lambda: [128, 128, 128])
    subvolume_zyx: list[int] = field(default_factory=lambda: [32, 128, 128])
    n_subvolumes: int = 4
    stride: int = 8
    axis: int = 0  # sliding axis of spatial sequences: 0 = z, 1 = y, 2 = x
    token_order: str = "subvolume"  # or "interleave"
    kind_weights: dict[str, float] = field(default_factory=lambda: {"spatial": 1.0, "contrast": 0.0, "semantic": 0.0})
    n_contrast: int = 4
    n_semantic: int = 4
    pad_value: float = 0.0
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        p = self.patch_size
        if any(s % p for s in self.subvolume_zyx):
            raise VoxseqError(f"sequence.subvolume_zyx {self.subvolume_zyx} must be multiples of patch_size {p}")
        if self.token_order not in ("subvolume", "interleave"):
            raise VoxseqError(f"sequence.token_order must be 'subvolume' or 'interleave', not {self.token_order!r}")
        unknown = set(self.kind_weights) - set(SEQUENCE_KINDS)
        if unknown:
            raise VoxseqError(f"sequence.kind_weights: unknown kinds {sorted(unknown)} (known: {tuple(SEQUENCE_KINDS)})")
        if self.axis not in (0, 1, 2):
            raise VoxseqError(f"sequence.axis must be 0, 1 or 2, not {self.axis}")
        span = (self.n_subvolumes - 1) * self.stride + self.subvolume_zyx[self.axis]
        if span > self.crop_zyx[self.axis]:
            raise VoxseqError(f"sequence: {self.n_subvolumes} sub-volumes of {self.subvolume_zyx[self.axis]} with stride "
                              f"{self.stride} span {span} voxels, more than crop_zyx[{self.axis}]={self.crop_zyx[self.axis]}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // self.patch_size for s in self.subvolume_zyx)  # type: ignore[return-value]

    @property
    def tokens_per_subvolume(self) -> int:
        g = self.grid
        return g[0] * g[1] * g[2]

    def seq_len(self, kind: str = "spatial") -> int:
        return SEQUENCE_KINDS[kind].count(self) * self.tokens_per_subvolume


# ---------------------------------------------------------------------------- reading windows


def read_window(volume: np.ndarray, start_zyx, size_zyx, pad_value: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A (C, *size) window at ``start``, in the volume's dtype (float16 for a cache); it may reach outside
    the volume, where it is padded with ``pad_value``.

    Returns the window and, per axis, the [lo, hi) range of real (not padded) voxels inside it.
    """
    shape = volume.shape[1:]
    lo = [max(0, s) for s in start_zyx]
    hi = [min(n, s + k) for n, s, k in zip(shape, start_zyx, size_zyx)]
    valid = [(a - s, b - s) for a, b, s in zip(lo, hi, start_zyx)]
    if all(a == s and b == s + k for a, b, s, k in zip(lo, hi, start_zyx, size_zyx)):
        return np.array(volume[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]), valid
    out = np.full((volume.shape[0], *size_zyx), pad_value, volume.dtype)
    if all(b > a for a, b in zip(lo, hi)):
        out[:, valid[0][0]:valid[0][1], valid[1][0]:valid[1][1], valid[2][0]:valid[2][1]] = \
            volume[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return out, valid


def _token_valid(valid: list[tuple[int, int]], offset_zyx, grid, p: int) -> np.ndarray:
    """(k,) bool: tokens of a sub-volume at ``offset`` (in window coords) that hold any real voxel."""
    per_axis = []
    for (lo, hi), off, g in zip(valid, offset_zyx, grid):
        starts = off + np.arange(g) * p
        per_axis.append((starts + p > lo) & (starts < hi))
    return (per_axis[0][:, None, None] & per_axis[1][None, :, None] & per_axis[2][None, None, :]).ravel()


# ---------------------------------------------------------------------------- the dataset


class SequenceDataset(torch.utils.data.Dataset):
    """Map-style dataset of token sequences; ``dataset[i]`` depends only on (cfg.seed, i).

    Each item: ``tokens`` float32 (L, C*p^3) with C = ``channels``, ``pos`` float32 (L, 4) = (sub-volume, z, y, x) in patch
    units relative to the crop origin (slab offsets included: 8 voxels = 0.5 with p = 16; with
    ``pos_origin="volume"`` relative to the volume's first voxel, as ``ViTConfig.pos_origin``), ``valid``
    bool (L,) (False for tokens made only of padding), ``kind`` int (index into ``SEQUENCE_KINDS``),
    ``volume_index`` int (first volume of the sequence).
    """

    def __init__(self, source: VolumeSource, cfg: SequenceConfig, length: int = 10**9, pos_origin: str = "crop",
                 channels: int = 1):
        if pos_origin not in POS_ORIGINS:
            raise VoxseqError(f"pos_origin must be one of {POS_ORIGINS}, not {pos_origin!r}")
        if channels < 1:
            raise VoxseqError(f"channels must be at least 1, not {channels}")
        self.source, self.cfg, self.length, self.pos_origin = source, cfg, length, pos_origin
        self.channels = channels
        if channels > 1:
            few = [source.entry(i).get("id", str(i)) for i in range(len(source)) if self._channels(i) < channels]
            if few:
                raise VoxseqError(f"tokens of {channels} channels (model.in_chans), but {len(few)} volume(s) have fewer, "
                                  f"e.g. {few[0]!r}: prepare every volume with {channels} channels (preprocess.hu_windows)")
        self.grid = cfg.grid
        self.coords = patch_grid_coords(self.grid).astype(np.float32)  # (k, 3)
        self._monai = None
        self.kinds, self.weights = self._usable_kinds()

    # -- set-up

    def _usable_kinds(self) -> tuple[list[str], np.ndarray]:
        kinds, weights = [], []
        for kind, w in self.cfg.kind_weights.items():
            if w <= 0:
                continue
            prepare = SEQUENCE_KINDS[kind].prepare
            if prepare is not None:
                prepare(self)
            kinds.append(kind)
            weights.append(w)
        if not kinds:
            raise VoxseqError("sequence.kind_weights gives no kind a positive weight")
        if len(self.source) == 0:
            raise VoxseqError("no volumes to cut sequences from")
        w = np.array(weights, float)
        return kinds, w / w.sum()

    def _channels(self, i: int) -> int:
        """Volume ``i``'s channel count: its cache entry's, or its image's when the entry has none."""
        n = self.source.entry(i).get("channels")
        return int(n) if n is not None else int(self.source.image(i).shape[0])

    def _contrast_volumes(self) -> list[int]:
        return [i for i in range(len(self.source)) if self._channels(i) >= self.cfg.n_contrast]

    def _lesion_index(self) -> dict[str, list[tuple[int, list[int]]]]:
        """category -> [(volume, bbox_zyx)], keeping categories seen in at least two volumes."""
        index: dict[str, list[tuple[int, list[int]]]] = defaultdict(list)
        for i in range(len(self.source)):
            for b in self.source.entry(i).get("boxes", []):
                index[b["category"]].append((i, b["bbox_zyx"]))
        return {c: v for c, v in sorted(index.items()) if len({i for i, _ in v}) >= 2}

    def __len__(self) -> int:
        return self.length

    # -- sampling

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.cfg.seed, int(index)])
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.weights))] if len(self.kinds) > 1 else self.kinds[0]
        windows, offsets, valids, first, *origins = SEQUENCE_KINDS[kind].draw(self, rng)
        return self._tokenize(windows, offsets, valids, rng, kind, first, origins[0] if origins else None)

    def _random_start(self, rng, shape, size) -> list[int]:
        """Uniform crop corner; volumes smaller than the crop get it centred (padding both sides)."""
        return [int(rng.integers(0, n - k + 1)) if n >= k else -((k - n) // 2) for n, k in zip(shape, size)]

    # -- augmentation + tokens

    def _augment_geometry(self, src: torch.Tensor, rng) -> torch.Tensor:
        """Random flips and in-plane rot90 of the (C, Z, Y, X) window: one draw for the whole sequence,
        so all its sub-volumes move together.

        rot90 by k is ``swap(flip(W, x))`` (k=1), ``flip(W, y, x)`` (k=2) or ``swap(flip(W, y))`` (k=3),
        with ``swap`` exchanging Y and X; folding it into the flips costs one flip copy (plus one
        copy for the swap) whatever was drawn.
        """
        aug = self.cfg.augment
        flip = [prob > 0 and rng.random() < prob for prob in aug.flip_prob]
        swap = False
        if aug.rot90_prob > 0 and rng.random() < aug.rot90_prob:
            k = int(rng.integers(1, 4)) if src.shape[2] == src.shape[3] else 2  # non-square: 180 only
            flip[2] ^= k in (1, 2)
            flip[1] ^= k in (2, 3)
            swap = k != 2
        dims = [axis + 1 for axis, f in enumerate(flip) if f]
        if dims:
            src = torch.flip(src, dims)
        return src.transpose(2, 3).contiguous() if swap else src

    def _apply_monai(self, stacked: torch.Tensor, rng) -> torch.Tensor:
        if not self.cfg.augment.monai:
            return stacked
        import monai.transforms as mt

        if self._monai is None:
            self._monai = [getattr(mt, d["name"])(**{k: v for k, v in d.items() if k != "name"}) for d in self.cfg.augment.monai]
        for t in self._monai:
            if hasattr(t, "set_random_state"):
                t.set_random_state(seed=int(rng.integers(2**31)))
            stacked = torch.as_tensor(t(stacked))
        return stacked

    def _tokenize(self, window: np.ndarray, offsets, valids, rng, kind: str, first: int,
                  origins=None) -> dict[str, Any]:
        cfg, p, grid = self.cfg, self.cfg.patch_size, self.grid
        k = self.tokens_per_sub = grid[0] * grid[1] * grid[2]
        n = len(offsets)
        src = torch.from_numpy(window).float()  # (C, Z, Y, X): contiguous f16 -> f32 is fast, strided is not
        src = self._augment_geometry(src, rng)
        aug = cfg.augment
        if aug.intensity_prob > 0 and rng.random() < aug.intensity_prob:  # on the window: slabs overlap, it is smaller
            src.mul_(float(rng.uniform(1 - aug.scale_range, 1 + aug.scale_range)))
            src.add_(float(rng.uniform(-aug.shift_range, aug.shift_range)))
        sd, sh, sw = cfg.subvolume_zyx
        ch = self.channels
        subs = []
        for i, off in enumerate(offsets):
            c = i * ch if kind != "spatial" else 0  # spatial slabs share the window's channels; others own theirs
            subs.append(src[c:c + ch, off[0]:off[0] + sd, off[1]:off[1] + sh, off[2]:off[2] + sw])
        if cfg.augment.monai:
            stacked = self._apply_monai(torch.cat(subs).float(), rng)  # (n*C, Z, Y, X): channels to MONAI
            subs = list(stacked.reshape(n, ch, *stacked.shape[1:]))
        tokens = torch.empty(n, grid[0], grid[1], grid[2], ch, p, p, p)
        for i, s in enumerate(subs):
            view = s.reshape(ch, grid[0], p, grid[1], p, grid[2], p).permute(1, 3, 5, 0, 2, 4, 6)
            tokens[i].copy_(view)  # patchify: the one strided copy (copy_ has torch's fastest path for it)
        tokens = tokens.reshape(n, k, ch * p**3)
        pos = np.empty((n, k, 4), np.float32)
        valid = np.empty((n, k), bool)
        volume_origin = self.pos_origin == "volume" and origins is not None
        for i, off in enumerate(offsets):
            pos[i, :, 0] = i
            start = np.asarray(off, np.float32) + (np.asarray(origins[i], np.float32) if volume_origin else 0.0)
            pos[i, :, 1:] = self.coords + start / p
            valid[i] = _token_valid(valids[i], off, grid, p)
        if cfg.token_order == "interleave":  # (n, k) -> (k, n): same place, sub-volume after sub-volume
            tokens, pos, valid = tokens.transpose(0, 1), pos.transpose(1, 0, 2), valid.T
        return {
            "tokens": tokens.reshape(n * k, ch * p**3).contiguous(),
            "pos": torch.from_numpy(np.ascontiguousarray(pos.reshape(n * k, 4))),
            "valid": torch.from_numpy(np.ascontiguousarray(valid.reshape(n * k))),
            "kind": list(SEQUENCE_KINDS).index(kind),
            "volume_index": int(first),
        }


# ---------------------------------------------------------------------------- sequence kinds (a registry)


@dataclass(frozen=True)
class SequenceKind:
    # (dataset, rng) -> (window (C', Z, Y, X): the C token channels for spatial kinds, sub-volume i's C channels at
    # [i*C, (i+1)*C) for the others; offsets per sub-volume in the window, valid masks, first volume[,
    # where each sub-volume's window starts in its volume (voxels; for pos_origin="volume", else zeros are assumed)])
    draw: Callable[..., tuple]
    count: Callable[[SequenceConfig], int]  # sub-volumes per sequence
    prepare: Callable[..., None] | None = None  # (dataset) -> None: indexes the data; VoxseqError if it cannot give this kind


SEQUENCE_KINDS: dict[str, SequenceKind] = {}


def register_sequence_kind(name: str, count: Callable[[SequenceConfig], int], prepare: Callable[..., None] | None = None):
    """Register ``draw(dataset, rng)`` as the sequence kind ``name`` (``sequence.kind_weights`` picks it by name)."""
    def register(draw: Callable[..., tuple]) -> Callable[..., tuple]:
        SEQUENCE_KINDS[name] = SequenceKind(draw, count, prepare)
        return draw
    return register


def _need_contrast(ds: SequenceDataset) -> None:
    if ds.channels > 1:
        raise VoxseqError(f"contrast sequences make one sub-volume of each channel, so their tokens have one channel; "
                          f"with {ds.channels}-channel tokens (model.in_chans) set sequence.kind_weights.contrast to 0")
    if not ds._contrast_volumes():
        raise VoxseqError(f"sequence.kind_weights asks for contrast sequences, but no volume has "
                          f">= {ds.cfg.n_contrast} channels")


def _index_lesions(ds: SequenceDataset) -> None:
    ds.lesions = ds._lesion_index()
    if not ds.lesions:
        raise VoxseqError("sequence.kind_weights asks for semantic sequences, but no lesion category "
                          "has boxes in two or more volumes")


@register_sequence_kind("spatial", lambda cfg: cfg.n_subvolumes)
def spatial_sequence(ds: SequenceDataset, rng: np.random.Generator):
    """Slabs sliding along ``cfg.axis`` through one volume (AR-SSL4M's spatial sequences)."""
    cfg = ds.cfg
    v = int(rng.integers(len(ds.source)))
    vol = ds.source.image(v)
    size = list(cfg.subvolume_zyx)
    size[cfg.axis] = (cfg.n_subvolumes - 1) * cfg.stride + cfg.subvolume_zyx[cfg.axis]  # the slabs' union
    start = ds._random_start(rng, vol.shape[1:], cfg.crop_zyx)
    window, valid = read_window(vol[:ds.channels], start, size, cfg.pad_value)
    offsets = []
    for n in range(cfg.n_subvolumes):
        off = [0, 0, 0]
        off[cfg.axis] = n * cfg.stride
        offsets.append(off)
    return window, offsets, [valid] * cfg.n_subvolumes, v, [start] * cfg.n_subvolumes


@register_sequence_kind("contrast", lambda cfg: cfg.n_contrast, _need_contrast)
def contrast_sequence(ds: SequenceDataset, rng: np.random.Generator):
    """One place in ``cfg.n_contrast`` co-registered channels (MRI sequences) of one volume."""
    cfg = ds.cfg
    candidates = ds._contrast_volumes()
    v = candidates[int(rng.integers(len(candidates)))]
    vol = ds.source.image(v)
    start = ds._random_start(rng, vol.shape[1:], cfg.subvolume_zyx)
    window, valid = read_window(vol[: cfg.n_contrast], start, cfg.subvolume_zyx, cfg.pad_value)
    return window, [[0, 0, 0]] * cfg.n_contrast, [valid] * cfg.n_contrast, v, [start] * cfg.n_contrast


@register_sequence_kind("semantic", lambda cfg: cfg.n_semantic, _index_lesions)
def semantic_sequence(ds: SequenceDataset, rng: np.random.Generator):
    """Lesions of one category from different volumes (repeating volumes only when too few)."""
    cfg = ds.cfg
    categories = list(ds.lesions)
    items = ds.lesions[categories[int(rng.integers(len(categories)))]]
    by_volume: dict[int, list[list[int]]] = defaultdict(list)
    for vi, box in items:
        by_volume[vi].append(box)
    volumes = list(by_volume)
    # different studies first; repeat studies only when the category has fewer than N
    order = rng.permutation(len(volumes))
    picks = [volumes[order[n % len(volumes)]] for n in range(cfg.n_semantic)]
    crops, valids, starts = [], [], []
    for vi in picks:
        boxes = by_volume[vi]
        z0, y0, x0, z1, y1, x1 = boxes[int(rng.integers(len(boxes)))]
        centre = [(z0 + z1) // 2, (y0 + y1) // 2, (x0 + x1) // 2]
        start = [c - k // 2 for c, k in zip(centre, cfg.subvolume_zyx)]
        w, valid = read_window(ds.source.image(vi)[:ds.channels], start, cfg.subvolume_zyx, cfg.pad_value)
        crops.append(w)
        valids.append(valid)
        starts.append(start)
    return np.concatenate(crops), [[0, 0, 0]] * cfg.n_semantic, valids, picks[0], starts  # (N*C, Z, Y, X)


KINDS = tuple(SEQUENCE_KINDS)  # the built-in kinds; an item's ``kind`` is its index in SEQUENCE_KINDS


class ResumableSampler(torch.utils.data.Sampler):
    """Indices ``start, start+1, ...`` (this rank's share of them under DDP), ``num`` of them.

    Global sample ``g`` goes to rank ``g % world_size``; resuming at step s with per-rank batch b
    means ``start = s * b * world_size``. Because items depend only on their index, a resumed or
    re-sharded run sees exactly the samples an uninterrupted one would.
    """

    def __init__(self, start: int = 0, num: int = 10**12, world_size: int = 1, rank: int = 0):
        self.start, self.num, self.world_size, self.rank = start, num, world_size, rank

    def __iter__(self) -> Iterator[int]:
        g = self.start + self.rank
        for _ in range(self.num):
            yield g
            g += self.world_size

    def __len__(self) -> int:
        return self.num

    def state_dict(self) -> dict[str, int]:
        return {"start": self.start, "world_size": self.world_size, "rank": self.rank}


def collate_sequences(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack items of equal length into a batch: tokens (B, L, C*p^3), pos (B, L, 4), valid (B, L)."""
    lengths = {it["tokens"].shape[0] for it in items}
    if len(lengths) > 1:
        raise VoxseqError(f"a batch mixes sequence lengths {sorted(lengths)}: give every kind the same number of "
                          "sub-volumes (n_subvolumes, n_contrast, n_semantic)")
    return {
        "tokens": torch.stack([it["tokens"] for it in items]),
        "pos": torch.stack([it["pos"] for it in items]),
        "valid": torch.stack([it["valid"] for it in items]),
        "kind": torch.tensor([it["kind"] for it in items]),
        "volume_index": torch.tensor([it["volume_index"] for it in items]),
    }


def measure_sampler(quick: bool = False, augment: bool = True) -> float:
    """Paper-size spatial sequences (4 x 32x128x128 slabs of a 128^3 crop, 512 tokens of 16^3) per
    second on one core, from a float16 memory-mapped ~160x256x256 volume, warm page cache."""
    import os
    import tempfile
    import time

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "v.npy")
        np.save(path, np.random.default_rng(0).random((1, 160, 256, 256), dtype=np.float32).astype(np.float16))
        vol = np.load(path, mmap_mode="r")
        vol[:].max()  # warm the page cache
        aug = AugmentConfig(flip_prob=[0.5, 0.5, 0.5], rot90_prob=0.5) if augment else AugmentConfig(intensity_prob=0.0)
        ds = SequenceDataset(ArraySource([vol]), SequenceConfig(augment=aug))
        n = 100 if quick else 500
        ds[0]
        t = time.perf_counter()
        for i in range(n):
            ds[i]
        return n / (time.perf_counter() - t)
