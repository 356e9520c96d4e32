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


def write_results(out: Path, runs: list[dict[str, Any]], init: str) -> dict[str, Any]:
    rows = summarise(runs)
    result = {"init": init, "runs": runs, "summary": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = ["# Label efficiency: pretrained versus scratch", "", f"Pretrained encoder: `{init}`", "",
          "| label ratio | scratch Dice | pretrained Dice |", "|---|---|---|"]
    for ratio in sorted({r["ratio"] for r in rows}):
        cell = {r["arm"]: f"{r['mean']:.4f} +- {r['std']:.4f} (n={r['n']})" for r in rows if r["ratio"] == ratio}
        md.append(f"| {ratio:g} | {cell.get('scratch', '-')} | {cell.get('pretrained', '-')} |")
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


def token_features(encoder, cache, indices: list[int], max_tokens: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Per-token features (N, E) of cached volumes and the label at each token's centre voxel."""
    import torch

    from voxseq.tasks.encoders import pad_to_multiple

    p = encoder.cfg.patch_size
    feats, labels = [], []
    encoder.eval()
    for i in indices:
        img = pad_to_multiple(np.asarray(cache.image(i), dtype=np.float32), p, 0.0)
        with torch.no_grad():
            f = encoder.forward_features(torch.from_numpy(img)[None])[0].numpy()  # (N, E)
        lab = np.asarray(cache.label(i))
        grid = [s // p for s in img.shape[1:]]
        zz, yy, xx = np.meshgrid(*[np.arange(g) * p + p // 2 for g in grid], indexing="ij")
        c = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], 1)
        inside = (c < np.array(lab.shape)).all(1)
        feats.append(f[inside])
        labels.append(lab[tuple(c[inside].T)])
    x, y = np.concatenate(feats), np.concatenate(labels)
    if len(x) > max_tokens:
        keep = rng.choice(len(x), max_tokens, replace=False)
        x, y = x[keep], y[keep]
    return x, y


def run_token_probe(config: str | Path, init: str | Path, out: str | Path, overrides: list[str] | None = None,
                    max_tokens: int = 20000, progress: bool = True) -> dict[str, Any]:
    """Linear probe of per-token features: which organ is at each token's centre, pretrained versus
    randomly initialised encoder of the same architecture. Logistic regression (scikit-learn) on the
    training volumes' tokens, scored on the evaluation splits' tokens."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from voxseq.models.vit3d import ViT3D
    from voxseq.tasks.data import ensure_cache, open_cache
    from voxseq.tasks.encoders import encoder_from_checkpoint
    from voxseq.tasks.finetune_seg import load_seg_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_seg_config(config, list(overrides or []))
    pretrained, pre, _, _ = encoder_from_checkpoint(init)
    cfg.data.preprocess = pre
    ensure_cache(cfg.data, out, progress)
    cache = open_cache(Path(cfg.data.cache) if cfg.data.cache else out / "cache", None)
    labelled = [i for i in range(len(cache)) if cache.entry(i).get("has_label")]
    train = [i for i in labelled if cache.entry(i)["split"] == "train"]
    test = [i for i in labelled if cache.entry(i)["split"] in cfg.eval_splits]
    torch.manual_seed(0)
    encoders = {"pretrained": pretrained, "random": ViT3D(pretrained.cfg)}
    result: dict[str, Any] = {"init": str(init), "n_train_volumes": len(train), "n_test_volumes": len(test)}
    for name, enc in encoders.items():
        rng = np.random.default_rng(0)
        xtr, ytr = token_features(enc, cache, train, max_tokens, rng)
        xte, yte = token_features(enc, cache, test, max_tokens, rng)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(xtr, ytr)
        pred = clf.predict(xte)
        result[name] = {"accuracy": float(accuracy_score(yte, pred)),
                        "balanced_accuracy": float(balanced_accuracy_score(yte, pred)),
                        "train_tokens": int(len(ytr)), "test_tokens": int(len(yte))}
    (out / "token_probe.json").write_text(json.dumps(result, indent=1))
    md = ["# Per-token linear probe (organ at the token's centre)", "", f"Pretrained encoder: `{init}`", "",
          "| encoder | accuracy | balanced accuracy |", "|---|---|---|"]
    md += [f"| {n} | {result[n]['accuracy']:.4f} | {result[n]['balanced_accuracy']:.4f} |" for n in encoders]
    (out / "token_probe.md").write_text("\n".join(md) + "\n")
    return result
