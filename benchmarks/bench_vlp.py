"""SigVLP vision-tower throughput: packed versus padded chunk batches, and rotary versus sin-cos positions.

Measures, in one run (fp32, forward + backward of the tiny ViT3D through ``forward_tokens``):
  * a realistic mix of SigVLP chunks (drawn by ``ChunkTextDataset`` from a small CT phantom cache:
    2..8 slabs of 8 slices, in-plane grids of 11x11..13x13 tokens, patch 8) batched two ways:
    padded, every chunk padded to the longest one, (N, Lmax) with a key-padding mask; and packed by
    ``collate_packed`` into rows with the block-diagonal ``packed_attention_mask``, for several
    ``max_tokens`` (the longest chunk rounded up, 2x and 4x that, and the training default 4096).
    Reported: real (non-padding) tokens/s of each, padding waste of each layout, and packed / padded.
    On CPU, SDPA with a boolean mask computes all L x L scores of a row, so a long packed row pays for
    the masked blocks between its chunks: the longer the rows, the more of the attention is wasted. The
    same rows attended within each chunk only (``forward_tokens(segment=...)``, segment attention: what
    SigVLP trains with) pay for none of them. The JSON headline (``packed_speedup_vs_padded``,
    ``padding_waste``) is segment attention's fastest setting with at most 5% waste; ``masked_packing``
    keeps the masked rows' figures;
  * rotary (``pos_embed="rope3d"``) versus sin-cos positions, same weights and inputs (4 chunks of
    4x12x12 tokens, no padding, no mask): rope time / sin-cos time.

Variants being compared are timed round-robin (one step of each per repeat) after a warm-up, and the
median of the repeats is reported, so load from other processes hits them alike. ``--quick`` runs one layer:
per-forward costs (building the L x L masks, the rotary angles) then weigh several times more than in the
6-layer preset, so its ratios are a smoke test, not the figures to quote.

Usage: python benchmarks/bench_vlp.py [--quick]. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

PATCH = 8
TRAIN_DEFAULT_MAX_TOKENS = 4096  # PretrainVLPConfig.max_tokens


def phantom_chunks(n: int) -> list[dict]:
    """``n`` chunk items from a 4-volume CT phantom cache, as SigVLP pretraining draws them."""
    from voxseq.data.cache import Cache, prepare_cache
    from voxseq.data.manifest import read_manifest
    from voxseq.data.phantoms import write_phantoms
    from voxseq.data.preprocess import Preprocess
    from voxseq.sequence.chunks import ChunkConfig, ChunkTextDataset

    with tempfile.TemporaryDirectory() as d:
        manifest = write_phantoms(Path(d) / "phantoms", n_ct=4, n_mri=0, size_xy=96, max_slices=96, progress=False)
        pre = Preprocess(intensity="window", hu_range=[-175, 250], out_range=[-1, 1], spacing_xyz=[4, 4, 3])
        prepare_cache(read_manifest(manifest), Path(d) / "cache", pre, workers=1, progress=False)
        data = ChunkTextDataset(Cache(Path(d) / "cache"), ChunkConfig(patch_size=PATCH, min_slices=16, max_slices=64, pad_value=-1))
        return [{k: data[i][k] for k in ("tokens", "pos", "grid")} for i in range(n)]


def padded_batch(items: list[dict]) -> dict:
    """Every chunk padded to the longest: tokens (N, Lmax, P^3), pos (N, Lmax, 3), real (N, Lmax) bool."""
    lengths = [it["tokens"].shape[0] for it in items]
    n, lmax = len(items), max(lengths)
    tokens = torch.zeros(n, lmax, items[0]["tokens"].shape[1])
    pos = torch.zeros(n, lmax, 3)
    real = torch.zeros(n, lmax, dtype=torch.bool)
    for i, (it, m) in enumerate(zip(items, lengths)):
        tokens[i, :m], pos[i, :m], real[i, :m] = it["tokens"], it["pos"], True
    return {"tokens": tokens, "pos": pos, "real": real}


def train_step(model, tokens: torch.Tensor, pos: torch.Tensor, make_mask: Callable[[], torch.Tensor | None],
               real: torch.Tensor, segment: torch.Tensor | None = None) -> Callable[[], None]:
    """Forward + backward of a mean-square loss over the real tokens' features (the mask is built in the step;
    with ``segment``, attention runs within each segment instead, as ``SigVLP.encode_chunks`` does)."""
    def step() -> None:
        feats = model.forward_tokens(tokens, pos, mask=make_mask(), segment=segment)  # (R, L, E)
        feats[real].pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
    return step


def time_round_robin(steps: dict[str, Callable[[], None]], repeats: int, warmup_all: bool = True) -> dict[str, float]:
    """Median seconds per step of each variant over ``repeats`` rounds of one step each, after a warm-up step of
    every variant (or, for expensive ones, of the first only: it warms the thread pool and allocator, and CPU
    kernels need no per-shape compilation)."""
    for step in steps.values() if warmup_all else [next(iter(steps.values()))]:
        step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_packing(items: list[dict], depth: int, repeats: int) -> dict:
    from voxseq.models.vit3d import ViT3D, key_padding_mask, vit_config
    from voxseq.models.vit3d import packed_attention_mask
    from voxseq.sequence.chunks import collate_packed, padding_waste

    torch.manual_seed(0)
    model = ViT3D(vit_config("tiny", patch_size=PATCH, pos_embed="rope3d", depth=depth))
    lengths = [it["tokens"].shape[0] for it in items]
    n_real = sum(lengths)
    pad = padded_batch(items)
    steps = {"padded": train_step(model, pad["tokens"], pad["pos"], lambda: key_padding_mask(pad["real"]), pad["real"])}
    layouts = {"padded": {"rows": len(items), "row_len": pad["real"].shape[1],
                          "waste": 1 - n_real / pad["real"].numel()}}
    longest = -(-max(lengths) // 64) * 64
    settings = sorted({longest, 2 * longest, 4 * longest, TRAIN_DEFAULT_MAX_TOKENS})
    for cap in settings:
        b = collate_packed(items, cap)
        seg = b["segment"]
        steps[f"packed_{cap}"] = train_step(model, b["tokens"], b["pos"], lambda seg=seg: packed_attention_mask(seg), seg >= 0)
        layouts[f"packed_{cap}"] = {"rows": seg.shape[0], "row_len": seg.shape[1], "waste": padding_waste(seg)}
        # the same rows, attending within each segment only (forward_tokens(segment=...)): no L x L scores
        steps[f"segments_{cap}"] = train_step(model, b["tokens"], b["pos"], lambda: None, seg >= 0, segment=seg)
        layouts[f"segments_{cap}"] = {**layouts[f"packed_{cap}"]}
    seconds = time_round_robin(steps, repeats, warmup_all=False)
    for k, lay in layouts.items():
        lay["seconds"] = seconds[k]
        lay["real_tokens_per_s"] = n_real / seconds[k]
        # attention work relative to the real chunks' own L^2: what the masked blocks of long rows cost
        lay["attn_scores_vs_needed"] = (1.0 if k.startswith("segments_") else  # within-bucket padding aside
                                        lay["rows"] * lay["row_len"] ** 2 / sum(m * m for m in lengths))
    return {"lengths": lengths, "settings": settings, "longest_rounded": longest, "layouts": layouts}


def bench_rope(depth: int, repeats: int, n_chunks: int = 4, grid=(4, 12, 12)) -> dict:
    """rope3d versus sin-cos: same weights, same tokens and positions, no padding and no mask."""
    from voxseq.models.vit3d import ViT3D, vit_config
    from voxseq.sequence.patches import patch_grid_coords

    torch.manual_seed(0)
    sincos = ViT3D(vit_config("tiny", patch_size=PATCH, pos_embed="sincos", depth=depth))
    rope = ViT3D(vit_config("tiny", patch_size=PATCH, pos_embed="rope3d", depth=depth))
    rope.load_state_dict(sincos.state_dict())
    length = grid[0] * grid[1] * grid[2]
    tokens = torch.randn(n_chunks, length, PATCH**3)
    zyx = torch.from_numpy(patch_grid_coords(grid)).float()  # (L, 3)
    pos = torch.cat([torch.zeros(length, 1), zyx], -1).expand(n_chunks, -1, -1)  # (B, L, 4): sub-volume 0
    real = torch.ones(n_chunks, length, dtype=torch.bool)
    steps = {name: train_step(m, tokens, pos, lambda: None, real) for name, m in (("sincos", sincos), ("rope3d", rope))}
    seconds = time_round_robin(steps, repeats)
    return {"batch": [n_chunks, length], **{f"{k}_tokens_per_s": n_chunks * length / s for k, s in seconds.items()},
            "rope_vs_sincos_time_ratio": seconds["rope3d"] / seconds["sincos"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 chunks, 1 layer, 2 timed repeats (about a minute)")
    args = ap.parse_args()
    n_chunks, depth, repeats = (12, 1, 2) if args.quick else (16, 6, 3)
    items = phantom_chunks(n_chunks)
    pk = bench_packing(items, depth, repeats)
    lay = pk["layouts"]
    padded = lay["padded"]
    packed = {k: v for k, v in lay.items() if k.startswith("packed_")}
    seg_layouts = {k: v for k, v in lay.items() if k.startswith("segments_")}
    best = max(packed, key=lambda k: packed[k]["real_tokens_per_s"])
    # segment attention: the headline is the fastest setting whose waste meets the 5% goal (else the fastest)
    low = {k: v for k, v in seg_layouts.items() if v["waste"] <= 0.05} or seg_layouts
    seg_best = max(low, key=lambda k: low[k]["real_tokens_per_s"])
    ls = pk["lengths"]
    print(f"tiny rotary ViT3D ({depth} layers, width 192, 3 heads), patch {PATCH}, fp32, forward+backward, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print(f"mix: {len(ls)} phantom CT chunks, {min(ls)}..{max(ls)} tokens (mean {sum(ls) / len(ls):.0f}), {sum(ls)} real tokens")
    print(f"{'layout':14s} {'rows x len':>12s} {'waste':>6s} {'attn/needed':>11s} {'real tok/s':>10s} {'vs padded':>9s}")
    for k, v in lay.items():
        print(f"{k:14s} {v['rows']:4d} x {v['row_len']:5d} {v['waste']:6.1%} {v['attn_scores_vs_needed']:10.1f}x "
              f"{v['real_tokens_per_s']:10.0f} {v['real_tokens_per_s'] / padded['real_tokens_per_s']:8.2f}x")
    for k, v in packed.items():
        if v["real_tokens_per_s"] < padded["real_tokens_per_s"]:
            print(f"note: {k} is SLOWER than padding ({v['real_tokens_per_s'] / padded['real_tokens_per_s']:.2f}x): "
                  f"its rows compute {v['attn_scores_vs_needed']:.1f}x the attention scores the chunks need")
    cap = int(best.split("_")[1])
    print(f"masked packing: {best} (max_tokens={cap}, {cap / pk['longest_rounded']:.1f}x the longest chunk rounded up) "
          f"is its fastest setting; with the L x L mask, long rows pay for the scores between their chunks")

    sb = seg_layouts[seg_best]
    print(f"headline, segment attention (what SigVLP trains with): {seg_best} (waste {sb['waste']:.1%}) at "
          f"{sb['real_tokens_per_s'] / padded['real_tokens_per_s']:.2f}x padded, the fastest setting with at most 5% waste")

    rp = bench_rope(depth, repeats + 2)  # cheap: a few more repeats
    print(f"rope3d vs sincos on {rp['batch'][0]} x {rp['batch'][1]} tokens: {rp['rope3d_tokens_per_s']:.0f} vs "
          f"{rp['sincos_tokens_per_s']:.0f} tokens/s, time ratio {rp['rope_vs_sincos_time_ratio']:.3f}")

    masked_per = {str(int(k.split("_")[1])): {
        "speedup_vs_padded": round(v["real_tokens_per_s"] / padded["real_tokens_per_s"], 3),
        "real_tokens_per_s": round(v["real_tokens_per_s"], 1), "padding_waste": round(v["waste"], 4),
        "rows": v["rows"], "row_len": v["row_len"], "attn_scores_vs_needed": round(v["attn_scores_vs_needed"], 2)}
        for k, v in packed.items()}
    print(json.dumps({
        # the headline is the packing SigVLP trains with: rows attended within each chunk (segment attention)
        "packed_speedup_vs_padded": round(sb["real_tokens_per_s"] / padded["real_tokens_per_s"], 3),
        "padding_waste": round(sb["waste"], 4),
        "padded_waste": round(padded["waste"], 4),
        "headline_max_tokens": int(seg_best.split("_")[1]),
        "packed_real_tokens_per_s": round(sb["real_tokens_per_s"], 1),
        "padded_real_tokens_per_s": round(padded["real_tokens_per_s"], 1),
        "per_max_tokens": {str(int(k.split("_")[1])): {
            "speedup_vs_padded": round(v["real_tokens_per_s"] / padded["real_tokens_per_s"], 3),
            "speedup_vs_masked": round(v["real_tokens_per_s"] / lay["packed_" + k.split("_")[1]]["real_tokens_per_s"], 3),
            "real_tokens_per_s": round(v["real_tokens_per_s"], 1), "padding_waste": round(v["waste"], 4)}
            for k, v in seg_layouts.items()},
        "masked_packing": {  # the same rows with the block-diagonal L x L mask (before segment attention)
            "headline_max_tokens": cap,
            "packed_speedup_vs_padded": round(packed[best]["real_tokens_per_s"] / padded["real_tokens_per_s"], 3),
            "padding_waste": round(packed[best]["waste"], 4), "per_max_tokens": masked_per},
        "rope_vs_sincos_time_ratio": round(rp["rope_vs_sincos_time_ratio"], 3),
        "rope_tokens_per_s": round(rp["rope3d_tokens_per_s"], 1),
        "sincos_tokens_per_s": round(rp["sincos_tokens_per_s"], 1),
        "n_chunks": len(ls),
        "real_tokens": sum(ls),
        "depth": depth,
        "repeats": repeats,
        "quick": args.quick,
    }))


if __name__ == "__main__":
    main()
