"""Training throughput and memory of the voxseq 3D ViT versus MONAI's ViT, in one run.

Both models get the same depth, width, heads, MLP, patch and sequence length, and the same training
step (forward, mean-square loss on the output tokens, backward, AdamW). MONAI runs twice: as it
comes (einsum attention) and with ``use_flash_attention=True`` on its attention blocks (SDPA).
Sequence lengths 512 (128^3 input, 16^3 patches) and 2048 (128x256x256). Each configuration runs in
its own subprocess, so peak memory (VmHWM minus the resident size before the model is built) is
measured cleanly. The CPU's fp32 GEMM peak is measured in the same run; model FLOP utilisation is
the analytic training FLOPs per second over that peak. The voxseq AR training step (prefix-causal
mask with random start, next-token loss) and the sequence sampler are measured too.

Usage: python benchmarks/bench_ar.py [--quick]. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WIDTH, HEADS, MLP, PATCH = 384, 6, 1536, 16
IMAGES = {512: (128, 128, 128), 2048: (128, 256, 256)}


def vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def flops_per_token_train(depth: int, seq_len: int) -> float:
    """Analytic matmul FLOPs per token for forward + backward (3x forward) of the encoder."""
    e, h = WIDTH, MLP
    per_layer = 2 * (4 * e * e + 2 * e * h) + 4 * seq_len * e
    return 3 * (depth * per_layer + 2 * e * PATCH**3)


def worker(kind: str, seq_len: int, depth: int, steps: int, batch: int) -> dict:
    import torch

    base_kb = vm_kb("VmRSS")
    torch.manual_seed(0)
    dhw = IMAGES[seq_len]
    x = torch.randn(batch, 1, *dhw)
    if kind.startswith("monai"):
        from monai.networks.nets import ViT

        model = ViT(in_channels=1, img_size=dhw, patch_size=PATCH, hidden_size=WIDTH, mlp_dim=MLP, num_layers=depth,
                    num_heads=HEADS, classification=False, qkv_bias=True)
        if kind == "monai_sdpa":
            for blk in model.blocks:
                blk.attn.use_flash_attention = True
        forward = lambda: model(x)[0]  # noqa: E731
    else:
        from voxseq.models import ARViT3D, ViT3D, ViTConfig

        cfg = ViTConfig(patch_size=PATCH, embed_dim=WIDTH, depth=depth, num_heads=HEADS, mlp_ratio=MLP / WIDTH)
        if kind == "voxseq":
            model = ViT3D(cfg)
            forward = lambda: model.forward_features(x)  # noqa: E731
        else:  # the AR pretraining step: prefix-causal attention with a random start per sample
            from voxseq.objectives import norm_pixel_loss, prefix_loss_mask, sample_prefix_len
            from voxseq.sequence import patchify

            model = ARViT3D(cfg)
            tokens = patchify(x, PATCH)
            g = torch.Generator().manual_seed(0)
            grid = [s // PATCH for s in dhw]
            zz, yy, xx = torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")
            pos = torch.stack([torch.zeros_like(zz), zz, yy, xx], -1).reshape(1, -1, 4).float().expand(batch, -1, -1)

            def forward():
                prefix = sample_prefix_len(batch, seq_len, g)
                return norm_pixel_loss(model(tokens, pos, prefix), tokens, prefix_loss_mask(prefix, seq_len))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        out = forward()
        loss = out if out.ndim == 0 else out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernels
    t = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t) / steps
    return {"tokens_per_s": batch * seq_len / seconds, "step_s": seconds,
            "peak_mem_mb": (vm_kb("VmHWM") - base_kb) / 1024, "params": sum(p.numel() for p in model.parameters())}


def gemm_peak(n: int = 2048, reps: int = 10) -> float:
    """fp32 matmul GFLOP/s of this machine with torch's default threads (the hardware ceiling)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def run(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, 2 timed steps (about a minute)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--gemm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gemm:
        print(json.dumps({"gflops": gemm_peak()}))
        return
    if args.worker:
        kind, seq_len, depth, steps, batch = args.worker
        print(json.dumps(worker(kind, int(seq_len), int(depth), int(steps), int(batch))))
        return

    depth, steps = (2, 2) if args.quick else (6, 8)
    peak = max(run(["--gemm"])["gflops"] for _ in range(2))
    print(f"fp32 GEMM peak: {peak:.1f} GFLOP/s; model: {depth} layers, width {WIDTH}, {HEADS} heads, MLP {MLP}, patch {PATCH}")
    res: dict[tuple[str, int], dict] = {}
    for seq_len in (512, 2048):
        batch = 2 if seq_len == 512 else 1
        for kind in ("voxseq", "monai_default", "monai_sdpa", "voxseq_ar"):
            r = run(["--worker", kind, str(seq_len), str(depth), str(steps), str(batch)])
            r["mfu"] = r["tokens_per_s"] * flops_per_token_train(depth, seq_len) / (peak * 1e9)
            res[(kind, seq_len)] = r
            print(f"L={seq_len:5d} {kind:14s} {r['tokens_per_s']:8.0f} tok/s  step {r['step_s']:.2f} s  "
                  f"peak mem {r['peak_mem_mb']:7.0f} MB  MFU {r['mfu']:.0%}")
    from voxseq.sequence import measure_sampler

    sampler = measure_sampler(quick=args.quick)
    print(f"sampler: {sampler:.0f} paper-size sequences/s/core (4 x 128x128x32 slabs, 16^3 patches, augmented)")
    v = {L: res[("voxseq", L)] for L in (512, 2048)}
    fastest = {L: max(res[("monai_default", L)]["tokens_per_s"], res[("monai_sdpa", L)]["tokens_per_s"]) for L in (512, 2048)}
    out = {
        "throughput_ratio_vs_monai_fastest": round(min(v[L]["tokens_per_s"] / fastest[L] for L in (512, 2048)), 3),
        "throughput_ratio_vs_monai_fastest_L512": round(v[512]["tokens_per_s"] / fastest[512], 3),
        "throughput_ratio_vs_monai_fastest_L2048": round(v[2048]["tokens_per_s"] / fastest[2048], 3),
        "throughput_ratio_vs_monai_default_L2048": round(v[2048]["tokens_per_s"] / res[("monai_default", 2048)]["tokens_per_s"], 3),
        "mfu_vs_gemm_peak": round(min(v[L]["mfu"] for L in (512, 2048)), 3),
        "mfu_vs_gemm_peak_L512": round(v[512]["mfu"], 3),
        "mfu_vs_gemm_peak_L2048": round(v[2048]["mfu"], 3),
        "memory_ratio_vs_monai": round(max(v[L]["peak_mem_mb"] / min(res[("monai_default", L)]["peak_mem_mb"],
                                                                  res[("monai_sdpa", L)]["peak_mem_mb"]) for L in (512, 2048)), 3),
        "ar_step_tokens_per_s_L512": round(res[("voxseq_ar", 512)]["tokens_per_s"], 1),
        "ar_step_tokens_per_s_L2048": round(res[("voxseq_ar", 2048)]["tokens_per_s"], 1),
        "tokens_per_s": {f"{k}_L{L}": round(r["tokens_per_s"], 1) for (k, L), r in res.items()},
        "gemm_peak_gflops": round(peak, 1),
        "sampler_seq_per_s_per_core": round(sampler, 1),
        "depth": depth,
        "quick": args.quick,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
