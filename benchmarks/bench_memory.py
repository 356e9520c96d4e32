"""Memory benchmark: does a sampler's memory stay flat as the cache grows?

Builds caches of growing size (0.25, 1 and 4 GB of float16 voxels; ``--quick``: 0.1, 0.4, 1.6 GB) of
synthetic CT-like volumes, written directly with the cache's own writers (``atomic_save_npy``,
``atomic_write_bytes``; a valid ``entry.json`` per volume and ``index.jsonl``), and in a fresh
subprocess per (cache, sampler) draws the same number of samples from
  * ``ar``: ``SequenceDataset`` (AR-SSL4M spatial sequences, the paper's 128^3 crop of 4 slabs), and
  * ``vlp``: ``ChunkTextDataset`` (SigVLP chunks of 32..64 slices paired with organ sentences, which
    reads each visited volume's label map once to count organ voxels),
both over a :class:`voxseq.data.cache.Cache` (default ``max_open=64`` memory maps), and ``ar_open4``:
the AR sampler over ``Cache(max_open=4)``; and training itself, ``ar_train`` / ``vlp_train``: `pretrain ar`
(configs/ar_tiny.yaml, spatial sequences) and `pretrain vlp` (configs/vlp_tiny.yaml, 96 x 96 in-plane crops,
8 chunks per step) for the same number of steps over each cache, RSS sampled every 0.1 s (also reported:
the anonymous RSS of the first quarter of the run against the whole run's, i.e. growth over the steps).
Reported per size and sampler: peak RSS (``VmHWM``), the
largest anonymous RSS seen (``RssAnon``: private memory, what cannot be given back without freeing
it) and the file-backed RSS at the end (``RssFile``: memory-mapped cache pages, clean page cache that
the kernel may take back at any time), and the growth ratio largest / smallest cache of each. The
samples are the same count for every size, so a flat anonymous profile means nothing in the samplers
grows with the corpus; the mapped pages grow with the number of distinct volumes a run has touched,
up to ``max_open`` volumes' worth (``mapped_bound_mb``), whatever the corpus size.

Usage: python benchmarks/bench_memory.py [--quick] [--sizes 0.25,16]. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE_CZYX = (1, 128, 256, 256)  # 16.8 MB of float16 per volume
ORGANS = {"lung": [1], "liver": [2], "heart": [3]}


# ---------------------------------------------------------------------------- synthetic caches


def write_cache(folder: Path, gigabytes: float, seed: int = 0) -> int:
    """A cache of float16 volumes (plus uint8 labels) adding up to ``gigabytes`` of image voxels."""
    from voxseq.data.cache import CACHE_VERSION, atomic_save_npy, atomic_write_bytes, intensity_stats
    from voxseq.config import save_yaml, to_dict
    from voxseq.data.preprocess import Preprocess

    per_volume = np.prod(SHAPE_CZYX) * 2
    n = max(1, int(round(gigabytes * 1e9 / per_volume)))
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in SHAPE_CZYX[1:]], indexing="ij")
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    label = np.zeros(SHAPE_CZYX[1:], np.uint8)
    label[body & (x < -0.2)] = 1
    label[body & (x > 0.3) & (z < 0)] = 2
    label[(x**2 + y**2 < 0.05)] = 3
    base = np.where(body, 0.5, 0.0).astype(np.float32) + rng.normal(0, 0.05, SHAPE_CZYX[1:]).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_yaml({"cache_version": CACHE_VERSION, "preprocess": to_dict(Preprocess())}, folder / "preprocess.yaml")
    lines = []
    for i in range(n):
        vid = f"vol{i:04d}"
        vol = folder / "volumes" / vid
        vol.mkdir(parents=True, exist_ok=True)
        image = np.roll(base, i * 7, axis=2)[None].astype(np.float16) + np.float16(0.001 * (i % 50))
        entry = {"id": vid, "folder": f"volumes/{vid}", "split": "train", "modalities": ["image"],
                 "shape_zyx": list(SHAPE_CZYX[1:]), "channels": 1, "spacing_xyz": [1.0, 1.0, 2.0],
                 "origin_xyz": [0.0, 0.0, 0.0], "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
                 "stats": intensity_stats(image[:, ::8]), "boxes": [], "has_label": True, "label_values": [0, 1, 2, 3],
                 "text": "Lungs clear. Liver normal. Heart normal.",
                 "sentences": {"lung": "Lungs clear.", "liver": "Liver normal.", "heart": "Heart normal."},
                 "extra": {"sentence_labels": ORGANS}}
        entry["sha256"] = {"image.npy": atomic_save_npy(vol / "image.npy", image),
                           "label.npy": atomic_save_npy(vol / "label.npy", label)}
        entry["bytes"] = {name: (vol / name).stat().st_size for name in entry["sha256"]}
        atomic_write_bytes(vol / "entry.json", json.dumps(entry).encode())
        lines.append(json.dumps(entry))
    atomic_write_bytes(folder / "index.jsonl", ("\n".join(lines) + "\n").encode())
    return n


# ---------------------------------------------------------------------------- one measurement (a subprocess)


def _status_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024.0
    return out


def worker(cache_dir: str, sampler: str, n: int) -> dict:
    from voxseq.data.cache import Cache
    from voxseq.sequence import ChunkConfig, ChunkTextDataset, SequenceConfig, SequenceDataset

    cache = Cache(cache_dir, max_open=4 if sampler == "ar_open4" else 64)
    if sampler.startswith("ar"):
        ds = SequenceDataset(cache, SequenceConfig())
    else:
        ds = ChunkTextDataset(cache, ChunkConfig(min_slices=32, max_slices=64))
    ds[0]
    start = _status_mb()
    anon_max = start["RssAnon"]
    t = time.perf_counter()
    for i in range(n):
        item = ds[i]
        assert item["tokens"].shape[0] > 0
        if i % 10 == 0:
            anon_max = max(anon_max, _status_mb()["RssAnon"])
    end = _status_mb()
    return {"volumes": len(cache), "samples_per_s": n / (time.perf_counter() - t), "rss_start_mb": start["VmRSS"],
            "peak_rss_mb": end["VmHWM"], "anon_max_mb": max(anon_max, end["RssAnon"]), "file_end_mb": end["RssFile"]}


def train_worker(cache_dir: str, kind: str, steps: int) -> dict:
    """RSS of `pretrain ar|vlp` (the tiny configs) training ``steps`` steps over the cache, sampled every 0.1 s."""
    import tempfile
    import threading

    overrides = [f"data.cache={cache_dir}", "data.phantoms.n_ct=0", "data.phantoms.n_mri=0", "data.samples=false",
                 f"max_steps={steps}", f"checkpoint_every={steps}", "log_every=1000000"]
    if kind == "ar_train":
        from voxseq.tasks.pretrain_ar import load_ar_config as load, run_pretrain_ar as run

        config = ROOT / "configs" / "ar_tiny.yaml"
        overrides += ["sequence.kind_weights={spatial: 1.0}"]
    else:
        from voxseq.tasks.pretrain_vlp import load_vlp_config as load, run_pretrain_vlp as run

        config = ROOT / "configs" / "vlp_tiny.yaml"
        overrides += ["chunks.crop_yx=[96,96]", "chunks.pad_value=0.0", "chunks_per_batch=8"]
    cfg = load(config, overrides)
    trace: list[tuple[float, float]] = []  # (seconds, RssAnon MB)
    stop = threading.Event()

    def watch() -> None:
        t0 = time.perf_counter()
        while not stop.is_set():
            trace.append((time.perf_counter() - t0, _status_mb()["RssAnon"]))
            stop.wait(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    with tempfile.TemporaryDirectory(prefix="bench_memory_run_") as run_dir:
        start = _status_mb()
        thread.start()
        t = time.perf_counter()
        run(cfg, Path(run_dir) / "run", progress=False)
        seconds = time.perf_counter() - t
        stop.set()
        thread.join()
    end = _status_mb()
    quarter = [a for s, a in trace if s <= trace[-1][0] / 4] or [trace[0][1]]
    from voxseq.data.cache import Cache

    return {"volumes": len(Cache(cache_dir)), "samples_per_s": steps / seconds, "rss_start_mb": start["VmRSS"],
            "peak_rss_mb": end["VmHWM"], "anon_max_mb": max(a for _, a in trace), "file_end_mb": end["RssFile"],
            "anon_first_quarter_max_mb": max(quarter), "steps": steps}


def measure(cache_dir: Path, sampler: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps([str(cache_dir), sampler, n])]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"worker failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="caches of 0.1, 0.4, 1.6 GB and fewer samples")
    ap.add_argument("--samples", type=int, default=None, help="samples per measurement (default 300; --quick 150)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per measurement (default 60; --quick 20)")
    ap.add_argument("--sizes", default=None, help="cache sizes in GB, comma-separated (default 0.25,1,4; e.g. "
                    "0.25,16 for a 16 GB corpus: about 1000 volumes written to the temporary folder, deleted after)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        cache_dir, sampler, n = json.loads(args.worker)
        print(json.dumps((train_worker if sampler.endswith("_train") else worker)(cache_dir, sampler, n)))
        return

    sizes = [float(v) for v in args.sizes.split(",")] if args.sizes else [0.1, 0.4, 1.6] if args.quick else [0.25, 1.0, 4.0]
    n = args.samples or (150 if args.quick else 300)
    steps = args.steps or (20 if args.quick else 60)
    results: dict[str, dict[str, dict]] = {"ar": {}, "vlp": {}, "ar_open4": {}, "ar_train": {}, "vlp_train": {}}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for gb in sizes:
            folder = Path(tmp) / f"cache_{gb:g}gb"
            t = time.perf_counter()
            volumes = write_cache(folder, gb)
            print(f"cache {gb:g} GB: {volumes} volumes written in {time.perf_counter() - t:.1f} s", flush=True)
            for sampler in results:
                count = steps if sampler.endswith("_train") else n
                m = measure(folder, sampler, count)
                results[sampler][f"{gb:g}"] = m
                print(f"  {sampler}: {count} {'steps' if sampler.endswith('_train') else 'samples'}, peak RSS {m['peak_rss_mb']:.0f} MB (anonymous max {m['anon_max_mb']:.0f} MB, "
                      f"mapped cache pages at the end {m['file_end_mb']:.0f} MB), {m['samples_per_s']:.1f} samples/s", flush=True)
            import shutil

            shutil.rmtree(folder)  # keep at most one cache on disk
    lo, hi = f"{sizes[0]:g}", f"{sizes[-1]:g}"
    growth = {s: round(r[hi]["peak_rss_mb"] / r[lo]["peak_rss_mb"], 3) for s, r in results.items()}  # total: maps included
    anon_growth = {s: round(r[hi]["anon_max_mb"] / r[lo]["anon_max_mb"], 3) for s, r in results.items()}
    print(json.dumps({
        "cache_gb": sizes,
        "samples": n,
        "train_steps": steps,
        "train_anon_growth_over_run": {s: {k: round(v["anon_max_mb"] / v["anon_first_quarter_max_mb"], 3) for k, v in results[s].items()}
                                       for s in ("ar_train", "vlp_train")},
        "rss_mb": {s: {k: round(v["peak_rss_mb"], 1) for k, v in r.items()} for s, r in results.items()},
        "rss_anon_mb": {s: {k: round(v["anon_max_mb"], 1) for k, v in r.items()} for s, r in results.items()},
        "rss_file_mb": {s: {k: round(v["file_end_mb"], 1) for k, v in r.items()} for s, r in results.items()},
        "volumes": {k: v["volumes"] for k, v in results["ar"].items()},
        "rss_growth_ratio": max(growth.values()),
        "rss_growth_ratio_per_sampler": growth,
        "rss_anon_growth_ratio": max(anon_growth.values()),
        "rss_anon_growth_ratio_per_sampler": anon_growth,
        "mapped_bound_mb": {"ar": round(64 * np.prod(SHAPE_CZYX) * 2 / 2**20), "vlp": round(64 * np.prod(SHAPE_CZYX) * 3 / 2**20),
                            "ar_open4": round(4 * np.prod(SHAPE_CZYX) * 2 / 2**20),
                            "ar_train": round(64 * np.prod(SHAPE_CZYX) * 2 / 2**20),
                            "vlp_train": round(64 * np.prod(SHAPE_CZYX) * 3 / 2**20)},
        "quick": args.quick,
    }))


if __name__ == "__main__":
    main()
