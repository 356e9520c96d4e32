"""A reference learner for a segmentation config: can a plain 3D CNN learn its classes from its labels?

When no encoder learns a class in a fine-tuning budget, this tells a budget that is too small for UNETR
from labels that cannot teach the class at all. It trains MONAI's UNet on the same prepared cache, crops,
crop sampling, label map and DiceCE loss as `voxseq finetune seg`, then scores the same evaluation volumes
with the same Dice (voxseq.eval.segmentation). docs/reproducing.md ("Why no model learns the liver and
kidneys here") gives its figures on the v2 phantoms.

    voxseq experiment compare --config configs/seg_phantom_v2.yaml --ar runs/ar_tiny --out runs/cmp ...
    python examples/cnn_reference.py --config configs/seg_phantom_v2.yaml --cache runs/cmp/cache \
        --steps 3000 crop_sampling=class_balanced

Pass the same overrides as the fine-tuning it stands beside (``seed=S label_ratio=R`` pick the same split and
labelled subset; ``data.phantoms.seed`` is only recorded). It is a plain reference, not a replica of the
fine-tuning recipe: AdamW with a one-cycle schedule over every parameter, no gradient clipping, no layer decay.
The last line printed is JSON: mean Dice, Dice per class, steps and seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from voxseq.eval.segmentation import evaluate_segmentation
    from voxseq.tasks.data import open_cache
    from voxseq.tasks.finetune_seg import crop_batch, load_seg_config, seg_cases

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="segmentation config (classes, crops, label map, splits)")
    ap.add_argument("--cache", required=True, help="the prepared cache the fine-tunings read (RUN_DIR/cache)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--channels", default="16,32,64,128", help="UNet channels per level")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (lr, batch_size, crop_sampling, ...)")
    args = ap.parse_args(argv)

    cfg = load_seg_config(args.config, args.overrides)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    cache = open_cache(Path(args.cache), None, cfg.data.label_map)
    train, evaluate = seg_cases(cache, cfg)  # the fine-tuning's labelled subset and evaluation volumes
    channels = tuple(int(c) for c in args.channels.split(","))
    net = UNet(3, cache.entry(train[0]).get("channels", 1), cfg.unetr.out_channels, channels=channels,
               strides=(2,) * (len(channels) - 1), num_res_units=1)
    opt = torch.optim.AdamW(net.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=args.steps,
                                                pct_start=min(0.3, cfg.warmup_steps / args.steps))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=cfg.dice_batch, include_background=cfg.dice_background)
    start = time.perf_counter()
    for step in range(args.steps):
        x, y, _ = crop_batch(cache, train, cfg, rng)
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    result = evaluate_segmentation(net, cache, evaluate, cfg.roi_zyx, cfg.overlap, cfg.unetr.out_channels)
    out = {"mean_dice": result["mean_dice"], "dice_per_class": result["dice_per_class"], "steps": args.steps,
           "n_train": len(train), "n_eval": len(evaluate), "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
