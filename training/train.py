"""Fine-tune a torchvision classifier on an ImageFolder (train/ [val/] [test/]).

    python -m training.train --data-dir DATA --output-dir runs/NAME [--arch densenet121] ...

Writes to ``--output-dir``: ``args.yaml``, ``checkpoint_best.pt`` (by val accuracy),
``checkpoint_last.pt``, ``history.csv``/``history.json``, ``learning_curves.png`` and, when
``test/`` exists, ``test_report.json``, ``classification_report.txt``, ``confusion_matrix.png``.
Layout after torchvision's references/classification/train.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from handler.preprocessing import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from training.data import make_datasets
from training.models import build_model
from training.presets import ClassificationPresetTrain
from training.reports import plot_learning_curves, write_test_report

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune a torchvision image classifier",
                                add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True,
                   help="ImageFolder root with train/ and optional val/, test/")
    p.add_argument("--output-dir", type=Path, default=Path("runs/latest"), help="where outputs go")
    p.add_argument("--arch", default="densenet121",
                   help="torchvision classification model name (densenet121, vgg16, resnet50, ...)")
    p.add_argument("--weights", default="none",
                   help="none, a torchvision weights name (DEFAULT, IMAGENET1K_V1) or a local state_dict file")
    p.add_argument("--hidden-units", type=int, default=None,
                   help="hidden layer width of the new head (default: linear head)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in the new head")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the new head")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--opt", choices=["sgd", "adam", "adamw"], default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-scheduler", choices=["cosine", "step", "none"], default="cosine")
    p.add_argument("--lr-step-size", type=int, default=10, help="epochs between step decays")
    p.add_argument("--lr-gamma", type=float, default=0.1, help="step decay factor")
    p.add_argument("--lr-warmup-epochs", type=int, default=0, help="linear warm-up epochs")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--image-size", type=int, default=224, help="crop size fed to the model, px")
    p.add_argument("--resize-size", type=int, default=None,
                   help="eval resize of the shorter side, px (default: image-size / 0.875)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic"], default="bilinear")
    p.add_argument("--mean", type=float, nargs=3, default=list(IMAGENET_MEAN))
    p.add_argument("--std", type=float, nargs=3, default=list(IMAGENET_STD))
    p.add_argument("--auto-augment", choices=["none", "ta_wide"], default="none",
                   help="extra train augmentation (TrivialAugmentWide)")
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="share of train/ held out (stratified) when val/ is missing")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-minutes", type=float, default=None,
                   help="stop starting new epochs after this much wall time")
    return p


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion, optimizer,
                    device: torch.device, desc: str) -> dict:
    """One pass over ``loader``. Returns ``{"loss", "accuracy"}`` (means over images)."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, unit="batch")
    for images, targets in bar:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"loss": total_loss / seen, "accuracy": correct / seen}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, criterion, device: torch.device,
             desc: str = "eval") -> dict:
    """Evaluates on ``loader``.

    Returns:
        ``{"loss", "accuracy", "targets": int64 [N], "probs": float32 [N, C]}``.
    """
    model.eval()
    total_loss, all_probs, all_targets = 0.0, [], []
    for images, targets in tqdm(loader, desc=desc, leave=False, unit="batch"):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        total_loss += criterion(logits, targets).item() * len(targets)
        all_probs.append(logits.float().softmax(1).cpu())
        all_targets.append(targets.cpu())
    probs, targets = torch.cat(all_probs), torch.cat(all_targets)
    return {"loss": total_loss / len(targets),
            "accuracy": (probs.argmax(1) == targets).float().mean().item(),
            "targets": targets, "probs": probs}


