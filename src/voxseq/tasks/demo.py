"""`voxseq demo`: the system end to end on a CPU, on synthetic phantoms and the bundled real samples.

Steps (each reused on a re-run unless ``--fresh``):
  1. data      - phantoms (CT torsos + 4-contrast brain MRIs) and the real samples -> one cache
  2. sequences - a figure of spatial, contrast and semantic sequences cut from the cache
  3. pretrain  - AR-SSL4M pretraining of the tiny ViT (configs/ar_tiny.yaml)
  4. report    - report.md, a self-contained report.html and metrics.json in the demo folder
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import time
from pathlib import Path
from typing import Any

from voxseq.config import to_dict
from voxseq.data.cache import Cache
from voxseq.data.preprocess import Preprocess
from voxseq.tasks.data import PhantomConfig, ensure_cache, repo_path


def _say(msg: str) -> None:
    from rich.console import Console

    Console(highlight=False, soft_wrap=True).print(f"[bold cyan]demo[/] {msg}")


def demo_settings(quick: bool) -> dict[str, Any]:
    """Sizes of the demo: the full one takes several minutes on 2 cores, --quick about one."""
    if quick:
        return {"n_ct": 6, "n_mri": 2, "size_xy": 96, "max_slices": 96, "ar_steps": 40, "batch_size": 2}
    return {"n_ct": 16, "n_mri": 4, "size_xy": 128, "max_slices": 160, "ar_steps": 300, "batch_size": 4}


def step_data(out: Path, s: dict[str, Any]):
    from voxseq.config import load_yaml
    from voxseq.tasks.data import DataConfig

    base = load_yaml(repo_path("configs/ar_tiny.yaml"))
    from voxseq.config import from_dict

    pre = from_dict(Preprocess, base["data"]["preprocess"])
    data = DataConfig(cache=str(out / "cache"), samples=True, preprocess=pre,
                      phantoms=PhantomConfig(n_ct=s["n_ct"], n_mri=s["n_mri"], size_xy=s["size_xy"], max_slices=s["max_slices"]))
    t = time.perf_counter()
    ensure_cache(data, out)
    return Cache(out / "cache"), time.perf_counter() - t


def plot_sequences(cache: Cache, seq_cfg, path: Path) -> Path:
    """One row per sequence kind: the middle slice of each sub-volume, in sequence order."""
    from dataclasses import replace

    from voxseq.sequence import KINDS, AugmentConfig, SequenceDataset, unpatchify
    from voxseq.train.plots import _plt

    plt = _plt()
    kinds = [k for k, w in seq_cfg.kind_weights.items() if w > 0]
    fig, axes = plt.subplots(len(kinds), seq_cfg.n_subvolumes, figsize=(2.4 * seq_cfg.n_subvolumes, 2.5 * len(kinds)),
                             dpi=110, squeeze=False)
    for row, kind in enumerate(kinds):
        cfg = replace(seq_cfg, kind_weights={kind: 1.0}, augment=AugmentConfig(intensity_prob=0.0))
        ds = SequenceDataset(cache, cfg)
        item = max((ds[i] for i in range(8)), key=lambda it: float(it["tokens"].std()))  # the most telling of a few
        k = cfg.tokens_per_subvolume
        n = item["tokens"].shape[0] // k
        subs = unpatchify(item["tokens"].reshape(n, k, -1), cfg.patch_size, cfg.grid)[:, 0]
        name = cache.entry(item["volume_index"])["id"]
        for i in range(n):
            ax = axes[row, i]
            ax.imshow(subs[i, subs.shape[1] // 2], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{KINDS[item['kind']]} {i}" + (f"\n{name}" if i == 0 else ""), fontsize=8)
            ax.axis("off")
    fig.suptitle("Token sequences cut from the cache (middle slice of each sub-volume)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def step_pretrain(out: Path, s: dict[str, Any], fresh: bool) -> dict[str, Any]:
    from voxseq.tasks.pretrain_ar import load_ar_config, run_pretrain_ar
    from voxseq.train.checkpoint import latest_checkpoint
    from voxseq.train.metrics import read_metrics

    run = out / "ar_pretrain"
    overrides = [f"max_steps={s['ar_steps']}", f"batch_size={s['batch_size']}", f"data.cache={out / 'cache'}",
                 "data.samples=false", "data.phantoms.n_ct=0", "data.phantoms.n_mri=0",
                 f"checkpoint_every={max(10, s['ar_steps'] // 3)}", f"warmup_steps={max(5, s['ar_steps'] // 10)}"]
    cfg = load_ar_config(repo_path("configs/ar_tiny.yaml"), overrides)
    done = run.exists() and latest_checkpoint(run) is not None and \
        json.loads(latest_checkpoint(run).read_text())["step"] >= s["ar_steps"]
    t = time.perf_counter()
    if not done:
        run_pretrain_ar(cfg, run, resume=run.exists())
    rows = read_metrics(run)
    head, tail = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10):]
    first = sum(r["loss"] for r in head) / len(head)
    last = sum(r["loss"] for r in tail) / len(tail)
    return {"steps": rows[-1]["step"] + 1, "loss_start": first, "loss_end": last, "loss_drop": 1 - last / first,
            "tokens_per_s": sum(r["tokens_per_s"] for r in tail) / len(tail), "seconds": time.perf_counter() - t,
            "reused": done, "config": to_dict(cfg), "run": str(run),
            "command": "voxseq pretrain ar --config configs/ar_tiny.yaml --out RUN " + " ".join(overrides)}


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def write_report(out: Path, metrics: dict[str, Any], figures: list[tuple[Path, str]], commands: list[tuple[str, str]]) -> None:
    """report.md (images linked), report.html (images embedded, one file) and metrics.json."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    rows = [("volumes in cache", metrics["data"]["volumes"]), ("cache build (s)", f"{metrics['data']['seconds']:.1f}"),
            ("AR steps", metrics["pretrain"]["steps"]),
            ("AR loss, first 10% of steps", f"{metrics['pretrain']['loss_start']:.4f}"),
            ("AR loss, last 10% of steps", f"{metrics['pretrain']['loss_end']:.4f}"),
            ("AR loss drop", f"{metrics['pretrain']['loss_drop']:.1%}"),
            ("AR throughput (tokens/s)", f"{metrics['pretrain']['tokens_per_s']:.0f}"),
            ("total wall time (s)", f"{metrics['wall_s']:.0f}")]
    md = ["# voxseq demo report", "", "Synthetic phantoms and real sample volumes -> cache -> token sequences -> "
          "AR-SSL4M pretraining, on a CPU.", "", "| result | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    md += ["", "## Figures", ""] + [f"![{alt}]({p.relative_to(out)})" for p, alt in figures]
    md += ["", "## Reproduce each step", ""] + [f"- {what}: `{cmd}`" for what, cmd in commands]
    (out / "report.md").write_text("\n".join(md) + "\n")
    table = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    cmds = "".join(f"<li>{html.escape(w)}: <code>{html.escape(c)}</code></li>" for w, c in commands)
    figs = "".join(_img_tag(p, alt) for p, alt in figures)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>voxseq demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td{{border:1px solid #ccc;padding:4px 10px}}
figure{{margin:1.5em 0}}img{{max-width:100%;border:1px solid #eee}}figcaption{{color:#555;font-size:90%}}
code{{background:#f4f4f4;padding:1px 4px}}</style></head><body>
<h1>voxseq demo report</h1><p>Synthetic phantoms and real sample volumes &rarr; cache &rarr; token sequences &rarr;
AR-SSL4M pretraining, on a CPU.</p><table>{table}</table><h2>Figures</h2>{figs}<h2>Reproduce each step</h2><ul>{cmds}</ul>
</body></html>"""
    (out / "report.html").write_text(page)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, fresh: bool = False) -> dict[str, Any]:
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    s = demo_settings(quick)
    t0 = time.perf_counter()
    _say(f"1/4 data: {s['n_ct']} CT + {s['n_mri']} MRI phantoms and 3 real sample volumes -> cache {out / 'cache'}")
    cache, data_s = step_data(out, s)
    _say(f"    {len(cache)} volumes cached in {data_s:.1f} s")
    from voxseq.tasks.pretrain_ar import load_ar_config

    seq_cfg = load_ar_config(repo_path("configs/ar_tiny.yaml")).sequence
    _say("2/4 sequences: spatial, contrast and semantic sequences -> plots/sequences.png")
    seq_png = plot_sequences(cache, seq_cfg, out / "plots" / "sequences.png")
    _say(f"3/4 AR pretraining: tiny ViT, {s['ar_steps']} steps")
    pre = step_pretrain(out, s, fresh)
    _say(f"    loss {pre['loss_start']:.3f} -> {pre['loss_end']:.3f} ({pre['loss_drop']:.0%} lower), "
         f"{pre['tokens_per_s']:.0f} tokens/s")
    metrics = {"quick": quick, "wall_s": time.perf_counter() - t0,
               "data": {"volumes": len(cache), "seconds": data_s, "ids": cache.ids},
               "pretrain": {k: v for k, v in pre.items() if k != "config"}}
    run = Path(pre["run"])
    figures = [(seq_png, "Token sequences of each kind cut from the cache"),
               (run / "plots" / "loss_curve.png", "AR pretraining loss and learning rate"),
               (run / "plots" / "reconstruction.png", "AR reconstruction: inputs and next-token predictions")]
    commands = [("phantoms", f"voxseq phantoms --out PHANTOMS --n-ct {s['n_ct']} --n-mri {s['n_mri']}"),
                ("cache", "voxseq prepare PHANTOMS/manifest.jsonl --out CACHE --config configs/ar_tiny.yaml"),
                ("AR pretraining", pre["command"])]
    _say(f"4/4 report -> {out / 'report.html'}")
    write_report(out, metrics, figures, commands)
    _say(f"done in {metrics['wall_s']:.0f} s. Open {out / 'report.html'}")
    return metrics
