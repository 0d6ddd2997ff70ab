"""Top-k records from class probabilities. Pure functions, no TorchServe import."""

from __future__ import annotations

from typing import Sequence

import torch


def topk_records(
    probs: torch.Tensor, labels: Sequence[str], ks: Sequence[int]
) -> list[list[dict]]:
    """Turns class probabilities into per-image top-k records.

    ``k`` is clamped to the number of classes (``k = min(k, C)``, as timm's ``inference.py``
    does), so a 3-class model asked for 5 answers 3 records.

    Args:
        probs: float tensor [B, C], softmax over classes (any device).
        labels: C class names in index order (the model's ``class_to_idx`` inverted).
        ks: B requested k values, each >= 1.

    Returns:
        B lists, each of ``min(k_i, C)`` dicts ``{"label": str, "index": int,
        "probability": float}`` sorted by probability, highest first.

    Raises:
        ValueError: shape mismatch between ``probs``, ``labels`` and ``ks``, or a k < 1.
    """
    if probs.dim() != 2 or probs.shape[1] != len(labels) or probs.shape[0] != len(ks):
        raise ValueError(
            f"probs {tuple(probs.shape)} does not match {len(ks)} ks x {len(labels)} labels"
        )
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {list(ks)}")
    if probs.shape[0] == 0:
        return []
    kmax = min(max(ks), len(labels))
    values, indices = probs.detach().float().cpu().topk(kmax, dim=1)
    values, indices = values.tolist(), indices.tolist()
    return [
        [
            {"label": labels[i], "index": i, "probability": p}
            for p, i in zip(values[row][:k], indices[row][:k])
        ]
        for row, k in enumerate(ks)
    ]


def format_topk(records: list[dict]) -> str:
    """Renders top-k records as an aligned text table (rank, label, index, probability)."""
    width = max([len("label")] + [len(r["label"]) for r in records])
    lines = [f"{'rank':>4}  {'label':<{width}}  {'index':>5}  {'probability':>11}"]
    lines += [f"{rank:>4}  {r['label']:<{width}}  {r['index']:>5}  {r['probability']:>11.4f}"
              for rank, r in enumerate(records, 1)]
    return "\n".join(lines)
