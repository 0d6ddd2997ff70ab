"""Learning curves and the test report (scikit-learn metrics, matplotlib plots)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, confusion_matrix  # noqa: E402

if TYPE_CHECKING:
    from PIL import Image


def plot_learning_curves(history: list[dict], path: Path) -> None:
    """``learning_curves_figure`` saved as a PNG."""
    fig = learning_curves_figure(history)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def learning_curves_figure(history: list[dict]):
    """Loss and accuracy per epoch, train vs val (a matplotlib Figure, two Axes).

    The epoch with the best val accuracy (the one ``checkpoint_best.pt`` keeps) is marked on both
    panels. A first-epoch loss more than twice every later one (a warm-up spike) is left off the
    loss axis, with its value written at the top, so that it does not flatten the rest.
    """
    epochs = [h["epoch"] for h in history]
    best = max(history, key=lambda h: h["val_accuracy"])
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=split)
        ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], marker="o", label=split)
    losses = [[h[f"{split}_loss"] for split in ("train", "val")] for h in history]
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    if len(history) > 2 and max(losses[0]) > 2 * max(max(later) for later in losses[1:]):
        top = 1.15 * max(max(later) for later in losses[1:])
        ax_loss.set_ylim(0, top)
        ax_loss.annotate(f"epoch {epochs[0]}: {max(losses[0]):.2f} (off the axis)",
                         (epochs[0], top), xytext=(4, -12), textcoords="offset points", fontsize=8)
    lowest = min(h[f"{split}_accuracy"] for h in history for split in ("train", "val"))
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="Accuracy",
               ylim=(max(0.0, lowest - 0.05), 1.0))  # pretrained runs live between 0.9 and 1
    for ax in (ax_loss, ax_acc):
        ax.axvline(best["epoch"], color="gray", linestyle="--",
                   label=f"best val: epoch {best['epoch']} ({best['val_accuracy']:.3f})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def topk_figure(rows: Sequence[tuple[str, "Image.Image", list[dict]]]):
    """Each photo next to its top-k as horizontal bars (a matplotlib Figure, a row per photo).

    Args:
        rows: ``(title, upright RGB PIL image, top-k records)`` per photo; records as
            ``handler.postprocessing.topk_records`` gives them (most likely first).
    """
    k = max(len(records) for _, _, records in rows)
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 0.6 + max(2.6, 0.45 * k) * len(rows)),
                             gridspec_kw={"width_ratios": [1, 1.4]}, squeeze=False)
    for (title, image, records), (ax_img, ax_bar) in zip(rows, axes):
        ax_img.imshow(image)
        ax_img.set_title(title, fontsize=9)
        ax_img.axis("off")
        labels = [r["label"] for r in records][::-1]  # most likely on top
        probs = [100 * r["probability"] for r in records][::-1]
        colors = ["#2271b1"] * (len(records) - 1) + ["#00a32a"]
        bars = ax_bar.barh(range(len(records)), probs, color=colors)
        ax_bar.set_yticks(range(len(records)), labels)
        ax_bar.bar_label(bars, labels=[f"{p:.1f} %" for p in probs], padding=3, fontsize=9)
        ax_bar.set(xlim=(0, 115), xlabel="probability (%)")
        ax_bar.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def plot_topk(rows: Sequence[tuple[str, "Image.Image", list[dict]]], path: Path) -> None:
    """``topk_figure`` saved as a PNG."""
    fig = topk_figure(rows)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_head_fit(table: list[dict], path: Path) -> None:
    """Train and val accuracy of the feature head against its inverse L2 strength ``C``
    (log scale), the chosen ``C`` marked, as a PNG."""
    cs = [row["C"] for row in table]
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "val"):
        ax.plot(cs, [row[f"{split}_accuracy"] for row in table], marker="o", label=split)
    chosen = next(row for row in table if row.get("chosen"))
    ax.axvline(chosen["C"], color="gray", linestyle="--",
               label=f"chosen C={chosen['C']:g} (val {chosen['val_accuracy']:.3f})")
    ax.set(xscale="log", xlabel="C (inverse L2 strength)", ylabel="top-1 accuracy",
           title="Linear head on frozen features")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_test_report(targets: torch.Tensor, probs: torch.Tensor, classes: Sequence[str],
                      out: Path) -> dict:
    """Writes ``test_report.json``, ``classification_report.txt`` and ``confusion_matrix.png``.

    Args:
        targets: int64 [N] true class indices.
        probs: float32 [N, C] softmax probabilities.
        classes: C class names in index order.

    Returns:
        The report: accuracy, per-class precision/recall/F1/support, confusion matrix
        (rows: true class, columns: predicted class).
    """
    y_true, y_pred = targets.tolist(), probs.argmax(1).tolist()
    labels = list(range(len(classes)))
    per_class = classification_report(y_true, y_pred, labels=labels, target_names=list(classes),
                                      output_dict=True, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    report = {"accuracy": float((targets == probs.argmax(1)).float().mean()),
              "num_images": len(y_true), "classes": list(classes),
              "per_class": {c: per_class[c] for c in classes},
              "macro_avg": per_class["macro avg"], "confusion_matrix": cm.tolist()}
    with open(out / "test_report.json", "w") as f:
        json.dump(report, f, indent=2)
    with open(out / "classification_report.txt", "w") as f:
        f.write(classification_report(y_true, y_pred, labels=labels, target_names=list(classes),
                                      digits=4, zero_division=0))
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 3, 1.2 * len(classes) + 2))
    ConfusionMatrixDisplay(cm, display_labels=list(classes)).plot(ax=ax, xticks_rotation=45,
                                                                  colorbar=False)
    ax.set_title(f"Test confusion matrix (accuracy {report['accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)
    return report
