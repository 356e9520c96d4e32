"""`voxseq experiment label-efficiency`: pretrained versus scratch over label ratios and seeds.

Both arms use the same UNETR, the same encoder architecture and preprocessing (those of the
pretrained checkpoint), the same cache and validation cases; only the encoder's initial weights
differ. Writes ``results.json``, ``results.md`` (mean +- std Dice) and ``label_efficiency.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxseq import VoxseqError
from voxseq.tasks.finetune_seg import labelled_splits, load_seg_config, run_finetune_seg


@dataclass(frozen=True)
class Arm:
    """One encoder set-up of a comparison: where its weights come from and whether fine-tuning trains it.
    ``init`` also gives the architecture and preprocessing when ``load_weights`` is false (scratch)."""

    name: str
    init: str
    load_weights: bool = True
    freeze: bool = False


ARM_COLOURS = {"pretrained": "tab:blue", "ar": "tab:blue", "random": "tab:gray", "scratch": "tab:gray",
               "random-frozen": "tab:olive", "mae": "tab:orange", "ar-frozen": "tab:cyan"}


def run_arms(config: str | Path, out: Path, arms: list[Arm], ratios, seeds, overrides: list[str] | None,
             progress: bool, on_result, jobs: int = 1, previous: dict | None = None) -> list[dict[str, Any]]:
    """Fine-tune every arm at every label ratio and seed (``out/<arm>_r<ratio>_s<seed>``), all on one
    cache (``out/cache``); rows of ``previous`` ({(arm, ratio, seed): row}) are reused, not re-run.
    ``on_result(runs)`` is called after each finished run (tables are written as they grow). ``jobs`` > 1
    runs that many fine-tunings at once in worker processes, each with its share of the CPU threads."""
    previous = previous or {}
    todo, runs = [], []
    for ratio in ratios:
        for seed in seeds:
            for arm in arms:
                if (arm.name, ratio, seed) in previous:  # a re-run resumes the table
                    runs.append(previous[(arm.name, ratio, seed)])
                else:
                    todo.append((arm, ratio, seed))
    if todo and jobs > 1:  # one process prepares the shared cache before the workers open it
        _prepare_shared_cache(config, out, todo[0][0].init, overrides, progress)

    def row(arm: Arm, ratio: float, seed: int, r: dict[str, Any]) -> dict[str, Any]:
        return {"arm": arm.name, "ratio": ratio, "seed": seed, "mean_dice": r["val"]["mean_dice"],
                "dice_per_class": r["val"].get("dice_per_class", []), "n_train": r["n_train"],
                "seconds": r["seconds"]}

    if jobs <= 1:
        for arm, ratio, seed in todo:
            runs.append(row(arm, ratio, seed, _fine_tune_arm(config, out, arm, ratio, seed, overrides, progress)))
            on_result(runs)
        return runs
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_arm_job, str(config), str(out), arm, ratio, seed, list(overrides or []), threads):
                   (arm, ratio, seed) for arm, ratio, seed in todo}
        for f in as_completed(futures):
            arm, ratio, seed = futures[f]
            runs.append(row(arm, ratio, seed, f.result()))
            on_result(runs)
    return runs


def _fine_tune_arm(config, out: Path, arm: Arm, ratio: float, seed: int, overrides, progress: bool) -> dict[str, Any]:
    """One fine-tuning of a table: ``out/<arm>_r<ratio>_s<seed>`` on the shared cache, resumed if cut."""
    cfg = load_seg_config(config, list(overrides or []) + [
        f"label_ratio={ratio}", f"seed={seed}", f"data.cache={out / 'cache'}", f"freeze_encoder={str(arm.freeze).lower()}"])
    return run_finetune_seg(cfg, out / f"{arm.name}_r{ratio}_s{seed}", init=arm.init, load_weights=arm.load_weights,
                            progress=progress, resume=True)


def _arm_job(config: str, out: str, arm: Arm, ratio: float, seed: int, overrides: list[str], threads: int):
    """One fine-tuning in a worker process (``run_arms`` with ``jobs`` > 1)."""
    import torch

    torch.set_num_threads(threads)
    return _fine_tune_arm(config, Path(out), arm, ratio, seed, overrides, progress=False)


def _prepare_shared_cache(config, out: Path, init: str, overrides, progress: bool) -> None:
    """The comparison's cache, with the preprocessing every arm trains on (that of ``init``)."""
    from voxseq.tasks.data import ensure_cache
    from voxseq.tasks.encoders import encoder_from_checkpoint

    cfg = load_seg_config(config, list(overrides or []) + [f"data.cache={out / 'cache'}"])
    if cfg.use_init_preprocess:
        cfg.data.preprocess = encoder_from_checkpoint(init)[1]
    ensure_cache(cfg.data, out, progress)