def make_optimizer(args, params):
    if args.opt == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay, nesterov=args.momentum > 0)
    if args.opt == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def make_scheduler(args, optimizer):
    """Per-epoch LR schedule: optional linear warm-up, then cosine or step decay."""
    main_epochs = max(1, args.epochs - args.lr_warmup_epochs)
    if args.lr_scheduler == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_epochs)
    elif args.lr_scheduler == "step":
        main = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_step_size, args.lr_gamma)
    else:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    if args.lr_warmup_epochs <= 0:
        return main
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1,
                                             total_iters=args.lr_warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, main],
                                                 milestones=[args.lr_warmup_epochs])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def _plain_args(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def main(args) -> dict:
    """Trains, keeps the best checkpoint by val accuracy, evaluates it on test/.

    Returns:
        The best checkpoint's metrics dict (``best_val_accuracy``, ``epoch``, and
        ``test_accuracy`` when test/ exists).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    device = resolve_device(args.device)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "args.yaml", "w") as f:
        yaml.safe_dump(_plain_args(args), f, sort_keys=False)

    eval_tf = EvalTransform(crop_size=args.image_size,
                            resize_size=args.resize_size or round(args.image_size / 0.875),
                            mean=args.mean, std=args.std, interpolation=args.interpolation)
    train_tf = ClassificationPresetTrain(crop_size=args.image_size, mean=args.mean, std=args.std,
                                         interpolation=args.interpolation,
                                         auto_augment=args.auto_augment)
    train_ds, val_ds, test_ds, classes = make_datasets(
        args.data_dir, train_tf, eval_tf, val_fraction=args.val_fraction, seed=args.seed)
    logger.info("classes (%d): %s | train %d, val %d, test %s", len(classes), classes,
                len(train_ds), len(val_ds), len(test_ds) if test_ds is not None else "none")

    loader_kw = dict(batch_size=args.batch_size, num_workers=args.workers,
                     pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    train_loader = DataLoader(train_ds, shuffle=True, drop_last=len(train_ds) > args.batch_size,
                              generator=torch.Generator().manual_seed(args.seed), **loader_kw)
    val_loader = DataLoader(val_ds, shuffle=False, **loader_kw)

    model = build_model(args.arch, len(classes), weights=args.weights,
                        hidden_units=args.hidden_units, dropout=args.dropout,
                        freeze_backbone=args.freeze_backbone)
    model = model.to(device, memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = make_optimizer(args, [p for p in model.parameters() if p.requires_grad])
    scheduler = make_scheduler(args, optimizer)

    def checkpoint(epoch: int, metrics: dict) -> dict:
        return {"model": model.state_dict(), "arch": args.arch, "num_classes": len(classes),
                "head": {"hidden_units": args.hidden_units, "dropout": args.dropout},
                "class_names": list(classes), "preprocessing": eval_tf.to_dict(),
                "args": _plain_args(args), "epoch": epoch, "metrics": metrics}

    history, best_acc, best_metrics = [], -1.0, {}
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        tr = train_one_epoch(model, train_loader, criterion, optimizer, device,
                             f"epoch {epoch}/{args.epochs}")
        scheduler.step()
        va = evaluate(model, val_loader, criterion, device, "val")
        row = {"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
               "val_loss": va["loss"], "val_accuracy": va["accuracy"],
               "epoch_s": time.perf_counter() - t0}
        history.append(row)
        logger.info("epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s",
                    epoch, tr["loss"], tr["accuracy"], va["loss"], va["accuracy"], row["epoch_s"])
        if va["accuracy"] > best_acc:
            best_acc = va["accuracy"]
            best_metrics = {"best_val_accuracy": best_acc, "val_loss": va["loss"], "epoch": epoch}
            torch.save(checkpoint(epoch, best_metrics), out / "checkpoint_best.pt")
        torch.save(checkpoint(epoch, {"val_accuracy": va["accuracy"]}), out / "checkpoint_last.pt")
        write_history(history, out)
        elapsed_min = (time.perf_counter() - start) / 60
        if args.max_train_minutes and elapsed_min * (epoch + 1) / epoch > args.max_train_minutes:
            logger.info("stopping after epoch %d: next epoch would pass --max-train-minutes %.1f",
                        epoch, args.max_train_minutes)
            break
    plot_learning_curves(history, out / "learning_curves.png")
    train_minutes = (time.perf_counter() - start) / 60

    if test_ds is not None:
        best = torch.load(out / "checkpoint_best.pt", map_location=device, weights_only=True)
        model.load_state_dict(best["model"])
        te = evaluate(model, DataLoader(test_ds, shuffle=False, **loader_kw), criterion, device, "test")
        report = write_test_report(te["targets"], te["probs"], classes, out)
        best_metrics["test_accuracy"] = report["accuracy"]
        best["metrics"] = best_metrics
        torch.save(best, out / "checkpoint_best.pt")
        logger.info("test accuracy of best checkpoint (epoch %d): %.4f",
                    best_metrics["epoch"], report["accuracy"])
    best_metrics["train_minutes"] = train_minutes
    with open(out / "metrics.json", "w") as f:
        json.dump(best_metrics, f, indent=2)
    logger.info("best val accuracy %.4f at epoch %d; %.1f min; outputs in %s",
                best_acc, best_metrics["epoch"], train_minutes, out)
    return best_metrics


def write_history(history: list[dict], out: Path) -> None:
    """Writes the per-epoch metrics to ``history.csv`` and ``history.json``."""
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    with open(out / "history.json", "w") as f:
        json.dump(history, f, indent=2)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
