"""The GPU check: bf16 MFU of ViT-B, flex prefix-causal attention, packed ViT-L chunks and both pretraining CLIs.

One script for the day a CUDA GPU (H100 / H200) is at hand, at most about 8 minutes. Each part runs in its own
subprocess with a time limit, so a crash, a compile failure or an out-of-memory error in one part is recorded
in the JSON and the others still run:

  * ``mfu_vit_b``: the AR reference preset (``vit_config("base")``, patch 16, 4 x 32x128x128 slabs = 512
    tokens, prefix-causal attention with a random start, normalised-pixel loss, AdamW) in bf16 autocast:
    training MFU against the assumed dense bf16 peak, with SDPA and the dense (B, 1, L, L) mask, with the
    flex prefix-causal path (``attn_backend="flex"``) as the model runs it, and with flex under
    ``torch.compile`` (flex attention is only fast compiled); the ratio flex / SDPA. Whether flex ran (its
    calls are counted) or fell back to SDPA is recorded;
  * ``vlp_vit_l``: the SigVLP vision tower at ViT-L width and depth (rotary positions, patch 8 on phantom CT
    chunks as in ``bench_vlp.py``), bf16: padded versus packed chunk batches, real tokens/s and padding waste;
  * ``cli_ar`` / ``cli_vlp``: 50 ``voxseq pretrain ar`` and 20 ``voxseq pretrain vlp`` steps through the real
    CLI on phantoms (small configs, ``data.loader_workers`` DataLoader workers): samples/s consumed by the
    training steps (``metrics.jsonl`` step times), delivered by the DataLoader alone on the same cache, end to
    end over the run, and whether the run used CUDA.

Peak GPU memory (``torch.cuda.max_memory_allocated``) is reported per in-process part. Without CUDA the
script prints one JSON line saying so (``"cuda": false``) and exits 0.

Usage: python benchmarks/bench_gpu.py [--quick]. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEAK_BF16_TFLOPS = 989.0  # H100 / H200 SXM dense bf16 (no sparsity)
BUDGET_S = 470.0  # all parts together: the script stays under 8 minutes
PART_LIMITS_S = {"mfu_vit_b": 200, "vlp_vit_l": 90, "cli_ar": 120, "cli_vlp": 100}


def sync():
    import torch

    torch.cuda.synchronize()


def timed(step, steps: int, warmup: int = 2) -> float:
    """Median seconds per step (CUDA-synchronised) after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------- ViT-B MFU, SDPA vs flex


