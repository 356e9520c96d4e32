"""Data-path benchmark: random crops from the voxseq cache versus MONAI's usual loading path.

Measures, in one run:
  * random 128x128x32 crops per second read from a voxseq cache (one process, warm page cache);
  * the same crops through MONAI ``LoadImaged`` + ``ScaleIntensityRanged`` (windowing) +
    ``SpatialCropd`` from the original ``.nii.gz`` files (what a plain MONAI Dataset does per sample);
  * peak RSS of each path (each runs in its own subprocess);
  * ``voxseq prepare`` throughput (volumes/s, MB/s of source voxels) on the bundled real samples.

Usage: python benchmarks/bench_data.py [--quick]. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CROP_ZYX = (32, 128, 128)
WINDOW = (-1000.0, 1000.0)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss it is not inherited through exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_corpus(folder: Path, n: int, shape_zyx=(96, 320, 320), seed: int = 0) -> list[Path]:
    """Synthetic CT-like volumes (int16 HU, smooth anatomy-like structure plus noise) as .nii.gz."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape_zyx], indexing="ij")
    paths = []
    for i in range(n):
        body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
        hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, shape_zyx).astype(np.float32)
        hu += 300 * np.sin(6 * z + i) * ((y - 0.3) ** 2 + x**2 < 0.02)
        img = sitk.GetImageFromArray(hu.astype(np.int16))
        img.SetSpacing((0.8, 0.8, 2.0))
        p = folder / f"vol{i:03d}.nii.gz"
        sitk.WriteImage(img, str(p), useCompression=True)
        paths.append(p)
    return paths


