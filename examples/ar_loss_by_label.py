"""Where an AR-SSL4M run can predict the next token: its loss per label of a labelled cache.

Pretraining only teaches what the next token makes predictable. This cuts windows of one sub-volume's
shape from the cache's evaluation volumes, runs the AR model causally (prefix 0) and averages each token's
loss (the run's own target: normalised pixels unless it trained with norm_pix=false) by the label at the
token's centre. With the normalised target a loss near 1.0 means the model does no better than predicting
0, i.e. the tokens of that label taught it nothing. One sub-volume is scored from its first token with crop
positions, so a token has less context than in training (where other sub-volumes come first): the losses
are upper bounds, comparable between labels and between runs of one sequence setting. docs/reproducing.md ("Why no model learns the liver and
kidneys here") gives its figures on the v2 phantoms.

    python examples/ar_loss_by_label.py --run runs/ar_tiny --cache runs/cmp/cache

The last line printed is JSON: {label: {"tokens": n, "loss": mean loss, "token_sd": mean voxel sd}}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    from voxseq.models.hub import load_model
    from voxseq.objectives.ar import norm_pixel_target
    from voxseq.sequence.patches import patch_grid_coords, patchify
    from voxseq.tasks.data import open_cache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="an AR pretraining run folder or checkpoint")
    ap.add_argument("--cache", required=True, help="a prepared cache with labels, in the run's preprocessing")
    ap.add_argument("--windows", type=int, default=6, help="windows drawn per evaluation volume")
    ap.add_argument("--splits", default="val,test", help="the cache splits to read")
    args = ap.parse_args(argv)

    model, _, meta = load_model(args.run, expect="ARViT3D", hint="give an AR pretraining run")
    seq = meta.get("config", {}).get("sequence", {})
    norm = meta.get("config", {}).get("norm_pix", True)
    p = model.encoder.cfg.patch_size
    window = tuple(seq.get("subvolume_zyx") or (4 * p, 4 * p, 4 * p))
    coords = patch_grid_coords(tuple(w // p for w in window))
    pos = torch.from_numpy(np.concatenate([np.zeros((len(coords), 1)), coords], 1).astype(np.float32))[None]
    cache = open_cache(Path(args.cache), None, None)
    splits = set(args.splits.split(","))
    rng = np.random.default_rng(0)
    loss: dict[int, list[float]] = {}
    sd: dict[int, list[float]] = {}
    for i in range(len(cache)):
        if cache.entry(i)["split"] not in splits or not cache.entry(i).get("has_label"):
            continue
        img, lab = np.asarray(cache.image(i), np.float32), np.asarray(cache.label(i))  # img: (C, Z, Y, X)
        if any(n < w for n, w in zip(img.shape[1:], window)):
            continue
        for _ in range(args.windows):
            s = [int(rng.integers(0, n - w + 1)) for n, w in zip(img.shape[1:], window)]
            crop = img[(slice(None), *(slice(a, a + w) for a, w in zip(s, window)))]
            tok = patchify(torch.from_numpy(np.ascontiguousarray(crop))[None], p)  # (1, L, C*p^3)
            with torch.no_grad():
                pred = model(tok, pos, torch.zeros(1, dtype=torch.long))
            centre = coords * p + p // 2 + np.array(s)
            labels = lab[tuple(centre.T)]
            goal = norm_pixel_target(tok, channels=img.shape[0]) if norm else tok  # the training loss, token by token
            per_token = (pred - goal).pow(2).mean(-1)[0].numpy()
            token_sd = tok[0].std(-1, unbiased=False).numpy()
            for t in range(1, len(coords)):  # token 0 is predicted from the start token alone
                loss.setdefault(int(labels[t]), []).append(float(per_token[t]))
                sd.setdefault(int(labels[t]), []).append(float(token_sd[t]))
    out = {str(k): {"tokens": len(loss[k]), "loss": float(np.mean(loss[k])), "token_sd": float(np.mean(sd[k]))}
           for k in sorted(loss)}
    for k, v in out.items():
        print(f"label {k:>3}: {v['tokens']:6d} tokens  loss {v['loss']:.3f}  voxel sd {v['token_sd']:.4f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