def _earlier_rows(path: Path) -> tuple[dict[str, Any], dict[tuple, dict[str, Any]]]:
    """An experiment's earlier table (``results.json``, ``compare.json``, ...) and its runs by (arm, ratio, seed)."""
    before = json.loads(path.read_text()) if path.is_file() else {}
    return before, {(r["arm"], r["ratio"], r["seed"]): r for r in before.get("runs", [])}


def run_label_efficiency(config: str | Path, init: str | Path, out: str | Path, ratios=(0.1, 1.0), seeds=(0, 1, 2),
                         overrides: list[str] | None = None, progress: bool = True, jobs: int = 1) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _, previous = _earlier_rows(out / "results.json")
    wanted = {(arm, ratio, seed) for ratio in ratios for seed in seeds for arm in ("scratch", "pretrained")}
    kept = [r for key, r in previous.items() if key not in wanted]  # other ratios / seeds of the table stay in it
    arms = [Arm("scratch", str(init), load_weights=False), Arm("pretrained", str(init))]
    runs = run_arms(config, out, arms, ratios, seeds, overrides, progress,
                    lambda rs: write_results(out, kept + rs, str(init)), jobs, previous)
    return write_results(out, kept + runs, str(init))


def _arms_of(runs: list[dict[str, Any]]) -> list[str]:
    """Arm names in the order they first appear, scratch first."""
    names = list(dict.fromkeys(r["arm"] for r in runs))
    return sorted(names, key=lambda a: a != "scratch")


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for ratio in sorted({r["ratio"] for r in runs}):
        for arm in _arms_of(runs):
            d = [r["mean_dice"] for r in runs if r["ratio"] == ratio and r["arm"] == arm]
            if d:
                rows.append({"ratio": ratio, "arm": arm, "mean": float(np.mean(d)), "std": float(np.std(d)), "n": len(d)})
    return rows


def paired_differences(runs: list[dict[str, Any]], arm: str = "pretrained",
                       reference: str = "scratch") -> list[dict[str, Any]]:
    """Per label ratio, ``arm`` minus ``reference`` Dice paired by seed (the same labelled cases and crops):
    the differences, their mean and standard deviation (ddof 1; 0 with one seed)."""
    rows = []
    for ratio in sorted({r["ratio"] for r in runs}):
        by = {(r["arm"], r["seed"]): r["mean_dice"] for r in runs if r["ratio"] == ratio}
        seeds = sorted(s for a, s in by if a == reference and (arm, s) in by)
        if seeds:
            d = np.array([by[(arm, s)] - by[(reference, s)] for s in seeds])
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
    for arm in dict.fromkeys(r["arm"] for r in rows):
        colour = ARM_COLOURS.get(arm)
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