def random_corners(shapes_zyx: list[tuple[int, int, int]], n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        v = int(rng.integers(len(shapes_zyx)))
        corner = [int(rng.integers(0, s - c + 1)) for s, c in zip(shapes_zyx[v], CROP_ZYX)]
        out.append((v, corner))
    return out


# ---------------------------------------------------------------------------- the two paths (run in subprocesses)


def worker_cache(cache_dir: str, n: int) -> dict:
    from voxseq.data.cache import Cache

    cache = Cache(cache_dir)
    for i in range(len(cache)):  # warm page cache and open maps, as a long-running sampler has them
        img = cache.image(i)
        for z in range(img.shape[1]):
            img[0, z].max()
    shapes = [tuple(cache.entry(i)["shape_zyx"]) for i in range(len(cache))]
    corners = random_corners(shapes, n)
    out = np.empty(CROP_ZYX, np.float16)
    t = time.perf_counter()
    for v, (z, y, x) in corners:
        np.copyto(out, cache.image(v)[0, z:z + CROP_ZYX[0], y:y + CROP_ZYX[1], x:x + CROP_ZYX[2]])
    seconds = time.perf_counter() - t
    return {"crops_per_s": n / seconds, "peak_rss_mb": peak_rss_mb(), "checksum": float(out.astype(np.float32).sum())}


def worker_monai(paths: list[str], n: int) -> dict:
    from monai.transforms import Compose, LoadImaged, ScaleIntensityRanged, SpatialCropd

    # MONAI's LoadImage (nibabel) gives (X, Y, Z) arrays: crop sizes in that order
    load = Compose([LoadImaged(keys="image", image_only=True),
                    ScaleIntensityRanged(keys="image", a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True)])
    shapes = []
    for p in paths:
        import nibabel as nib

        sx, sy, sz = nib.load(p).shape[:3]
        shapes.append((sz, sy, sx))
    corners = random_corners(shapes, n)
    t = time.perf_counter()
    for v, (z, y, x) in corners:
        d = load({"image": paths[v]})
        crop = SpatialCropd(keys="image", roi_start=(x, y, z), roi_end=(x + CROP_ZYX[2], y + CROP_ZYX[1], z + CROP_ZYX[0]))
        out = crop({"image": d["image"][None]})["image"]
    seconds = time.perf_counter() - t
    return {"crops_per_s": n / seconds, "peak_rss_mb": peak_rss_mb(), "shape": list(out.shape)}


def run_worker(kind: str, payload: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--payload", json.dumps(payload)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_prepare(tmp: Path) -> dict:
    """prepare throughput on the bundled real samples (single worker and two workers)."""
    from voxseq.data.cache import prepare_cache
    from voxseq.data.manifest import Record
    from voxseq.data.preprocess import Preprocess

    samples = ROOT / "data" / "samples"
    recs = [Record(id=n, images={"image": str(samples / f"{n}_image.nrrd")}, label=str(samples / f"{n}_label.nrrd"))
            for n in ("lung1", "brain1", "breast1")]
    out = {}
    for workers in (1, 2):
        s = prepare_cache(recs, tmp / f"prep{workers}", Preprocess(), workers=workers, overwrite=True, progress=False)
        src_mb = sum(np.prod(e) * 2 for e in [(48, 384, 384), (25, 256, 256), (21, 120, 45)]) / 1e6  # int16 source voxels
        out[f"workers{workers}"] = {"volumes_per_s": s.done / s.seconds, "mb_per_s": src_mb / s.seconds, "seconds": s.seconds}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small corpus and few crops (about a minute)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--payload", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        p = json.loads(args.payload)
        res = worker_cache(p["cache"], p["n"]) if args.worker == "cache" else worker_monai(p["paths"], p["n"])
        print(json.dumps(res))
        return

    from voxseq.data.cache import prepare_cache
    from voxseq.data.manifest import Record
    from voxseq.data.preprocess import Preprocess

    n_vol, n_cache, n_monai = (3, 3000, 4) if args.quick else (8, 20000, 12)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = make_corpus(tmp, n_vol)
        recs = [Record(id=p.name.split(".")[0], images={"image": str(p)}) for p in paths]
        prepare_cache(recs, tmp / "cache", Preprocess(intensity="window", hu_range=list(WINDOW)), workers=2, progress=False)
        cache = run_worker("cache", {"cache": str(tmp / "cache"), "n": n_cache})
        monai = run_worker("monai", {"paths": [str(p) for p in paths], "n": n_monai})
        prep = bench_prepare(tmp)
    speedup = cache["crops_per_s"] / monai["crops_per_s"]
    print(f"corpus: {n_vol} synthetic CT volumes 96x320x320 (.nii.gz); crops {CROP_ZYX[::-1]} (x, y, z)")
    print(f"voxseq cache : {cache['crops_per_s']:9.1f} crops/s  peak RSS {cache['peak_rss_mb']:.0f} MB")
    print(f"MONAI        : {monai['crops_per_s']:9.2f} crops/s  peak RSS {monai['peak_rss_mb']:.0f} MB "
          "(LoadImaged + ScaleIntensityRanged + SpatialCropd)")
    print(f"speedup      : {speedup:.0f}x")
    for k, v in prep.items():
        print(f"prepare ({k}): {v['volumes_per_s']:.2f} volumes/s, {v['mb_per_s']:.1f} MB/s of source voxels")
    print(json.dumps({
        "speedup_vs_monai": round(speedup, 1),
        "crops_per_s_per_core": round(cache["crops_per_s"], 1),
        "monai_crops_per_s": round(monai["crops_per_s"], 3),
        "cache_peak_rss_mb": round(cache["peak_rss_mb"], 1),
        "monai_peak_rss_mb": round(monai["peak_rss_mb"], 1),
        "prepare_volumes_per_s": round(prep["workers2"]["volumes_per_s"], 3),
        "prepare_mb_per_s": round(prep["workers2"]["mb_per_s"], 2),
        "prepare_volumes_per_s_1_worker": round(prep["workers1"]["volumes_per_s"], 3),
        "quick": args.quick,
    }))


if __name__ == "__main__":
    main()
