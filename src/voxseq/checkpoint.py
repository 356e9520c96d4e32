"""The checkpoint store: safetensors weights + a JSON of the full config + training state, written atomically.

Neutral like ``voxseq.config`` (it knows files, tensors and modules, no voxseq model): ``voxseq.train``
writes and resumes through it, ``voxseq.models.hub`` reads models through it.

Layout inside a run folder (nanoGPT-like ``model_<step>`` + metadata)::

    RUN_DIR/checkpoints/model_00000030.safetensors   weights (no pickle, loads anywhere)
    RUN_DIR/checkpoints/optim_00000030.pt            optimiser, scheduler, RNG and sampler state
    RUN_DIR/checkpoints/model_00000030.json          step, config, preprocessing, checksums; written
                                                     last, so its presence marks a complete checkpoint

Loading never unpickles arbitrary objects: weights come from safetensors and the training state
through ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.

A weights file without voxseq metadata (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, or ``.safetensors``
with no ``.json`` beside it) is read the same safe way by :func:`read_weights_file`; the model hub
(``voxseq.models.hub.load_checkpoint``) converts the official AR-SSL4M format from it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voxseq import VoxseqError, __version__
from voxseq.files import atomic_write, sha256_file

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")  # torch pickles: read with weights_only=True
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net", "module")  # containers holding the weights


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE_BYTES = 256 << 20  # a failed write with less free space than this is taken for a full disk


def _write_failed(e: BaseException) -> bool:
    """An OSError, or torch.save's RuntimeError for a failed write (its zip writer hides the errno)."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and "write failed" in str(e))


def _disk_full(e: BaseException, folder: Path) -> bool:
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in DISK_FULL_ERRNOS
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    except OSError:
        return False


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / FSDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``_orig_mod.``) that DDP and torch.compile add to keys."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def get_rng_state() -> dict[str, Any]:
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(int(x) for x in state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_paths(folder: Path, step: int) -> tuple[Path, Path, Path]:
    return (folder / f"model_{step:08d}.safetensors", folder / f"optim_{step:08d}.pt", folder / f"model_{step:08d}.json")


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module | dict[str, torch.Tensor], *,
                    training_state: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                    keep_last: int = 3) -> Path:
    """Write weights, training state and metadata for ``step``; keep the newest ``keep_last``.

    ``model`` is a module or an already gathered (full) state dict. ``training_state`` (optimiser
    state, RNG, sampler...) must hold only tensors and plain Python containers/numbers/strings.
    Returns the metadata path.
    """
    from safetensors.torch import save_file

    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    weights_path, optim_path, meta_path = checkpoint_paths(folder, step)
    raw = model if isinstance(model, dict) else unwrap_model(model).state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in clean_state_dict(raw).items()}
    existed = meta_path.exists()
    try:
        atomic_write(weights_path, lambda p: save_file(state, str(p)), sync_dir=True)
        sums = {weights_path.name: sha256_file(weights_path)}
        if training_state is not None:
            atomic_write(optim_path, lambda p: torch.save(training_state, p), sync_dir=True)
            sums[optim_path.name] = sha256_file(optim_path)
        info = {"step": step, "voxseq_version": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "sha256": sums, **(meta or {})}
        atomic_write(meta_path, lambda p: p.write_text(json.dumps(info, indent=1)), sync_dir=True)
    except BaseException as e:
        if not existed:  # no metadata: the files of this step never counted; leave no orphans to fill the disk
            for p in (weights_path, optim_path):
                p.unlink(missing_ok=True)
        if _write_failed(e):
            previous = [s for s in _steps(folder) if s != step]
            kept = (f"the previous checkpoint (step {previous[-1]}) is intact and --resume continues from it"
                    if previous else "no earlier checkpoint exists")
            cause = "no space left on device" if _disk_full(e, folder) else f"write failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
            raise VoxseqError(f"{folder}: {cause} while writing the checkpoint of step {step}; {kept}"
                              + ("; free space, then run it again" if "space" in cause else "")) from None
        raise
    _prune(folder, keep_last)
    return meta_path


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob("model_*.json"))


def _prune(folder: Path, keep_last: int) -> None:
    for step in _steps(folder)[:-keep_last] if keep_last > 0 else []:
        for p in checkpoint_paths(folder, step)[::-1]:  # metadata first: the checkpoint stops counting at once
            p.unlink(missing_ok=True)


def latest_checkpoint(path: str | os.PathLike, verify: bool = True) -> Path | None:
    """The metadata file of a checkpoint: ``path`` itself (a .json or .safetensors of one), or the
    newest complete one in a run folder (or its ``checkpoints/``). Incomplete or corrupt ones are skipped."""
    p = Path(path)
    if p.is_file():
        meta = p.with_suffix(".json") if p.suffix == ".safetensors" else p
        if not meta.is_file():
            raise VoxseqError(f"{p}: no metadata file {meta.name} next to it (incomplete checkpoint)")
        return meta
    folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if not folder.is_dir():
        raise VoxseqError(f"{p}: no such checkpoint or run folder")
    for step in reversed(_steps(folder)):
        meta = checkpoint_paths(folder, step)[2]
        try:
            _verify(meta) if verify else None
            return meta
        except VoxseqError as e:
            import warnings

            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
    return None


