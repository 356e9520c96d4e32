"""The one manifest format that every dataset adapter produces and ``voxseq prepare`` reads.

A manifest is a JSON Lines file (``manifest.jsonl``): one :class:`Record` per line. JSON Lines
streams (a corpus of 50,000 studies never has to sit in memory as one document), diffs well and
is easy to write from any tool. Paths are stored as given; relative paths are resolved against the
manifest's folder when read.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from voxseq import VoxseqError
from voxseq.files import atomic_write

SPLITS = ("train", "val", "test")


@dataclass
class Box:
    """A lesion box in the image file's own voxel grid, inclusive-exclusive, (x, y, z) index order.

    ``category`` names the kind of lesion (semantic sequences draw one category across patients);
    ``organ``, when set, is the organ sentence the finding belongs to where that is not the category
    itself (a "pleural effusion" region of the "lung"); None: the category is the organ's name.
    ``text``, when set, is the report's words about this finding, as they stand in the organ's sentence
    ("There is basal atelectasis."): a chunk that holds the organ but not this box is paired with the
    organ's sentence without them (``voxseq.sequence.chunks.window_sentence``).
    """

    category: str
    bbox_xyz: list[int]  # [x0, y0, z0, x1, y1, z1]
    organ: str | None = None
    text: str | None = None

    def center_xyz(self) -> list[float]:
        b = self.bbox_xyz
        return [(b[i] + b[i + 3]) / 2 for i in range(3)]


@dataclass
class Record:
    """One study.

    ``images`` maps a modality name to a path: ``{"image": ...}`` for one scan, or for example
    ``{"t1n": ..., "t1c": ..., "t2w": ..., "t2f": ...}`` for co-registered contrasts (their order is
    the channel order). ``label`` is a segmentation mask path, ``masks`` per-region mask paths
    (RadGenome), ``classes`` class labels (``{"malignant": 1}``), ``text`` a free-text report,
    ``sentences`` organ/region-wise sentences, ``boxes`` lesion boxes, ``spacing`` an explicit (x, y, z)
    spacing for files that do not carry one (numpy), ``extra`` anything adapter-specific.
    """

    id: str
    images: dict[str, str]
    label: str | None = None
    masks: dict[str, str] = field(default_factory=dict)
    classes: dict[str, float] = field(default_factory=dict)
    text: str = ""
    sentences: dict[str, str] = field(default_factory=dict)
    boxes: list[Box] = field(default_factory=list)
    split: str = "train"
    spacing: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["boxes"] = [{k: v for k, v in b.items() if k not in ("organ", "text") or v is not None} for b in d["boxes"]]
        return json.dumps(d, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Record":
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise VoxseqError(f"manifest record {d.get('id', '?')}: unknown fields {sorted(unknown)}")
        if "id" not in d or "images" not in d:
            raise VoxseqError(f"manifest record {d}: needs at least 'id' and 'images'")
        d["boxes"] = [b if isinstance(b, Box) else Box(**b) for b in d.get("boxes", [])]
        if d.get("split", "train") not in SPLITS:
            raise VoxseqError(f"manifest record {d['id']}: split must be one of {SPLITS}, not {d['split']!r}")
        return cls(**d)

    def resolved(self, root: Path) -> "Record":
        """A copy with relative paths made absolute against ``root``."""

        def fix(p: str | None) -> str | None:
            return None if p is None else str(p if os.path.isabs(p) else (root / p))

        r = Record.from_dict(asdict(self))
        r.images = {k: fix(v) for k, v in r.images.items()}  # type: ignore[misc]
        r.label = fix(r.label)
        r.masks = {k: fix(v) for k, v in r.masks.items()}  # type: ignore[misc]
        return r


def write_manifest(records: Iterable[Record], path: str | os.PathLike) -> Path:
    """Write records as JSON Lines, atomically; ids must be unique."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            for r in records:
                if r.id in seen:
                    raise VoxseqError(f"{path}: duplicate record id {r.id!r}")
                seen.add(r.id)
                f.write(r.to_json() + "\n")

    return atomic_write(path, write)


def iter_manifest(path: str | os.PathLike, resolve: bool = True) -> Iterator[Record]:
    """Stream the records of a manifest; relative paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise VoxseqError(f"{path}: manifest not found")
    root = path.parent
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise VoxseqError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            r = Record.from_dict(d)
            yield r.resolved(root) if resolve else r


def read_manifest(path: str | os.PathLike, resolve: bool = True) -> list[Record]:
    return list(iter_manifest(path, resolve))