def part_mfu_vit_b(quick: bool) -> dict:
    import torch

    import voxseq.models.vit3d as vit3d
    from voxseq.models.vit3d import ARViT3D, flops_per_token, vit_config
    from voxseq.objectives import norm_pixel_loss, prefix_loss_mask, sample_prefix_len

    batch, steps = (8, 3) if quick else (32, 10)
    seq_len, patch = 512, 16
    dev = torch.device("cuda")
    calls = {"flex": 0}
    original = vit3d._flex_prefix_attention

    def counted(*a, **k):
        calls["flex"] += 1
        return original(*a, **k)

    vit3d._flex_prefix_attention = counted
    torch.manual_seed(0)
    tokens = torch.randn(batch, seq_len, patch**3, device=dev)
    grid = (16, 8, 8)  # 4 slabs of 2 x 8 x 8 tokens, as the reference sub-volume order: (slab, z, y, x)
    zz, yy, xx = torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")
    pos = torch.stack([zz // 2, zz % 2, yy, xx], -1).reshape(1, -1, 4).float().expand(batch, -1, -1).to(dev)
    g = torch.Generator().manual_seed(0)
    out: dict = {"batch": batch, "seq_len": seq_len, "peak_tflops_assumed": PEAK_BF16_TFLOPS}
    variants = [("sdpa", "sdpa", False), ("flex", "flex", False), ("flex_compiled", "flex", True)]
    if quick:
        variants = variants[:2]
    for name, backend, compiled in variants:
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            cfg = vit_config("base", patch_size=patch, attn_backend=backend)
            model = ARViT3D(cfg).to(dev)
            net = torch.compile(model) if compiled else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            calls["flex"] = 0

            def step():
                prefix = sample_prefix_len(batch, seq_len, g).clamp_min(1).to(dev)  # never all 0: always the mask
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = norm_pixel_loss(net(tokens, pos, prefix), tokens, prefix_loss_mask(prefix, seq_len))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            t0 = time.perf_counter()
            sec = timed(step, steps, warmup=3 if compiled else 2)
            tok_s = batch * seq_len / sec
            mfu = tok_s * flops_per_token(cfg, seq_len + 1) / (PEAK_BF16_TFLOPS * 1e12)
            out[name] = {"ok": True, "step_s": round(sec, 4), "tokens_per_s": round(tok_s, 1), "mfu": round(mfu, 4),
                         "flex_calls": calls["flex"], "ran_flex": calls["flex"] > 0,
                         "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                         "wall_s": round(time.perf_counter() - t0, 1)}
            del model, net, opt
        except Exception as e:  # noqa: BLE001 - recorded, the next variant still runs
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    if out.get("sdpa", {}).get("ok"):
        for name in ("flex", "flex_compiled"):
            if out.get(name, {}).get("ok"):
                out[f"{name}_vs_sdpa"] = round(out["sdpa"]["step_s"] / out[name]["step_s"], 3)
    return out


# ---------------------------------------------------------------------------- ViT-L rotary, packed vs padded


def part_vlp_vit_l(quick: bool) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import bench_vlp  # the phantom chunk mix and the padded layout of the CPU benchmark

    from voxseq.models.vit3d import ViT3D, key_padding_mask, vit_config
    from voxseq.models.vit3d import packed_attention_mask
    from voxseq.sequence.chunks import collate_packed, padding_waste

    n_chunks, depth, steps = (8, 4, 2) if quick else (32, 24, 5)
    dev = torch.device("cuda")
    items = bench_vlp.phantom_chunks(n_chunks)
    lengths = [it["tokens"].shape[0] for it in items]
    n_real = sum(lengths)
    torch.manual_seed(0)
    model = ViT3D(vit_config("large", patch_size=bench_vlp.PATCH, pos_embed="rope3d", depth=depth)).to(dev)

    def make_step(tokens, pos, make_mask, real, segment=None):
        tokens, pos, real = tokens.to(dev), pos.to(dev), real.to(dev)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = model.forward_tokens(tokens, pos, mask=make_mask(), segment=segment)
            feats[real].float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
        return step

    pad = bench_vlp.padded_batch(items)
    real_pad = pad["real"].to(dev)
    layouts = {"padded": (make_step(pad["tokens"], pad["pos"], lambda: key_padding_mask(real_pad), pad["real"]),
                          1 - n_real / pad["real"].numel())}
    longest = -(-max(lengths) // 64) * 64
    for cap in sorted({longest, 2 * longest, 4096}):
        b = collate_packed(items, cap)
        seg = b["segment"].to(dev)
        layouts[f"packed_{cap}"] = (make_step(b["tokens"], b["pos"], lambda seg=seg: packed_attention_mask(seg), seg >= 0),
                                    padding_waste(b["segment"]))
        layouts[f"segments_{cap}"] = (make_step(b["tokens"], b["pos"], lambda: None, seg >= 0, segment=seg),
                                      padding_waste(b["segment"]))  # attention within each segment only
    torch.cuda.reset_peak_memory_stats()
    res = {}
    for k, (step, waste) in layouts.items():
        sec = timed(step, steps)
        res[k] = {"real_tokens_per_s": round(n_real / sec, 1), "padding_waste": round(waste, 4)}
    best = max((k for k in res if k != "padded"), key=lambda k: res[k]["real_tokens_per_s"])
    seg_best = max((k for k in res if k.startswith("segments_")), key=lambda k: res[k]["real_tokens_per_s"])
    return {"depth": depth, "width": 1024, "n_chunks": n_chunks, "real_tokens": n_real, "layouts": res,
            "best_packed": best,
            "packed_speedup_vs_padded": round(res[best]["real_tokens_per_s"] / res["padded"]["real_tokens_per_s"], 3),
            "best_segments": seg_best,
            "segments_speedup_vs_padded": round(res[seg_best]["real_tokens_per_s"] / res["padded"]["real_tokens_per_s"], 3),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


# ---------------------------------------------------------------------------- the CLIs


CLI_RUNS = {
    "ar": dict(config="configs/ar_tiny.yaml", steps=50, overrides=[
        "data.phantoms.n_ct=6", "data.phantoms.n_mri=2", "data.samples=false", "batch_size=16",
        "data.loader_workers=4", "data.workers=8", "checkpoint_every=1000"]),
    "vlp": dict(config="configs/vlp_tiny.yaml", steps=20, overrides=[
        "data.phantoms.n_ct=6", "chunks_per_batch=16", "data.loader_workers=4", "data.workers=8", "checkpoint_every=1000"]),
}


def delivered_per_s(kind: str, cfg, run_dir: Path, batches: int) -> float:
    """Samples/s the DataLoader alone delivers on the run's cache, with the run's workers."""
    import functools

    import torch

    from voxseq.tasks.data import open_cache

    source = open_cache(run_dir / "cache", cfg.data.split)
    if kind == "ar":
        from voxseq.sequence import ResumableSampler, SequenceDataset, collate_sequences

        ds = SequenceDataset(source, cfg.sequence)
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, sampler=ResumableSampler(),
                                             num_workers=cfg.data.loader_workers, collate_fn=collate_sequences)
        per_batch = cfg.batch_size
    else:
        from voxseq.sequence.chunks import ChunkBatchSampler, ChunkTextDataset, collate_packed

        ds = ChunkTextDataset(source, cfg.chunks)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=ChunkBatchSampler(cfg.chunks_per_batch, num_steps=batches + 2),
                                             num_workers=cfg.data.loader_workers,
                                             collate_fn=functools.partial(collate_packed, max_tokens=cfg.max_tokens))
        per_batch = cfg.chunks_per_batch
    it = iter(loader)
    next(it)  # workers started
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * per_batch / (time.perf_counter() - t)


def part_cli(kind: str, quick: bool) -> dict:
    spec = CLI_RUNS[kind]
    steps = 5 if quick else spec["steps"]
    overrides = [*spec["overrides"], f"max_steps={steps}", "warmup_steps=2", "log_every=1"]
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / kind
        cmd = [sys.executable, "-m", "voxseq.cli", "pretrain", kind, "--config", str(REPO / spec["config"]),
               "--out", str(run_dir), *overrides]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            return {"ok": False, "rc": r.returncode, "error": (r.stderr or r.stdout)[-600:]}
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [row for row in rows if "step_time_s" in row]
        timed_rows = rows[2:] or rows  # the first steps warm up kernels and workers
        if kind == "ar":
            from voxseq.tasks.pretrain_ar import load_ar_config as load
        else:
            from voxseq.tasks.pretrain_vlp import load_vlp_config as load
        cfg = load(REPO / spec["config"], overrides)
        per_step = cfg.batch_size if kind == "ar" else cfg.chunks_per_batch
        consumed = per_step / statistics.median(row["step_time_s"] for row in timed_rows)
        delivered = delivered_per_s(kind, cfg, run_dir, 10 if not quick else 3)
        import torch

        return {"ok": True, "steps": len(rows), "cli_wall_s": round(wall, 1), "loader_workers": cfg.data.loader_workers,
                "samples_per_step": per_step, "consumed_samples_per_s": round(consumed, 2),
                "delivered_samples_per_s": round(delivered, 2),
                "delivered_vs_consumed": round(delivered / consumed, 3),
                "device": cfg.device, "ran_cuda": cfg.device in ("auto", "cuda") and torch.cuda.is_available(),
                "median_model_tflops": _median_of(timed_rows, "model_tflops"),
                "last_loss": rows[-1].get("loss") if rows else None, "stdout_tail": r.stdout.strip().splitlines()[-1:]}


def _median_of(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if key in row]
    return round(statistics.median(values), 3) if values else None


# ---------------------------------------------------------------------------- driver


PARTS = {"mfu_vit_b": part_mfu_vit_b, "vlp_vit_l": part_vlp_vit_l,
         "cli_ar": lambda q: part_cli("ar", q), "cli_vlp": lambda q: part_cli("vlp", q)}


def run_part(name: str, quick: bool, limit: float) -> dict:
    cmd = [sys.executable, __file__, "--part", name] + (["--quick"] if quick else [])
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {limit:.0f} s"}
    lines = r.stdout.strip().splitlines()
    try:
        res = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "rc": r.returncode, "error": (r.stderr or r.stdout)[-600:]}
    res.setdefault("ok", r.returncode == 0)
    res["part_wall_s"] = round(time.perf_counter() - t, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and layers (a smoke test of every part)")
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        try:
            print(json.dumps(PARTS[args.part](args.quick)))
        except Exception as e:  # noqa: BLE001 - the driver records it
            print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {str(e)[:600]}"}))
        return

    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "torch": torch.__version__,
                          "message": "no CUDA device: bench_gpu.py measures nothing here (run it on an H100/H200)"}))
        return
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    print(f"{name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"MFU against an assumed {PEAK_BF16_TFLOPS:.0f} TFLOP/s dense bf16 peak")
    t0 = time.perf_counter()
    parts = {}
    for part, limit in PART_LIMITS_S.items():
        left = BUDGET_S - (time.perf_counter() - t0)
        if left < 20:
            parts[part] = {"ok": False, "error": "skipped: the time budget is spent"}
            continue
        parts[part] = run_part(part, args.quick, min(limit, left))
        print(f"{part}: {json.dumps(parts[part])[:400]}")
    mfu = parts["mfu_vit_b"]
    cuda_paths = {
        "sdpa_bf16": bool(mfu.get("sdpa", {}).get("ok")),
        "flex_prefix_causal": bool(mfu.get("flex", {}).get("ran_flex")),
        "flex_compiled": bool(mfu.get("flex_compiled", {}).get("ran_flex")),
        "packed_rotary_bf16": bool(parts["vlp_vit_l"].get("ok", False) and "layouts" in parts["vlp_vit_l"]),
        "cli_ar_cuda": bool(parts["cli_ar"].get("ran_cuda")),
        "cli_vlp_cuda": bool(parts["cli_vlp"].get("ran_cuda")),
    }
    peaks = [v.get("peak_mem_gb", 0) for v in [*mfu.values(), parts["vlp_vit_l"]] if isinstance(v, dict)]
    print(json.dumps({
        "cuda": True, "device_name": name, "peak_bf16_tflops_assumed": PEAK_BF16_TFLOPS,
        "mfu_bf16_vit_b_L512_sdpa": mfu.get("sdpa", {}).get("mfu"),
        "mfu_bf16_vit_b_L512_flex": mfu.get("flex", {}).get("mfu"),
        "mfu_bf16_vit_b_L512_flex_compiled": mfu.get("flex_compiled", {}).get("mfu"),
        "flex_vs_sdpa": mfu.get("flex_vs_sdpa"), "flex_compiled_vs_sdpa": mfu.get("flex_compiled_vs_sdpa"),
        "vit_l_packed_speedup_vs_padded": parts["vlp_vit_l"].get("packed_speedup_vs_padded"),
        "ar_consumed_samples_per_s": parts["cli_ar"].get("consumed_samples_per_s"),
        "ar_delivered_samples_per_s": parts["cli_ar"].get("delivered_samples_per_s"),
        "vlp_consumed_samples_per_s": parts["cli_vlp"].get("consumed_samples_per_s"),
        "vlp_delivered_samples_per_s": parts["cli_vlp"].get("delivered_samples_per_s"),
        "peak_gpu_mem_gb": max(peaks) if peaks else None,
        "cuda_paths": cuda_paths,
        "errors": {k: v["error"] for k, v in parts.items() if isinstance(v, dict) and v.get("error")},
        "parts": parts, "wall_s": round(time.perf_counter() - t0, 1), "quick": args.quick,
    }))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