def _verify(meta_path: Path) -> dict[str, Any]:
    try:
        info = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise VoxseqError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    for name, digest in info.get("sha256", {}).items():
        f = meta_path.parent / name
        if not f.is_file():
            raise VoxseqError(f"{f}: missing (checkpoint incomplete)")
        if sha256_file(f) != digest:
            raise VoxseqError(f"{f}: checksum mismatch (corrupt checkpoint file)")
    return info


@dataclass
class Checkpoint:
    path: Path  # the metadata file
    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def training_state(self) -> dict[str, Any]:
        """Optimiser/scheduler/RNG/sampler state, loaded with ``weights_only=True`` (no arbitrary code)."""
        if self.meta.get("format"):  # a foreign weights file converted by the model hub
            raise VoxseqError(f"{self.path}: a weights file in the {self.meta['format']} format has no voxseq training "
                              "state to resume from")
        path = checkpoint_paths(self.path.parent, self.step)[1]
        if not path.is_file():
            raise VoxseqError(f"{path}: this checkpoint has no training state to resume from")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle errors come in many types
            raise VoxseqError(f"{path}: refused to load training state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None


def _tensors_in(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state dict inside a loaded object: a flat {name: tensor} dict, or one nested under
    ``state_dict`` / ``model`` / ... (non-tensor entries beside the tensors are ignored)."""
    if not isinstance(obj, dict):
        return None
    for key in STATE_DICT_KEYS:
        inner = _tensors_in(obj.get(key))
        if inner:
            return inner
    flat = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return flat or None


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a bare weights file: safetensors, or a torch pickle through
    ``torch.load(weights_only=True)``, which refuses every object but tensors and plain containers,
    so loading never runs code from the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise VoxseqError(f"{p}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors come in many types
        raise VoxseqError(f"{p}: refused to load weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "only tensors and plain containers are accepted (torch.load weights_only=True)") from None
    state = _tensors_in(obj)
    if not state:
        raise VoxseqError(f"{p}: no tensors found (expected a state dict, possibly under 'state_dict' or 'model')")
    return state


def is_bare_weights(path: str | os.PathLike) -> bool:
    """A weights file without voxseq metadata beside it (a foreign format for the model hub to convert)."""
    p = Path(path)
    return p.is_file() and (p.suffix in WEIGHTS_SUFFIXES or (p.suffix == ".safetensors" and not p.with_suffix(".json").is_file()))


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Load a voxseq checkpoint (file or run folder -> its latest); checksums verified unless ``verify=False``.

    A bare weights file (``.pth``/``.pt``/``.bin``/``.ckpt``, or ``.safetensors`` without metadata) is
    refused here; ``voxseq.models.hub.load_checkpoint`` converts the formats it knows."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if is_bare_weights(path):
        raise VoxseqError(f"{path}: a weights file without voxseq metadata; load it through voxseq.models.hub")
    meta_path = latest_checkpoint(path, verify=False)
    if meta_path is None:
        raise VoxseqError(f"{path}: no complete checkpoint in this run folder")
    info = _verify(meta_path) if verify else json.loads(meta_path.read_text())
    weights = checkpoint_paths(meta_path.parent, int(info["step"]))[0]
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise VoxseqError(f"{weights}: not a readable safetensors file ({e})") from None
    return Checkpoint(meta_path, info, state)


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint shape, model shape)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                 f"shape-mismatched {len(self.mismatched)}"]
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                lines.append(f"  {title}: {', '.join(items[:12])}{' ...' if len(items) > 12 else ''}")
        for k, a, b in self.mismatched[:12]:
            lines.append(f"  shape mismatch {k}: checkpoint {tuple(a)} vs model {tuple(b)}")
        return "\n".join(lines)


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], *, prefix_map: dict[str, str] | None = None,
                            strict: bool = False) -> LoadReport:
    """Load what fits, report what does not. ``prefix_map`` renames key prefixes (``{"encoder.": ""}``)."""
    state = clean_state_dict(state)
    if prefix_map:
        renamed = {}
        for k, v in state.items():
            for old, new in prefix_map.items():
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            renamed[k] = v
        state = renamed
    own = model.state_dict()
    report = LoadReport()
    usable = {}
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
        else:
            usable[k] = v
            report.loaded.append(k)
    report.missing = [k for k in own if k not in usable and k not in {m[0] for m in report.mismatched}]
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise VoxseqError("checkpoint does not fit the model:\n" + report.summary())
    model.load_state_dict(usable, strict=False)
    return report


def checkpoint_to_resume(run_dir: str | os.PathLike, resume: bool) -> Checkpoint | None:
    """The run's latest complete checkpoint when resuming (None: a fresh start, also when nothing was
    saved yet); refuses to start afresh over a run folder that already holds checkpoints."""
    folder = Path(run_dir) / "checkpoints"
    has_any = folder.is_dir() and any(folder.glob("model_*.json"))
    if not resume:
        if has_any:
            raise VoxseqError(f"{run_dir} already holds checkpoints: pass --resume to continue, or choose another --out")
        return None
    if not has_any or latest_checkpoint(run_dir) is None:
        return None
    return load_checkpoint(run_dir)
