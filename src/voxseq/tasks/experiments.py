"""`voxseq experiment label-efficiency`: pretrained versus scratch over label ratios and seeds.

Both arms use the same UNETR, the same encoder architecture and preprocessing (those of the
pretrained checkpoint), the same cache and validation cases; only the encoder's initial weights
differ. Writes ``results.json``, ``results.md`` (mean +- std Dice) and ``label_efficiency.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from voxseq.tasks.finetune_seg import load_seg_config, run_finetune_seg


def run_label_efficiency(config: str | Path, init: str | Path, out: str | Path, ratios=(0.1, 1.0), seeds=(0, 1, 2),
                         overrides: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    done_path = out / "results.json"
    previous = {(r["arm"], r["ratio"], r["seed"]): r for r in json.loads(done_path.read_text())["runs"]} \
        if done_path.is_file() else {}
    wanted = {(arm, ratio, seed) for ratio in ratios for seed in seeds for arm in ("scratch", "pretrained")}
    runs += [r for key, r in previous.items() if key not in wanted]  # other ratios / seeds of the table stay in it
    for ratio in ratios:
        for seed in seeds:
            for arm in ("scratch", "pretrained"):
                if (arm, ratio, seed) in previous:  # a re-run resumes the table
                    runs.append(previous[(arm, ratio, seed)])
                    continue
                cfg = load_seg_config(config, list(overrides or []) + [f"label_ratio={ratio}", f"seed={seed}",
                                                                       f"data.cache={out / 'cache'}"])
                r = run_finetune_seg(cfg, out / f"{arm}_r{ratio}_s{seed}", init=str(init),
                                     load_weights=arm == "pretrained", progress=progress, resume=True)
                runs.append({"arm": arm, "ratio": ratio, "seed": seed, "mean_dice": r["val"]["mean_dice"],
                             "dice_per_class": r["val"].get("dice_per_class", []), "n_train": r["n_train"],
                             "seconds": r["seconds"]})
                write_results(out, runs, str(init))
    return write_results(out, runs, str(init))


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for ratio in sorted({r["ratio"] for r in runs}):
        for arm in ("scratch", "pretrained"):
            d = [r["mean_dice"] for r in runs if r["ratio"] == ratio and r["arm"] == arm]
            if d:
                rows.append({"ratio": ratio, "arm": arm, "mean": float(np.mean(d)), "std": float(np.std(d)), "n": len(d)})
    return rows


def paired_differences(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per label ratio, pretrained minus scratch Dice paired by seed (the same labelled cases and crops):
    the differences, their mean and standard deviation (ddof 1; 0 with one seed)."""
    rows = []
    for ratio in sorted({r["ratio"] for r in runs}):
        by = {(r["arm"], r["seed"]): r["mean_dice"] for r in runs if r["ratio"] == ratio}
        seeds = sorted(s for a, s in by if a == "scratch" and ("pretrained", s) in by)
        if seeds:
            d = np.array([by[("pretrained", s)] - by[("scratch", s)] for s in seeds])
            rows.append({"ratio": ratio, "seeds": seeds, "differences": d.tolist(), "mean": float(d.mean()),
                         "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0})
    return rows


def write_results(out: Path, runs: list[dict[str, Any]], init: str) -> dict[str, Any]:
    rows = summarise(runs)
    paired = paired_differences(runs)
    result = {"init": init, "runs": runs, "summary": rows, "paired": paired}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = ["# Label efficiency: pretrained versus scratch", "", f"Pretrained encoder: `{init}`", "",
          "| label ratio | scratch Dice | pretrained Dice | pretrained - scratch (paired by seed) |", "|---|---|---|---|"]
    for ratio in sorted({r["ratio"] for r in rows}):
        cell = {r["arm"]: f"{r['mean']:.4f} +- {r['std']:.4f} (n={r['n']})" for r in rows if r["ratio"] == ratio}
        diff = next((f"{p['mean']:+.4f} +- {p['std']:.4f} (n={len(p['seeds'])})" for p in paired if p["ratio"] == ratio), "-")
        md.append(f"| {ratio:g} | {cell.get('scratch', '-')} | {cell.get('pretrained', '-')} | {diff} |")
    (out / "results.md").write_text("\n".join(md) + "\n")
    _plot(rows, out / "label_efficiency.png")
    return result


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    from voxseq.train.plots import _plt, save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    for arm, colour in (("scratch", "tab:gray"), ("pretrained", "tab:blue")):
        pts = sorted((r["ratio"], r["mean"], r["std"]) for r in rows if r["arm"] == arm)
        if pts:
            x, m, s = zip(*pts)
            ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=arm, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel("validation mean Dice")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def token_features(encoder, cache, indices: list[int], max_tokens: int, rng, layers=("last",),
                   window_zyx=None) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-token features of cached volumes, one (N, E) array per layer, and the label at each token's
    centre voxel (tokens embedded through ``voxseq.models.features.token_features_layers``)."""
    import torch

    from voxseq.models.features import token_features_layers
    from voxseq.tasks.encoders import pad_to_multiple

    p = encoder.cfg.patch_size
    feats: list[list[np.ndarray]] = [[] for _ in layers]
    labels = []
    encoder.eval()
    for i in indices:
        img = pad_to_multiple(np.asarray(cache.image(i), dtype=np.float32), p, 0.0)
        per_layer = token_features_layers(encoder, torch.from_numpy(img), list(layers), window_zyx)  # each (N, E)
        lab = np.asarray(cache.label(i))
        grid = [s // p for s in img.shape[1:]]
        zz, yy, xx = np.meshgrid(*[np.arange(g) * p + p // 2 for g in grid], indexing="ij")
        c = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], 1)
        inside = (c < np.array(lab.shape)).all(1)
        for store, f in zip(feats, per_layer):
            store.append(f.numpy()[inside])
        labels.append(lab[tuple(c[inside].T)])
    xs, y = [np.concatenate(f) for f in feats], np.concatenate(labels)
    if len(y) > max_tokens:
        keep = rng.choice(len(y), max_tokens, replace=False)
        xs, y = [x[keep] for x in xs], y[keep]
    return xs, y


def fit_probe(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> dict[str, float]:
    """Logistic regression on standardised features; accuracy and balanced accuracy on the test tokens."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    with threadpool_limits(1):  # a multi-threaded BLAS on a busy machine made each fit ~25x slower
        clf.fit(xtr, ytr)
        pred = clf.predict(xte)
    return {"accuracy": float(accuracy_score(yte, pred)), "balanced_accuracy": float(balanced_accuracy_score(yte, pred))}


def run_token_probe(config: str | Path, init: str | Path, out: str | Path, overrides: list[str] | None = None,
                    max_tokens: int = 20000, window: str = "whole", layer: str | int | None = None,
                    start_token: bool = False, progress: bool = True) -> dict[str, Any]:
    """Linear probe of per-token features: which organ is at each token's centre, pretrained versus
    randomly initialised encoder of the same architecture, at every layer. Logistic regression
    (scikit-learn) on the training volumes' tokens, scored on the evaluation splits' tokens.

    ``window``: ``whole`` embeds each volume as one sequence, ``pretraining`` through windows of the
    pretraining geometry, or ``ZxYxX`` voxels. The top-level ``pretrained`` / ``random`` entries are
    at ``layer`` (default: the checkpoint's default embedding layer); ``layers`` holds the curve.
    """
    import torch

    from voxseq.models.features import describe_geometry
    from voxseq.models.vit3d import ViT3D
    from voxseq.tasks.data import ensure_cache, open_cache
    from voxseq.tasks.encoders import embedding_setup, encoder_from_checkpoint
    from voxseq.tasks.finetune_seg import load_seg_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_seg_config(config, list(overrides or []))
    pretrained, pre, meta, _ = encoder_from_checkpoint(init, start_token=start_token)
    headline, window_zyx = embedding_setup(pretrained, meta, layer, window)
    cfg.data.preprocess = pre
    ensure_cache(cfg.data, out, progress)
    cache = open_cache(Path(cfg.data.cache) if cfg.data.cache else out / "cache", None, cfg.data.label_map)
    labelled = [i for i in range(len(cache)) if cache.entry(i).get("has_label")]
    train = [i for i in labelled if cache.entry(i)["split"] == "train"]
    test = [i for i in labelled if cache.entry(i)["split"] in cfg.eval_splits]
    torch.manual_seed(0)
    encoders = {"pretrained": pretrained, "random": ViT3D(pretrained.cfg)}
    layers: list = [*range(1, pretrained.num_layers + 1), "last", "mean"]
    result: dict[str, Any] = {"init": str(init), "n_train_volumes": len(train), "n_test_volumes": len(test),
                              "window_zyx": window_zyx, "layer": headline,
                              "start_token": pretrained.start_token is not None, "layers": {}}
    for name, enc in encoders.items():
        rng = np.random.default_rng(0)
        xtr, ytr = token_features(enc, cache, train, max_tokens, rng, layers, window_zyx)
        xte, yte = token_features(enc, cache, test, max_tokens, rng, layers, window_zyx)
        curve = {str(n): fit_probe(a, ytr, b, yte) for n, a, b in zip(layers, xtr, xte)}
        result["layers"][name] = curve
        result[name] = {**curve[str(headline)], "train_tokens": int(len(ytr)), "test_tokens": int(len(yte))}
    (out / "token_probe.json").write_text(json.dumps(result, indent=1))
    where = describe_geometry(window_zyx)
    md = ["# Per-token linear probe (organ at the token's centre)", "", f"Pretrained encoder: `{init}`; tokens embedded "
          f"through {where}; headline layer: {headline}.", "",
          "| encoder | accuracy | balanced accuracy |", "|---|---|---|"]
    md += [f"| {n} | {result[n]['accuracy']:.4f} | {result[n]['balanced_accuracy']:.4f} |" for n in encoders]
    md += ["", "Balanced accuracy by layer (block outputs 1..depth, the final normalised output, the mean of all blocks):",
           "", "| layer | " + " | ".join(encoders) + " |", "|---|" + "---|" * len(encoders)]
    md += [f"| {n} | " + " | ".join(f"{result['layers'][e][str(n)]['balanced_accuracy']:.4f}" for e in encoders) + " |"
           for n in layers]
    (out / "token_probe.md").write_text("\n".join(md) + "\n")
    _plot_probe_layers(result, out / "probe_layers.png")
    return result


def _plot_probe_layers(result: dict[str, Any], path: Path) -> None:
    from voxseq.train.plots import _plt, save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for name, colour in (("pretrained", "tab:blue"), ("random", "tab:gray")):
        curve = result["layers"][name]
        blocks = [k for k in curve if k.isdigit()]
        ax.plot([int(k) for k in blocks], [curve[k]["balanced_accuracy"] for k in blocks], marker="o", color=colour,
                label=f"{name} (mean of blocks {curve['mean']['balanced_accuracy']:.3f})")
    ax.set_xlabel("block")
    ax.set_ylabel("probe balanced accuracy")
    ax.set_title("Per-token linear probe by layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
