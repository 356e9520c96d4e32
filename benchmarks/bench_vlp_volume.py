"""Whole-volume SigVLP embedding: time and peak memory of one CT of a real size on this machine.

A synthetic 512 x 512 x 300 CT (0.7 x 0.7 x 1.0 mm, ``--quick``: 256 x 256 x 150) goes through the
preprocessing of ``configs/vlp_tiny_ctrate.yaml`` (three HU windows, 4 x 4 x 3 mm) and the tiny rotary vision
tower (random weights: time and memory do not depend on them), three ways, each in its own process so each
peak resident memory is its own:

* ``fused``: the whole volume as one token sequence, attention without a mask (``SigVLP.encode_rows``), so
  SDPA takes its fused kernel (flash attention on CPU and CUDA: memory linear in the sequence length);
* ``masked``: the same sequence with the packed-row boolean mask the training path builds (an L x L mask:
  the kernel computes every score), the cost the fused path avoids;
* ``tiles``: the volume as tiles of the training chunk overlapping by half (``--aggregate organ``).

Reported: tokens, seconds and peak RSS (MiB) of each, the cosine between the fused and masked volume
embeddings (equal up to float error), and the preprocessing time. Usage:
``python benchmarks/bench_vlp_volume.py [--quick]``; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "vlp_tiny_ctrate.yaml"


def volume(quick: bool):
    from voxseq.io.volume import Volume

    shape_zyx = (150, 256, 256) if quick else (300, 512, 512)
    spacing = (1.4, 1.4, 2.0) if quick else (0.7, 0.7, 1.0)  # the same 358 x 358 x 300 mm body either way
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:shape_zyx[0], :shape_zyx[1], :shape_zyx[2]]
    body = ((y - shape_zyx[1] / 2) / (0.4 * shape_zyx[1])) ** 2 + ((x - shape_zyx[2] / 2) / (0.45 * shape_zyx[2])) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0).astype(np.float32) + rng.normal(0, 20, shape_zyx).astype(np.float32)
    return Volume(hu.astype(np.int16), spacing, (0.0, 0.0, 0.0))


def part(name: str, quick: bool) -> dict:
    import torch

    from voxseq.data.preprocess import preprocess
    from voxseq.eval.zero_shot import embed_items
    from voxseq.models.vit3d import packed_attention_mask
    from voxseq.models.vlp import SigVLP
    from voxseq.sequence.chunks import collate_packed, volume_chunks
    from voxseq.tasks.pretrain_vlp import load_vlp_config

    torch.manual_seed(0)
    cfg = load_vlp_config(CONFIG)
    model = SigVLP(cfg.model).eval()
    t0 = time.perf_counter()
    vol, _ = preprocess(volume(quick), None, cfg.data.preprocess)
    image = vol.array if vol.array.ndim == 4 else vol.array[None]
    prep_s = time.perf_counter() - t0
    p = cfg.model.vision.patch_size
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with torch.no_grad():
        if name == "tiles":
            items = volume_chunks(image, p, cfg.chunks.max_slices, cfg.chunks.pad_value, cfg.chunks.crop_yx, z_overlap=True)
            emb = embed_items(model, items)
            tokens = sum(int(it["tokens"].shape[0]) for it in items)
        else:
            whole = volume_chunks(image, p, None, cfg.chunks.pad_value)[0]
            tokens = int(whole["tokens"].shape[0])
            if name == "fused":
                emb = model.encode_rows(whole["tokens"][None], whole["pos"][None]).numpy()
            else:
                b = collate_packed([whole], max_tokens=tokens)
                feats = model.encoder.forward_tokens(b["tokens"], b["pos"], mask=packed_attention_mask(b["segment"]))
                emb = torch.nn.functional.normalize(model.vision_proj(model.pool(feats, b["segment"], 1)), dim=-1).numpy()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": tokens, "seconds": round(seconds, 2), "peak_rss_mib": round(peak), "rss_before_mib": round(before),
            "preprocess_s": round(prep_s, 2), "shape_czyx": list(image.shape), "embedding": emb[0].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 256 x 256 x 150 CT instead of 512 x 512 x 300")
    ap.add_argument("--part", choices=("fused", "masked", "tiles"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print(json.dumps(part(args.part, args.quick)))
        return
    out: dict = {"ct_zyx": [150, 256, 256] if args.quick else [300, 512, 512], "config": str(CONFIG.relative_to(ROOT))}
    for name in ("fused", "masked", "tiles"):
        cmd = [sys.executable, __file__, "--part", name] + (["--quick"] if args.quick else [])
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            out[name] = {"error": (run.stderr.strip().splitlines() or ["failed"])[-1]}
            continue
        out[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{name:7s} {out[name]['tokens']:6d} tokens  {out[name]['seconds']:7.2f} s  peak RSS {out[name]['peak_rss_mib']} MiB")
    if "embedding" in out.get("fused", {}) and "embedding" in out.get("masked", {}):
        a, b = np.array(out["fused"]["embedding"]), np.array(out["masked"]["embedding"])
        out["fused_vs_masked_cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    for name in ("fused", "masked", "tiles"):
        out.get(name, {}).pop("embedding", None)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
