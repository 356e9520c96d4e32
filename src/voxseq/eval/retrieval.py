"""Retrieval evaluation of SigVLP embeddings: volume -> report and report -> volume recall@k, volume -> volume
MAP@k over the binary labels every volume carries (relevant: at least one shared positive label), and the
Markdown report. Metrics are ``voxseq.eval.metrics``; ``voxseq.tasks.eval_vlp`` wires checkpoints and caches."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from voxseq.eval.metrics import l2_normalise, paired_retrieval, retrieval_report, volume_retrieval_report
from voxseq.eval.zero_shot import organ_tiles


def sentence_tile_similarity(tile_emb: list[np.ndarray], tile_organs: list[list[list[str]]] | None,
                             reports: list[list[tuple[str | None, int]]], sentence_emb: np.ndarray, k: int = 3
                             ) -> np.ndarray:
    """(R, V) similarity of each report to each volume by its sentences: a report is a list of (organ or None,
    sentence row of ``sentence_emb``); each sentence is matched to the volume's tiles that show its organ (every
    tile when it names none, the organs are unknown or no tile shows it) by the mean of the ``k`` highest
    cosine similarities, and a report's similarity is the mean over its sentences. A report of the lungs and
    the heart then looks for them where the volume shows lungs and heart, instead of in one whole-volume vector."""
    sent = l2_normalise(sentence_emb)
    out = np.zeros((len(reports), len(tile_emb)))
    for v, emb in enumerate(tile_emb):
        cos = l2_normalise(emb) @ sent.T  # (tiles, S)
        pooled: dict[tuple[str | None, int], float] = {}
        for r, report in enumerate(reports):
            total = 0.0
            for organ, row in report:
                if (organ, row) not in pooled:
                    rows = organ_tiles(tile_organs[v] if tile_organs is not None else None, organ)
                    col = cos[rows, row] if rows else cos[:, row]
                    pooled[(organ, row)] = float(np.sort(col)[-k:].mean())
                total += pooled[(organ, row)]
            out[r, v] = total / max(1, len(report))
    return out


def retrieval_results(img: np.ndarray, txt: np.ndarray | None, truth: np.ndarray | None, labels: list[str],
                      ks: Sequence[int], sim: np.ndarray | None = None) -> dict[str, Any]:
    """Volume (N, D) and report (N, D) embeddings, paired by row -> recall@k both ways and chance (``sim``: a
    given (N, N) volume x report similarity instead of the embeddings' cosine); with ``truth`` (N, K) 0/1 of
    ``labels``, volume -> volume MAP@k too (by the volume embeddings)."""
    n = len(img)
    rep = retrieval_report(img, txt, ks) if sim is None else paired_retrieval(sim, ks)
    result = {"n": n, **rep, "chance": {f"R@{k}": min(k, n) / n for k in ks}}
    if labels:
        vv = volume_retrieval_report(img, truth, ks)
        result.update({"volume_to_volume": vv["volume_to_volume"], "volume_to_volume_chance": vv["chance"],
                       "volume_to_volume_labels": labels, "volume_to_volume_queries": vv["queries"],
                       "volume_to_volume_relevant_fraction": vv["relevant_fraction"],
                       "volume_to_volume_relevance": "shares at least one positive label"})
    return result


def retrieval_markdown(result: dict[str, Any], ks: Sequence[int]) -> str:
    """retrieval.md: recall@k both ways against chance, and the volume -> volume MAP@k table."""
    n, labels = result["n"], result.get("volume_to_volume_labels", [])
    how = {"organ": "each report sentence matched to the tiles showing its organ (top-k cosine), averaged over "
                    "the report's sentences", "volume": "one embedding per whole volume against one per report"}
    lines = [f"# Retrieval ({n} volumes and their reports)", "", f"checkpoint: `{result['checkpoint']}`", "",
             f"Scored by: {how.get(result.get('aggregate', 'volume'), result.get('aggregate'))}.", "",
             "| direction | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for d in ("volume_to_report", "report_to_volume"):
        lines.append(f"| {d.replace('_', ' ')} | " + " | ".join(f"{result[d][f'R@{k}']:.3f}" for k in ks) + " |")
    lines.append("| chance | " + " | ".join(f"{result['chance'][f'R@{k}']:.3f}" for k in ks) + " |")
    if labels and not result["volume_to_volume_queries"]:
        lines += ["", f"No volume shares a positive label ({', '.join(labels)}) with another: no volume -> volume MAP@k."]
    elif labels:
        lines += ["", f"## Volume -> volume MAP@k ({result['volume_to_volume_queries']} queries)", "",
                  f"Two volumes are relevant to each other when they share at least one positive label among "
                  f"{', '.join(labels)}; each volume with such a neighbour queries all the others. AP@k divides by "
                  f"min(k, relevant volumes); chance is the exact MAP@k of a random ranking.", "",
                  "| | " + " | ".join(f"MAP@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|",
                  "| volume to volume | " + " | ".join(f"{result['volume_to_volume'][f'MAP@{k}']:.3f}" for k in ks) + " |",
                  "| chance | " + " | ".join(f"{result['volume_to_volume_chance'][f'MAP@{k}']:.3f}" for k in ks) + " |"]
    else:
        lines += ["", "No binary label carried by every volume: no volume -> volume MAP@k."]
    return "\n".join(lines) + "\n"


__all__ = ["retrieval_markdown", "retrieval_results", "sentence_tile_similarity"]
