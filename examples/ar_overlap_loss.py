"""Does an AR-SSL4M run use what it has already seen? Its loss on rows of a token an earlier slab showed.

Spatial sequences cut slabs with a stride smaller than their depth, so part of every token after the first
slab is already in the context: with 8^3 patches, 16-slice slabs and stride 8 (``configs/ar_tiny.yaml``),
the first z-row of tokens of slab s is voxel for voxel the second row of slab s - 1, at the same (z, y, x).
A model that has learned to look back predicts those voxels far better than the ones no slab has shown.
This runs the model on its own training sequences (spatial only, no augmentation, the first slab as the
prefix, as ``plot_reconstruction`` does) and averages the per-voxel loss of each later slab over the voxel
rows an earlier slab showed ("seen") and the others ("new"). docs/reproducing.md ("a copy the model does
not learn") gives its figures.

    python examples/ar_overlap_loss.py --run runs/ar_tiny --sequences 48

The last line printed is JSON: {"slab S": {"seen": loss, "new": loss, "seen_voxels": n, "new_voxels": n}}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    from voxseq.config import from_dict
    from voxseq.models.hub import load_model
    from voxseq.objectives.ar import norm_pixel_target
    from voxseq.sequence import AugmentConfig, SequenceConfig, SequenceDataset
    from voxseq.tasks.data import open_cache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="an AR pretraining run folder (its cache is read)")
    ap.add_argument("--cache", type=Path, help="another cache in the run's preprocessing (default: RUN/cache)")
    ap.add_argument("--sequences", type=int, default=48, help="sequences scored")
    args = ap.parse_args(argv)

    model, _, meta = load_model(args.run, expect="ARViT3D", hint="give an AR pretraining run")
    seq = from_dict(SequenceConfig, {**meta["config"]["sequence"], "kind_weights": {"spatial": 1.0}})
    seq.augment = AugmentConfig(intensity_prob=0.0)
    c = model.encoder.cfg.in_chans
    ds = SequenceDataset(open_cache(args.cache or args.run / "cache", None, None), seq,
                         pos_origin=model.encoder.cfg.pos_origin, channels=c)
    p, k, depth = seq.patch_size, seq.tokens_per_subvolume, seq.subvolume_zyx[0]
    if seq.axis != 0:
        raise SystemExit("this check follows slabs along z (sequence.axis=0)")
    sums: dict[tuple[int, str], list[float]] = {}
    with torch.no_grad():
        for i in range(args.sequences):
            item = ds[10**6 + i]  # indices training at this scale does not reach first
            x = item["tokens"][None]
            pred = model(x, item["pos"][None], torch.tensor([k]))  # the first slab is the prefix
            err = (pred - norm_pixel_target(x, channels=c)).pow(2)[0].reshape(-1, c, p, p, p)
            row_err = err.mean(dim=(1, 3, 4)).numpy()  # (L, p): mean over channels, y, x of each z-row
            slab = item["pos"][:, 0].numpy().astype(int)
            z0 = np.rint(item["pos"][:, 1].numpy() * p).astype(int)  # z of each token's first row, voxels
            z0 -= z0[slab == 0].min()  # counted from the first slab's top (crop or volume positions alike)
            valid = item["valid"].numpy()
            for t in np.flatnonzero(valid & (slab > 0)):
                seen_until = (slab[t] - 1) * seq.stride + depth  # crop rows below this were in an earlier slab
                rows = z0[t] + np.arange(p)
                for kind, sel in (("seen", rows < seen_until), ("new", rows >= seen_until)):
                    if sel.any():
                        sums.setdefault((int(slab[t]), kind), []).extend(row_err[t][sel].tolist())
    out: dict[str, dict] = {}
    for (s, kind), v in sorted(sums.items()):
        row = out.setdefault(f"slab {s}", {})
        row[kind], row[f"{kind}_voxels"] = float(np.mean(v)), len(v) * p * p * c
    for name, row in out.items():
        print(f"{name}: seen {row.get('seen', float('nan')):.3f}  new {row.get('new', float('nan')):.3f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
