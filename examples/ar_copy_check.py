"""How much training does an AR-SSL4M model need to find a token it has already seen? A copy test on noise.

Spatial sequences cut overlapping slabs, so the first row of tokens of every slab after the first repeats,
voxel for voxel and at the same (z, y, x), the last row of the slab before. On white noise nothing else is
predictable: the norm-pixel loss of every token stays at 1 unless the model learns to look back one slab for
the token it is about to predict, and then the repeated ("seen") tokens fall towards 0 while the others
("new") stay at 1. This trains voxseq's own ``ARViT3D`` with the AR objective (random prefix, norm-pixel
loss) on such sequences and prints both losses as training goes, to tell "the model cannot copy" from "it
has not trained long enough to" (docs/reproducing.md, "a copy the model does not learn").

    python examples/ar_copy_check.py --batch 32 --steps 1200      # ~4 min on one core

Sequences: 4 slabs of 2 x 4 x 4 tokens of 4^3 voxels (128 tokens), slab s covering token rows s and s + 1.
The last line printed is JSON: {"steps", "sequences", "seen", "new", "learned_at"} with the losses of the
last evaluation and the first evaluated step where seen < 0.5 (null if none).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def copy_batch(rng: np.random.Generator, batch: int, n_sub: int = 4, grid_yx: tuple[int, int] = (4, 4), p: int = 4
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (B, L, p^3), positions (B, L, 4) = (slab, z, y, x), seen (L,)): noise slabs of two token rows
    at a stride of one row, so each later slab's first row repeats the row before at the same (z, y, x)."""
    gy, gx = grid_yx
    rows = torch.from_numpy(rng.random((batch, n_sub + 1, gy * gx, p ** 3), dtype=np.float32))
    tokens = torch.cat([rows[:, s:s + 2].reshape(batch, 2 * gy * gx, -1) for s in range(n_sub)], 1)
    pos, seen = [], []
    for s in range(n_sub):
        zz, yy, xx = np.meshgrid(np.arange(s, s + 2), np.arange(gy), np.arange(gx), indexing="ij")
        pos.append(np.stack([np.full(zz.size, s), zz.ravel(), yy.ravel(), xx.ravel()], 1))
        seen.append(np.r_[np.full(gy * gx, s > 0), np.zeros(gy * gx, bool)])
    positions = torch.tensor(np.concatenate(pos), dtype=torch.float32)[None].expand(batch, -1, -1)
    return tokens, positions, torch.from_numpy(np.concatenate(seen))


def main(argv: list[str] | None = None) -> dict:
    from voxseq.models.vit3d import ARViT3D, ViTConfig
    from voxseq.objectives.ar import norm_pixel_target, prefix_loss_mask, sample_prefix_len

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="sequences a step")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--depth", type=int, default=2, help="transformer blocks (embed 192, 3 heads)")
    ap.add_argument("--every", type=int, default=100, help="evaluate every this many steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = ARViT3D(ViTConfig(patch_size=4, in_chans=1, embed_dim=192, depth=args.depth, num_heads=3))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    test = copy_batch(np.random.default_rng(args.seed + 1), 64)
    result: dict = {"steps": args.steps, "sequences": args.steps * args.batch, "learned_at": None}
    for step in range(1, args.steps + 1):
        model.train()
        tokens, pos, _ = copy_batch(rng, args.batch)
        prefix = sample_prefix_len(args.batch, tokens.shape[1])
        mask = prefix_loss_mask(prefix, tokens.shape[1])
        per_token = (model(tokens, pos, prefix) - norm_pixel_target(tokens)).pow(2).mean(-1)
        loss = (per_token * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            model.eval()
            tokens, pos, seen = test
            k = tokens.shape[1] // 4  # the first of the 4 slabs is the prefix: every later token is predicted
            with torch.no_grad():
                err = (model(tokens, pos, torch.full((len(tokens),), k)) - norm_pixel_target(tokens)).pow(2).mean(-1)
            later = torch.arange(tokens.shape[1]) >= k
            result.update(seen=float(err[:, seen & later].mean()), new=float(err[:, ~seen & later].mean()))
            if result["learned_at"] is None and result["seen"] < 0.5:
                result["learned_at"] = step
            print(f"step {step}  seen {result['seen']:.3f}  new {result['new']:.3f}", flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