def fit_probe(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> dict[str, Any]:
    """Logistic regression on standardised features; accuracy, balanced accuracy and the recall of each label
    (``recall``: {label: recall} over the labels of the test tokens) on the test tokens."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    with threadpool_limits(1):  # a multi-threaded BLAS on a busy machine made each fit ~25x slower
        clf.fit(xtr, ytr)
        pred = clf.predict(xte)
    labels = sorted(int(v) for v in np.unique(yte))
    recall = recall_score(yte, pred, labels=labels, average=None, zero_division=0)
    return {"accuracy": float(accuracy_score(yte, pred)), "balanced_accuracy": float(balanced_accuracy_score(yte, pred)),
            "recall": {str(k): float(r) for k, r in zip(labels, recall)}}


def probe_encoders(config: str | Path, out: Path, encoders: dict[str, Any], pre, overrides: list[str] | None,
                   max_tokens: int, window_zyx, progress: bool, label_map: bool = True) -> dict[str, Any]:
    """The per-token probe of several encoders of one architecture at every layer, on the labelled
    volumes of a segmentation config prepared with ``pre`` (in ``out/cache`` unless the config names one).
    ``label_map=False`` probes the volumes' own labels (every phantom organ) whatever the config merges.
    Returns volume counts, ``layers`` {encoder: {layer: scores}} and ``tokens`` {encoder: token counts}."""
    from voxseq.tasks.data import ensure_cache, open_cache

    cfg = load_seg_config(config, list(overrides or []))
    cfg.data.preprocess = pre
    ensure_cache(cfg.data, out, progress)
    cache = open_cache(Path(cfg.data.cache) if cfg.data.cache else out / "cache", None,
                       cfg.data.label_map if label_map else None)
    labelled = [i for i in range(len(cache)) if cache.entry(i).get("has_label")]
    splits = labelled_splits(cache, labelled, cfg.seed)  # as fine-tuning splits them
    train = [i for i in labelled if splits[i] == "train"]
    test = [i for i in labelled if splits[i] in cfg.eval_splits]
    if not train or not test:
        raise VoxseqError(f"the probe needs labelled training and evaluation ({', '.join(cfg.eval_splits)}) volumes; "
                          f"found {len(train)} and {len(test)}")
    depth = next(iter(encoders.values())).num_layers
    layers: list = [*range(1, depth + 1), "last", "mean"]
    result: dict[str, Any] = {"n_train_volumes": len(train), "n_test_volumes": len(test), "layers": {}, "tokens": {}}
    for name, enc in encoders.items():
        rng = np.random.default_rng(0)
        xtr, ytr = token_features(enc, cache, train, max_tokens, rng, layers, window_zyx)
        xte, yte = token_features(enc, cache, test, max_tokens, rng, layers, window_zyx)
        result["layers"][name] = {str(n): fit_probe(a, ytr, b, yte) for n, a, b in zip(layers, xtr, xte)}
        result["tokens"][name] = {"train_tokens": int(len(ytr)), "test_tokens": int(len(yte))}
    return result


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
    from voxseq.tasks.encoders import embedding_setup, encoder_from_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pretrained, pre, meta, _ = encoder_from_checkpoint(init, start_token=start_token)
    headline, window_zyx = embedding_setup(pretrained, meta, layer, window)
    torch.manual_seed(0)
    encoders = {"pretrained": pretrained, "random": ViT3D(pretrained.cfg)}
    result: dict[str, Any] = {"init": str(init), "window_zyx": window_zyx, "layer": headline,
                              "start_token": pretrained.start_token is not None}
    result.update(probe_encoders(config, out, encoders, pre, overrides, max_tokens, window_zyx, progress))
    for name in encoders:
        result[name] = {**result["layers"][name][str(headline)], **result["tokens"][name]}
    (out / "token_probe.json").write_text(json.dumps(result, indent=1))
    where = describe_geometry(window_zyx)
    md = ["# Per-token linear probe (organ at the token's centre)", "", f"Pretrained encoder: `{init}`; tokens embedded "
          f"through {where}; headline layer: {headline}.", "",
          "| encoder | accuracy | balanced accuracy |", "|---|---|---|"]
    md += [f"| {n} | {result[n]['accuracy']:.4f} | {result[n]['balanced_accuracy']:.4f} |" for n in encoders]
    md += ["", "Balanced accuracy by layer (block outputs 1..depth, the final normalised output, the mean of all blocks):",
           "", "| layer | " + " | ".join(encoders) + " |", "|---|" + "---|" * len(encoders)]
    md += [f"| {n} | " + " | ".join(f"{result['layers'][e][n]['balanced_accuracy']:.4f}" for e in encoders) + " |"
           for n in result["layers"]["pretrained"]]
    (out / "token_probe.md").write_text("\n".join(md) + "\n")
    _plot_probe_layers(result, out / "probe_layers.png")
    return result


def _plot_probe_layers(result: dict[str, Any], path: Path) -> None:
    from voxseq.train.plots import _plt, save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for name, curve in result["layers"].items():
        colour = ARM_COLOURS.get(name)
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


# ---------------------------------------------------------------------------- experiment compare

COMPARE_ARMS = ("scratch", "random-frozen", "mae", "ar")


def probe_against_random(config, out: Path, loaded: dict[str, tuple], overrides, max_tokens: int,
                         progress: bool) -> dict[str, Any]:
    """The per-layer probe (every organ label, whole volumes) of checkpoint encoders ``loaded`` ({name:
    encoder_from_checkpoint(...)}) and a random encoder of the first one's architecture. ``headline_layer``
    / ``headline``: each encoder at its default embedding layer (random init at the AR run's, else the
    first's); ``best_layer`` per encoder."""
    import torch

    from voxseq.models.vit3d import ViT3D
    from voxseq.tasks.encoders import embedding_setup

    first = next(iter(loaded.values()))
    torch.manual_seed(0)
    encoders = {"random": ViT3D(first[0].cfg), **{name: enc for name, (enc, *_) in loaded.items()}}
    headline = {name: embedding_setup(enc, meta, None, "whole")[0] for name, (enc, _, meta, _) in loaded.items()}
    headline["random"] = headline.get("ar", next(iter(headline.values())))
    p = probe_encoders(config, out, encoders, first[1], overrides, max_tokens, None, progress, label_map=False)
    p["headline_layer"] = {k: str(v) for k, v in headline.items()}
    p["headline"] = {k: p["layers"][k][str(v)]["balanced_accuracy"] for k, v in headline.items()}
    p["best_layer"] = {k: max(c, key=lambda n: c[n]["balanced_accuracy"]) for k, c in p["layers"].items()}
    return p


def compare_arms(names, ar: str | None, mae: str | None) -> list[Arm]:
    """The arms of ``experiment compare``: ``scratch`` (fine-tuned from random init), ``random-frozen``
    (random encoder kept frozen, the decoder trained), ``mae`` / ``ar`` (fine-tuned from those runs) and
    ``mae-frozen`` / ``ar-frozen``. Scratch and random take the architecture and preprocessing of the AR
    run (else the MAE run)."""
    reference = ar or mae
    if reference is None:
        raise VoxseqError("experiment compare needs --ar and/or --mae (a pretraining run or checkpoint)")
    runs = {"ar": ar, "mae": mae}
    arms = []
    for name in names:
        base, frozen = (name[: -len("-frozen")], True) if name.endswith("-frozen") else (name, False)
        if base in ("scratch", "random"):
            if (base == "random") != frozen:
                raise VoxseqError(f"arm {name!r}: use 'scratch' (fine-tuned) or 'random-frozen'")
            arms.append(Arm(name, str(reference), load_weights=False, freeze=frozen))
        elif base in runs:
            if runs[base] is None:
                raise VoxseqError(f"arm {name!r} needs --{base}")
            arms.append(Arm(name, str(runs[base]), freeze=frozen))
        else:
            raise VoxseqError(f"unknown arm {name!r} (known: scratch, random-frozen, mae, ar, mae-frozen, ar-frozen)")
    if "scratch" not in [a.name for a in arms]:
        raise VoxseqError("experiment compare pairs every arm with 'scratch': keep it in --arms")
    return arms


def _check_same_setup(encoders: dict[str, tuple]) -> None:
    """Encoders compared must share architecture and preprocessing (else the table is not a comparison)."""
    (first, (enc0, pre0)), *rest = encoders.items()
    for name, (enc, pre) in rest:
        a = {k: v for k, v in vars(enc.cfg).items() if k != "start_token"}
        b = {k: v for k, v in vars(enc0.cfg).items() if k != "start_token"}
        if a != b:
            raise VoxseqError(f"the {name} and {first} encoders differ in architecture ({a} vs {b}); "
                              "compare runs of one preset")
        if pre != pre0:
            raise VoxseqError(f"the {name} and {first} runs preprocess differently ({pre} vs {pre0}); "
                              "compare runs of one preprocessing")


def run_compare(config: str | Path, out: str | Path, ar: str | Path | None = None, mae: str | Path | None = None,
                arms=COMPARE_ARMS, ratios=(0.1, 1.0), seeds=(0, 1, 2), overrides: list[str] | None = None,
                probe: bool = True, max_tokens: int = 20000, jobs: int = 1, progress: bool = True) -> dict[str, Any]:
    """Scratch, random-frozen, MAE and AR encoders through label efficiency (paired by seed against
    scratch) and the per-layer token probe, on the labelled volumes of one segmentation config.
    Writes ``compare.json``, ``compare.md``, ``label_efficiency.png`` and ``probe_layers.png``; a re-run
    reuses finished fine-tunings."""
    from voxseq.tasks.encoders import encoder_from_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ar, mae = (str(p) if p else None for p in (ar, mae))
    arm_list = compare_arms(arms, ar, mae)
    loaded = {name: encoder_from_checkpoint(path) for name, path in (("ar", ar), ("mae", mae)) if path}
    _check_same_setup({name: (enc, pre) for name, (enc, pre, _, _) in loaded.items()})
    before, previous = _earlier_rows(out / "compare.json")
    result: dict[str, Any] = {"config": str(config), "ar": ar, "mae": mae, "arms": [a.name for a in arm_list],
                              "ratios": list(ratios), "seeds": list(seeds), "overrides": list(overrides or [])}

    def write(runs: list[dict[str, Any]]) -> None:
        result["runs"] = runs
        result["summary"] = summarise(runs)
        result["paired"] = {a.name: paired_differences(runs, a.name) for a in arm_list if a.name != "scratch"}
        _write_compare(out, result)

    wanted = {(a.name, ratio, seed) for a in arm_list for ratio in ratios for seed in seeds}
    kept = [r for key, r in previous.items() if key not in wanted and key[0] in result["arms"]]  # other seeds stay
    result["probe"] = before.get("probe")  # --no-probe keeps an earlier run's probe
    if probe:  # first: it takes minutes where the fine-tunings take tens of minutes
        result["probe"] = probe_out = probe_against_random(config, out, loaded, overrides, max_tokens, progress)
        _plot_probe_layers(probe_out, out / "probe_layers.png")
        write(kept + [r for key, r in previous.items() if key in wanted])  # the probe's numbers before the runs
    # the probe prepared out/cache with the runs' preprocessing; the fine-tunings share it
    runs = run_arms(config, out, arm_list, ratios, seeds, overrides, progress, lambda rs: write(kept + rs), jobs,
                    previous)
    write(kept + runs)
    return result


def _write_compare(out: Path, result: dict[str, Any]) -> None:
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    md = ["# Encoders compared: label efficiency and per-token probe", "",
          f"Downstream config: `{result['config']}`; AR run: `{result['ar']}`; MAE run: `{result['mae']}`; "
          f"seeds {result['seeds']}.", "", "## Segmentation, mean Dice over the evaluation cases (mean +- sd over seeds)",
          "", "| label ratio | " + " | ".join(result["arms"]) + " |", "|---|" + "---|" * len(result["arms"])]
    for ratio in sorted({r["ratio"] for r in result["summary"]}):
        cells = {r["arm"]: f"{r['mean']:.4f} +- {r['std']:.4f} (n={r['n']})" for r in result["summary"] if r["ratio"] == ratio}
        md.append(f"| {ratio:g} | " + " | ".join(cells.get(a, "-") for a in result["arms"]) + " |")
    md += ["", "Minus scratch, paired by seed (mean +- sd of the differences; **bold**: above 2 sd, n >= 3):", "",
           "| arm | label ratio | differences | mean +- sd |", "|---|---|---|---|"]
    for arm, rows in result["paired"].items():
        for p in rows:
            strong = len(p["seeds"]) >= 3 and p["mean"] > 2 * p["std"]
            cell = f"{p['mean']:+.4f} +- {p['std']:.4f}"
            md.append(f"| {arm} | {p['ratio']:g} | {', '.join(f'{d:+.3f}' for d in p['differences'])} | "
                      f"{f'**{cell}**' if strong else cell} |")
    probe = result.get("probe")
    if probe:
        names = list(probe["layers"])
        md += ["", "## Per-token linear probe (organ at each token's centre), balanced accuracy", "",
               f"{probe['n_train_volumes']} training and {probe['n_test_volumes']} evaluation volumes, whole volumes. "
               "Headline: each encoder's default embedding layer (random init: the AR run's).", "",
               "| encoder | headline layer | balanced accuracy | best layer |", "|---|---|---|---|"]
        for n in names:
            best = probe["best_layer"][n]
            md.append(f"| {n} | {probe['headline_layer'][n]} | {probe['headline'][n]:.4f} | {best} "
                      f"({probe['layers'][n][best]['balanced_accuracy']:.4f}) |")
        md += ["", "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        md += [f"| {k} | " + " | ".join(f"{probe['layers'][n][k]['balanced_accuracy']:.4f}" for n in names) + " |"
               for k in probe["layers"][names[0]]]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    if result["summary"]:
        _plot(result["summary"], out / "label_efficiency.png")


# ---------------------------------------------------------------------------- experiment ablation

# Table 4 of AR-SSL4M at a CPU budget: name -> AR config overrides. The paper's "without the training
# mechanism" is standard causal attention without the random start, which here is random_start=false.
ABLATIONS: dict[str, list[str]] = {
    "full": [],
    "causal": ["random_start=false"],
    "stride4": ["sequence.stride=4"],
    "stride12": ["sequence.stride=12"],
    "spatial": ["sequence.kind_weights={spatial: 1.0}"],
    "spatial+contrast": ["sequence.kind_weights={spatial: 0.75, contrast: 0.25}"],
    # not in the paper: positions counted from the scan's origin instead of the crop's corner (docs/reproducing.md)
    "volume-positions": ["model.pos_origin=volume"],
}


def run_ablation(config: str | Path, seg_config: str | Path, out: str | Path, variants=tuple(ABLATIONS),
                 steps: int | None = None, ratio: float = 0.1, seeds=(0,), overrides: list[str] | None = None,
                 seg_overrides: list[str] | None = None, probe: bool = True, max_tokens: int = 20000, jobs: int = 1,
                 progress: bool = True) -> dict[str, Any]:
    """AR-SSL4M's Table 4 as one command: pretrain each variant of ``config`` (``ABLATIONS``; ``steps``
    overrides max_steps for all) on one shared cache, then score every encoder with the per-token probe
    (at its default layer, beside a random encoder) and by fine-tuning at ``ratio`` of the labels of
    ``seg_config`` (paired by seed against scratch). Writes ``ablation.json`` / ``.md``; finished
    pretraining runs and fine-tunings are reused on a re-run."""
    from voxseq.tasks.encoders import encoder_from_checkpoint
    from voxseq.tasks.pretrain_ar import load_ar_config, run_pretrain_ar
    from voxseq.train.checkpoint import latest_checkpoint
    from voxseq.train.metrics import loss_summary, read_metrics

    unknown = [v for v in variants if v not in ABLATIONS]
    if unknown or not variants:
        raise VoxseqError(f"unknown ablation variants {unknown} (known: {', '.join(ABLATIONS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    common = list(overrides or []) + [f"data.cache={out / 'pretrain_cache'}"] + ([f"max_steps={steps}"] if steps else [])
    result: dict[str, Any] = {"config": str(config), "seg_config": str(seg_config), "variants": {}, "ratio": ratio,
                              "seeds": list(seeds)}
    runs: dict[str, Path] = {}
    for name in variants:
        cfg = load_ar_config(config, common + ABLATIONS[name])
        run = runs[name] = out / f"pretrain_{name}"
        ck = latest_checkpoint(run) if run.exists() else None
        if ck is None or json.loads(ck.read_text())["step"] < cfg.max_steps:
            run_pretrain_ar(cfg, run, resume=ck is not None, progress=progress)
        rows = [r for r in read_metrics(run) if "loss" in r]
        result["variants"][name] = {"overrides": ABLATIONS[name], "run": str(run), "steps": cfg.max_steps,
                                    **loss_summary(rows), "seconds": sum(r.get("step_time_s", 0.0) for r in rows)}
    if probe:
        loaded = {name: encoder_from_checkpoint(run) for name, run in runs.items()}
        p = probe_against_random(seg_config, out, loaded, seg_overrides, max_tokens, progress)
        result["probe_layer"] = p["headline_layer"]["random"]  # every variant's default block (one architecture)
        result["probe"] = p["headline"]
        result["probe_layers"] = p["layers"]
    arms = [Arm("scratch", str(runs[variants[0]]), load_weights=False)] + [Arm(n, str(r)) for n, r in runs.items()]
    _, previous = _earlier_rows(out / "ablation.json")

    def write(rs: list[dict[str, Any]]) -> None:
        result["runs"] = rs
        result["summary"] = summarise(rs)
        result["paired"] = {a.name: paired_differences(rs, a.name) for a in arms[1:]}
        _write_ablation(out, result)

    write(run_arms(seg_config, out, arms, (ratio,), seeds, seg_overrides, progress, write, jobs, previous))
    return result


def _pm(row: dict[str, Any] | None, fmt: str) -> str:
    return "-" if row is None else f"{format(row['mean'], fmt)} +- {row['std']:.4f}"


def _write_ablation(out: Path, result: dict[str, Any]) -> None:
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    probe = result.get("probe", {})
    dice = {r["arm"]: r for r in result["summary"]}
    paired = {a: rows[0] for a, rows in result["paired"].items() if rows}
    md = ["# AR-SSL4M ablation (Table 4 of the paper, at a CPU budget)", "",
          f"Pretraining config: `{result['config']}`; downstream: `{result['seg_config']}` at {result['ratio']:g} of the "
          f"labels, seeds {result['seeds']}; probe at block {result.get('probe_layer', '-')}.", "",
          "| variant | overrides | pretraining loss (first -> last tenth) | probe balanced accuracy | Dice | minus scratch (paired) |",
          "|---|---|---|---|---|---|"]
    rows = [("scratch / random init", None)] + [(n, v) for n, v in result["variants"].items()]
    for name, v in rows:
        key = "scratch" if v is None else name
        loss = "-" if v is None or v.get("loss_start") is None else f"{v['loss_start']:.3f} -> {v['loss_end']:.3f}"
        pr = probe.get("random" if v is None else name)
        what = "-" if v is None else (", ".join(v["overrides"]) or "the paper setting")
        md.append(f"| {name} | {what} | {loss} | {'-' if pr is None else f'{pr:.4f}'} | {_pm(dice.get(key), '.4f')} | "
                  f"{_pm(paired.get(key), '+.4f')} |")
    (out / "ablation.md").write_text("\n".join(md) + "\n")
