"""Fine-tune a torchvision or timm classifier on an ImageFolder (train/ [val/] [test/]).

    python -m training.train --data-dir DATA --output-dir runs/NAME [--arch densenet121] ...
    python -m training.train --data-dir DATA --output-dir runs/NAME \
        --arch tf_efficientnet_lite0 --weights package --head-from-features   # the fast path

With ``--head-from-features`` the new head is first fitted on frozen-backbone features
(``training/features.py``: computed once per photo and cached, flipped copies as extra rows,
logistic regression with its L2 strength chosen on val), then the whole network is optionally
fine-tuned for ``--epochs`` (backbone at ``--lr * --backbone-lr-scale``).

Data-parallel on several processes (CPUs or GPUs): ``torchrun --nproc_per_node=N -m
training.train ...`` (DistributedDataParallel; each process takes its shard of every epoch,
``--batch-size`` images per process per step; gradients averaged; gloo on CPU, nccl on GPU).
The head is fitted once, on rank 0, and DDP hands its weights to the other ranks; rank 0
evaluates and writes every output.

Writes to ``--output-dir``: ``args.yaml``, ``checkpoint_best.pt`` (by val accuracy),
``checkpoint_last.pt``, ``history.csv``/``history.json``, ``learning_curves.png`` and, when
``test/`` exists, ``test_report.json``, ``classification_report.txt``, ``confusion_matrix.png``.
Layout after torchvision's references/classification/train.py.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from handler.backends import retain_heap
from handler.preprocessing import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from handler.settings import DEFAULT_RETAIN_HEAP_MB
from training.amp import AMP_CHOICES, DTYPES, autocast, check_mode, choose_amp, grad_scaler
from training.data import make_datasets
from training.features import (DEFAULT_CS, cached_features, fit_linear_head, refit_linear_head,
                               weights_digest)
from handler.architectures import FlipAverage, canonical_arch
from training.models import (build_model, freeze_batchnorm_stats, pretrained_preprocessing,
                             set_head, train_last)
from training.presets import ClassificationPresetTrain
from training.reports import plot_head_fit, plot_learning_curves, write_test_report

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune a torchvision image classifier",
                                add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True,
                   help="ImageFolder root with train/ and optional val/, test/")
    p.add_argument("--output-dir", type=Path, default=Path("runs/latest"), help="where outputs go")
    p.add_argument("--arch", default="densenet121",
                   help="torchvision name (densenet121, vgg16, resnet50, ...) or timm name "
                        "(tf_efficientnet_lite0, ...; timm/NAME for names both zoos have)")
    p.add_argument("--weights", default="none",
                   help="none; package (ImageNet weights from an installed package: "
                        "tf_efficientnet_lite0/1/2); DEFAULT or a torchvision weights name "
                        "(IMAGENET1K_V1; from $TORCH_HOME/hub/checkpoints or downloaded); "
                        "or a local state_dict file")
    p.add_argument("--hidden-units", type=int, default=None,
                   help="hidden layer width of the new head (default: linear head)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in the new head")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the new head")
    p.add_argument("--head-from-features", action="store_true",
                   help="fit a linear head on cached frozen-backbone features first "
                        "(logistic regression, L2 chosen on val); then --epochs of fine-tuning")
    p.add_argument("--feature-flips", action=argparse.BooleanOptionalAction, default=True,
                   help="with --head-from-features: flipped copies of the photos as extra rows")
    p.add_argument("--feature-cache", type=Path, default=Path("runs/.feature-cache"),
                   help="folder of cached features (keyed by weights, preprocessing, files)")
    p.add_argument("--head-cs", type=float, nargs="+", default=list(DEFAULT_CS),
                   help="inverse L2 strengths tried for the head; best on val wins")
    p.add_argument("--refit-on-train-val", action="store_true",
                   help="with --head-from-features: once C is chosen on val, fit the head "
                        "again on train + val")
    p.add_argument("--tta", choices=["none", "flip", "auto"], default="none",
                   help="test-time augmentation served with the model: flip averages each image "
                        "with its mirror (2x inference); auto keeps it only if it raises val accuracy")
    p.add_argument("--wise-ft", choices=["none", "auto"], default="none",
                   help="with --head-from-features and --epochs: also score on val the weights "
                        "interpolated between the fitted head's model and the fine-tuned one "
                        "(WiSE-FT), and keep the best")
    p.add_argument("--wise-ft-alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                   help="interpolation weights of the fine-tuned model tried by --wise-ft auto "
                        "(1.0, the fine-tuned model itself, is always a candidate)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default 10; with --head-from-features, "
                        "fine-tuning epochs after the head fit, default 0)")
    p.add_argument("--train-last", type=int, default=None,
                   help="train the head and only the last N stages of the backbone "
                        "(models.stages; frozen batch norms keep their statistics); "
                        "default: all")
    p.add_argument("--freeze-bn-stats", action="store_true",
                   help="batch norms normalize with their (pretrained) running statistics while "
                        "training, and keep them; their scale and shift still train")
    p.add_argument("--backbone-lr-scale", type=float, default=1.0,
                   help="backbone learning rate = --lr times this (e.g. 0.1 when fine-tuning "
                        "a pretrained backbone)")
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
    p.add_argument("--mixup-alpha", type=float, default=0.0,
                   help="MixUp on training batches, Beta(alpha, alpha) mixing (0: off)")
    p.add_argument("--cutmix-alpha", type=float, default=0.0,
                   help="CutMix on training batches (0: off); with --mixup-alpha each batch "
                        "gets one of the two at random")
    p.add_argument("--image-size", type=int, default=None,
                   help="crop size fed to the model, px (default: the pretrained weights' "
                        "input size, else 224)")
    p.add_argument("--resize-size", type=int, default=None,
                   help="eval resize of the shorter side, px (default: the weights' crop "
                        "fraction, else image-size / 0.875)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic"], default=None,
                   help="default: the weights', else bilinear")
    p.add_argument("--mean", type=float, nargs=3, default=None,
                   help="default: the weights', else ImageNet's")
    p.add_argument("--std", type=float, nargs=3, default=None,
                   help="default: the weights', else ImageNet's")
    p.add_argument("--min-crop-scale", type=float, default=0.25,
                   help="smallest area fraction of RandomResizedCrop in training")
    p.add_argument("--hflip-prob", type=float, default=0.5,
                   help="probability of a horizontal flip in training (0 for digits, text)")
    p.add_argument("--auto-augment", choices=["none", "ta_wide"], default="none",
                   help="extra train augmentation (TrivialAugmentWide)")
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="share of train/ held out (stratified) when val/ is missing")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="mixed precision for the backbone's training forward passes and the "
                        "feature extraction (autocast; evaluation stays float32): auto times a "
                        "training step with and without bf16 (fp16 on GPUs without bf16) on "
                        "this device and keeps the faster (training/amp.py)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--retain-heap-mb", type=int, default=DEFAULT_RETAIN_HEAP_MB,
                   help="free CPU heap (MiB) glibc keeps between batches instead of unmapping "
                        "it (handler.backends.retain_heap, as the workers do); 0: glibc's "
                        "defaults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-minutes", type=float, default=None,
                   help="stop starting new epochs after this much wall time")
    return p


def batch_mixing(mixup_alpha: float, cutmix_alpha: float, num_classes: int):
    """MixUp and/or CutMix for training batches, torchvision's (``transforms.v2.MixUp`` /
    ``CutMix``, as in its classification reference recipe), or None when both alphas are 0.

    Returns:
        ``mix(images float32 [N, 3, H, W], targets int64 [N]) -> (images, targets float32
        [N, num_classes])``: soft targets, which ``nn.CrossEntropyLoss`` takes as class
        probabilities.
    """
    from torchvision.transforms import v2

    mixes = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + \
            ([v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else [])
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion, optimizer,
                    device: torch.device, desc: str, *, freeze_bn_stats: bool = False,
                    mix=None, scheduler=None, amp: Optional[torch.dtype] = None,
                    scaler=None) -> dict:
    """One pass over ``loader``; ``scheduler`` (``make_scheduler``) steps after every batch.
    Returns ``{"loss", "accuracy"}`` (means over images; with ``mix`` (``batch_mixing``) the
    accuracy counts the unmixed label).

    ``amp``: the forward pass runs under autocast to this type (``training/amp.py``; None:
    float32); the loss is taken in float32. ``scaler``: the fp16 ``GradScaler``
    (``amp.grad_scaler``), which scales the loss before the backward pass and skips a step
    whose gradients overflowed.

    Batch norms of frozen stages always keep their statistics; with ``freeze_bn_stats`` all
    of them do (``models.freeze_batchnorm_stats``).
    """
    model.train()
    freeze_batchnorm_stats(model, all_norms=freeze_bn_stats)
    total_loss, correct, seen = 0.0, 0, 0
    # disable=None: no bar when the output is not a terminal (a log file, CI); rank 0 only
    bar = tqdm(loader, desc=desc, leave=False, unit="batch", disable=None if rank() == 0 else True)
    for images, targets in bar:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        labels = targets
        if mix is not None:  # soft labels: class probabilities, which the loss accepts
            images, labels = mix(images, targets)
        with autocast(device, amp):
            logits = model(images)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    if dist.is_initialized():  # the epoch's figures over every rank's shard
        sums = torch.tensor([total_loss, correct, seen], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(sums)
        total_loss, correct, seen = sums.tolist()
    return {"loss": total_loss / seen, "accuracy": correct / seen, "images": int(seen)}


def rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def init_distributed(device_name: str) -> torch.device:
    """Joins the process group torchrun describes (``WORLD_SIZE`` > 1), else does nothing.

    Returns:
        The device of this process: ``cuda:<LOCAL_RANK>`` under nccl, else as ``device_name``.
    """
    import os
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, criterion, device: torch.device,
             desc: str = "eval") -> dict:
    """Evaluates on ``loader``.

    Returns:
        ``{"loss", "accuracy", "targets": int64 [N], "probs": float32 [N, C]}``.
    """
    model.eval()
    total_loss, all_probs, all_targets = 0.0, [], []
    for images, targets in tqdm(loader, desc=desc, leave=False, unit="batch", disable=None):
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


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, warmup_epochs: int = 0,
              schedule: str = "cosine", step_size: int = 10, gamma: float = 0.1) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based), updated every batch.

    Linear warm-up from 0.1 to 1 over the first ``warmup_epochs * steps_per_epoch`` steps, then
    ``cosine`` (half a cosine from 1 to 0 at the last step; Loshchilov & Hutter, 2017, without
    restarts), ``step`` (``gamma ** (epoch // step_size)``, epochs counted after the warm-up) or
    ``none`` (1). Per batch rather than per epoch: with 6 epochs, a per-epoch warm-up holds
    epoch 1 at a tenth of the rate and then jumps to the peak (train accuracy fell from 0.93 to
    0.90 in epoch 2 of the intel-scenes demo), and a per-epoch cosine never goes below 0.1 of it.

    Returns:
        float in [0, 1]; 0 only at the cosine's last step.
    """
    warm = warmup_epochs * steps_per_epoch
    if step < warm:
        return 0.1 + 0.9 * step / warm
    if schedule == "cosine":
        main = max(1, epochs * steps_per_epoch - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / main)))
    if schedule == "step":
        return gamma ** ((step - warm) // (step_size * steps_per_epoch))
    return 1.0


def make_scheduler(args, optimizer, steps_per_epoch: int):
    """``LambdaLR`` over ``lr_factor``; call its ``step()`` after every optimizer step."""
    factor = functools.partial(lr_factor, steps_per_epoch=steps_per_epoch, epochs=args.epochs,
                               warmup_epochs=args.lr_warmup_epochs, schedule=args.lr_scheduler,
                               step_size=args.lr_step_size, gamma=args.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def _plain_args(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def eval_transform(args) -> EvalTransform:
    """The eval preprocessing: command-line values, else the pretrained weights' config
    (``models.pretrained_preprocessing``), else 224 px crop of a 256 px resize, bilinear,
    ImageNet mean/std."""
    cfg = pretrained_preprocessing(args.arch, args.weights) or {}
    crop = args.image_size or cfg.get("crop_size", 224)
    if args.resize_size:
        resize = args.resize_size
    elif args.image_size or "resize_size" not in cfg:
        resize = round(crop / 0.875) if not cfg else round(crop * cfg["resize_size"] / cfg["crop_size"])
    else:
        resize = cfg["resize_size"]
    return EvalTransform(crop_size=crop, resize_size=resize,
                         mean=args.mean or cfg.get("mean", IMAGENET_MEAN),
                         std=args.std or cfg.get("std", IMAGENET_STD),
                         interpolation=args.interpolation or cfg.get("interpolation", "bilinear"))


def fit_head_from_features(args, model: nn.Module, eval_tf: EvalTransform,
                           device: torch.device, amp: Optional[torch.dtype] = None
                           ) -> tuple[list[dict], dict]:
    """The fast path: fits the linear head on cached frozen-backbone features, in place.
    ``amp``: the features are extracted under autocast to it (``--amp``'s choice).

    Returns:
        (the head-fit table, one row per C; ``{"val": probs float32 [N, C], "targets"}``
        of the chosen head on val, and the same for test when there is a test/ folder and no
        fine-tuning follows).
    """
    if args.hidden_units:
        raise ValueError("--head-from-features fits a linear head: drop --hidden-units")
    train_ds, val_ds, test_ds, _ = make_datasets(args.data_dir, eval_tf, eval_tf,
                                                 val_fraction=args.val_fraction, seed=args.seed)
    head = set_head(model, nn.Identity())
    linear = head[-1] if isinstance(head, nn.Sequential) else head  # (Dropout, Linear)
    model.eval()
    kw = dict(preprocessing=eval_tf.to_dict(), cache_dir=args.feature_cache,
              weights=weights_digest(model), batch_size=args.batch_size, workers=args.workers,
              device=device, amp=amp)
    train = cached_features(model, train_ds, flip=args.feature_flips, desc="train features", **kw)
    val = cached_features(model, val_ds, flip=args.feature_flips and args.refit_on_train_val,
                          desc="val features", **kw)
    # test/ is scored on features only when the head is the whole training; fine-tuning scores
    # the fine-tuned model on the photos instead (750 of 4,800 feature rows for intel-scenes)
    test = (cached_features(model, test_ds, flip=False, desc="test features", **kw)
            if test_ds is not None and not args.epochs else None)
    set_head(model, head)
    fitted, table = fit_linear_head(train, val, cs=args.head_cs, seed=args.seed)
    chosen = next(row for row in table if row.get("chosen"))
    if args.refit_on_train_val:
        fitted = refit_linear_head([train, val], chosen["C"], seed=args.seed)
        logger.info("head refitted on train + val with C=%g", chosen["C"])
    linear.load_state_dict(fitted.state_dict())
    scored = {}
    for name, split in (("val", val), ("test", test)):
        if split is not None:
            with torch.inference_mode():
                logits = linear(torch.from_numpy(split.features).to(device))
            scored[name] = {"probs": logits.float().softmax(1).cpu(),
                            "targets": torch.from_numpy(split.labels)}
    return table, scored


def main(args) -> dict:
    """Trains, keeps the best checkpoint by val accuracy, evaluates it on test/.

    Returns:
        The best checkpoint's metrics dict (``best_val_accuracy``, ``epoch``, and
        ``test_accuracy`` when test/ exists).
    """
    device = init_distributed(args.device)
    lead = rank() == 0  # rank 0 fits the head, evaluates and writes every output
    logging.basicConfig(level=logging.INFO if lead else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    # Before the data and the model are loaded; data-loading processes fork with it. Without
    # it every batch's activations come from fresh mmap pages: Lite0 at 160 px extracted
    # features at 76-100 images/s instead of 150-180 and trained at 41 instead of 49 (2 cores,
    # AVX-512).
    heap = retain_heap(args.retain_heap_mb)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    args.arch = canonical_arch(args.arch)
    if args.epochs is None:
        args.epochs = 0 if args.head_from_features else 10
    if args.wise_ft != "none" and not (args.head_from_features and args.epochs > 0):
        raise ValueError("--wise-ft interpolates the fitted head's model and the fine-tuned one: "
                         "it needs --head-from-features and --epochs > 0")
    check_mode(args.amp, device)  # before minutes of feature extraction
    out = args.output_dir
    eval_tf = eval_transform(args)
    logger.info("%s, weights %s, preprocessing %s, %s", args.arch, args.weights, eval_tf.to_dict(),
                f"{args.retain_heap_mb} MiB of free heap retained" if heap else "glibc heap defaults")
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "args.yaml", "w") as f:
            yaml.safe_dump(_plain_args(args), f, sort_keys=False)

    train_tf = ClassificationPresetTrain(crop_size=eval_tf.crop_size, mean=eval_tf.mean,
                                         std=eval_tf.std, interpolation=eval_tf.interpolation,
                                         scale=(args.min_crop_scale, 1.0),
                                         hflip_prob=args.hflip_prob,
                                         auto_augment=args.auto_augment)
    train_ds, val_ds, test_ds, classes = make_datasets(
        args.data_dir, train_tf, eval_tf, val_fraction=args.val_fraction, seed=args.seed)
    logger.info("classes (%d): %s | train %d, val %d, test %s", len(classes), classes,
                len(train_ds), len(val_ds), len(test_ds) if test_ds is not None else "none")

    loader_kw = dict(batch_size=args.batch_size, num_workers=args.workers,
                     pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    model = build_model(args.arch, len(classes), weights=args.weights,
                        hidden_units=args.hidden_units, dropout=args.dropout,
                        freeze_backbone=args.freeze_backbone)
    if args.train_last is not None:
        logger.info("training the head and the last %d stages: %s", args.train_last,
                    train_last(model, args.train_last))
    model = model.to(device, memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    def checkpoint(epoch: int, metrics: dict) -> dict:
        return {"model": model.state_dict(), "arch": args.arch, "num_classes": len(classes), "tta": None,
                "head": {"hidden_units": args.hidden_units, "dropout": args.dropout},
                "class_names": list(classes), "preprocessing": eval_tf.to_dict(),
                "args": _plain_args(args), "epoch": epoch, "metrics": metrics}

    history, best_acc, best_metrics, steps, sampler = [], -1.0, {}, 0, None
    start = time.perf_counter()
    scored, head_state = {}, None
    # the backbone's forward passes (feature extraction, fine-tuning) run in --amp's type
    amp, amp_record = None, {"mode": args.amp, "chosen": "none", "reason": "nothing to train"}
    if args.head_from_features or args.epochs > 0:
        amp, amp_record = choose_training_amp(args, model, eval_tf.crop_size, len(classes),
                                             criterion, device)
    if args.head_from_features and lead:  # DDP below hands the fitted head to the other ranks
        table, scored = fit_head_from_features(args, model, eval_tf, device, amp)
        chosen = next(row for row in table if row.get("chosen"))
        best_acc = chosen["val_accuracy"]
        best_metrics = {"best_val_accuracy": best_acc, "epoch": 0, "head_C": chosen["C"],
                        "head_fit": table, "refit_on_train_val": args.refit_on_train_val,
                        "amp": amp_record}
        torch.save(checkpoint(0, best_metrics), out / "checkpoint_best.pt")
        with open(out / "head_fit.json", "w") as f:
            json.dump(table, f, indent=2)
        plot_head_fit(table, out / "head_fit.png")
        logger.info("head fitted on features in %.1f s: val %.4f (C=%g)",
                    time.perf_counter() - start, best_acc, chosen["C"])
        if args.wise_ft != "none":
            head_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    if not args.head_from_features and args.epochs == 0 and lead:
        # nothing to train: the model is kept as built (a pretrained backbone with a random head,
        # or random weights), e.g. to measure an architecture's speed in the benchmark
        va = evaluate(model, DataLoader(val_ds, shuffle=False, **loader_kw), criterion, device, "val")
        best_acc = va["accuracy"]
        best_metrics = {"best_val_accuracy": best_acc, "val_loss": va["loss"], "epoch": 0,
                        "amp": amp_record}
        torch.save(checkpoint(0, best_metrics), out / "checkpoint_best.pt")
        logger.warning("--epochs 0 without --head-from-features: the model is saved as built, "
                       "its head untrained (val accuracy %.4f)", best_acc)

    if args.epochs > 0:
        # one model over every rank: DDP broadcasts rank 0's weights (the fitted head) at start
        # and averages the gradients; each rank takes its shard of every epoch
        train_model = DistributedDataParallel(model) if dist.is_initialized() else model
        sampler = (DistributedSampler(train_ds, shuffle=True, seed=args.seed)
                   if dist.is_initialized() else None)
        train_loader = DataLoader(train_ds, shuffle=sampler is None, sampler=sampler,
                                  drop_last=len(train_ds) > args.batch_size * max(1, _world()),
                                  generator=torch.Generator().manual_seed(args.seed), **loader_kw)
        val_loader = DataLoader(val_ds, shuffle=False, **loader_kw)
        head_ids = {id(p) for p in (model.get_submodule(model.head_name).parameters())}
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) in head_ids]},
                  {"params": [p for p in trainable if id(p) not in head_ids],
                   "lr": args.lr * args.backbone_lr_scale}]
        optimizer = make_optimizer(args, [g for g in groups if g["params"]])
        scheduler = make_scheduler(args, optimizer, len(train_loader))
        mix = batch_mixing(args.mixup_alpha, args.cutmix_alpha, len(classes))
        scaler = grad_scaler(device, amp)
        best_metrics["amp"] = amp_record
        scored = {}  # fine-tuning changes the model: score it again below
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        if sampler is not None:
            sampler.set_epoch(epoch)
        tr = train_one_epoch(train_model, train_loader, criterion, optimizer, device,
                             f"epoch {epoch}/{args.epochs}", freeze_bn_stats=args.freeze_bn_stats,
                             mix=mix, scheduler=scheduler, amp=amp, scaler=scaler)
        steps += len(train_loader)
        if not lead:
            if _stop_from_rank0(False):
                break
            continue
        va = evaluate(model, val_loader, criterion, device, "val")
        row = {"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
               "val_loss": va["loss"], "val_accuracy": va["accuracy"],
               "epoch_s": time.perf_counter() - t0}
        history.append(row)
        logger.info("epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s",
                    epoch, tr["loss"], tr["accuracy"], va["loss"], va["accuracy"], row["epoch_s"])
        if va["accuracy"] > best_acc:
            best_acc = va["accuracy"]
            best_metrics = {"best_val_accuracy": best_acc, "val_loss": va["loss"], "epoch": epoch,
                            "amp": amp_record}
            torch.save(checkpoint(epoch, best_metrics), out / "checkpoint_best.pt")
        torch.save(checkpoint(epoch, {"val_accuracy": va["accuracy"]}), out / "checkpoint_last.pt")
        write_history(history, out)
        elapsed_min = (time.perf_counter() - start) / 60
        stop = bool(args.max_train_minutes and elapsed_min * (epoch + 1) / epoch > args.max_train_minutes)
        if _stop_from_rank0(stop):
            logger.info("stopping after epoch %d: next epoch would pass --max-train-minutes %.1f",
                        epoch, args.max_train_minutes)
            break
    if dist.is_initialized():
        checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
        logger.warning("rank %d of %d: %d optimizer steps, parameter checksum %.10e", rank(),
                       _world(), steps, checksum)
        dist.barrier()
        if not lead:
            dist.destroy_process_group()
            return {}
    if history:
        plot_learning_curves(history, out / "learning_curves.png")
    train_minutes = (time.perf_counter() - start) / 60

    best = torch.load(out / "checkpoint_best.pt", map_location=device, weights_only=True)
    model.load_state_dict(best["model"])
    if head_state is not None and best["epoch"] > 0:
        best["model"] = choose_wise_ft(args, model, head_state, best["model"], val_ds, loader_kw,
                                       criterion, device, best_metrics)
        best_acc = best_metrics["best_val_accuracy"]
        best["metrics"] = best_metrics
        torch.save(best, out / "checkpoint_best.pt")
    served = model
    if args.tta != "none":
        served = choose_tta(args, model, val_ds, loader_kw, criterion, device, best_metrics)
        best["tta"] = "flip" if served is not model else None
        best["metrics"] = best_metrics
        torch.save(best, out / "checkpoint_best.pt")
    if test_ds is not None:
        if "test" in scored and best["epoch"] == 0 and served is model:
            te = scored["test"]  # the head-only model: test scored on its cached features
        else:
            te = evaluate(served, DataLoader(test_ds, shuffle=False, **loader_kw), criterion,
                          device, "test")
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
    if dist.is_initialized():
        dist.destroy_process_group()
    return best_metrics


def choose_training_amp(args, model: nn.Module, crop_size: int, num_classes: int, criterion,
                        device: torch.device) -> tuple[Optional[torch.dtype], dict]:
    """``--amp``'s autocast type (``training.amp.choose_amp``), timed on rank 0 with a random
    batch (float32 [min(--batch-size, 8), 3, crop_size, crop_size], channels_last: speed does
    not depend on the values; 8 images keep the six timed passes of DenseNet121 at 224 px to
    about 6 s on 2 cores) in the mode training runs, and the same on every rank.
    """
    record = {"mode": args.amp, "chosen": "none", "reason": "rank 0's choice"}
    if rank() == 0:
        model.train()
        freeze_batchnorm_stats(model, all_norms=args.freeze_bn_stats)
        # the random state training draws from (dropout, MixUp) is left as it was
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            n = min(args.batch_size, 8)
            images = torch.randn(n, 3, crop_size, crop_size, device=device)
            images = images.contiguous(memory_format=torch.channels_last)
            targets = torch.randint(0, num_classes, (n,), device=device)
            _, record = choose_amp(args.amp, model, images, targets, criterion)
        logger.info("amp: %s", record["reason"])
    if dist.is_initialized():
        names = ("none", *DTYPES)
        code = torch.tensor([names.index(record["chosen"])], device=_comm_device())
        dist.broadcast(code, 0)
        record["chosen"] = names[int(code.item())]
    return DTYPES.get(record["chosen"]), record


def _comm_device() -> torch.device:
    """Where collective tensors live: the GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _stop_from_rank0(stop: bool) -> bool:
    """Rank 0's decision to stop training, the same on every rank."""
    if not dist.is_initialized():
        return stop
    flag = torch.tensor([int(stop)], device=_comm_device())
    dist.broadcast(flag, 0)
    return bool(flag.item())


def interpolate_weights(start: dict, end: dict, alpha: float) -> dict:
    """``(1 - alpha) * start + alpha * end`` for every floating-point tensor of two state dicts
    of one architecture; other tensors (``num_batches_tracked``) are taken from ``end``."""
    return {k: torch.lerp(start[k].to(v.dtype), v, alpha) if v.is_floating_point() else v
            for k, v in end.items()}


def choose_wise_ft(args, model: nn.Module, head_state: dict, tuned_state: dict, val_ds,
                   loader_kw: dict, criterion, device: torch.device, metrics: dict) -> dict:
    """WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"): weights
    interpolated between the model with the fitted head (the start of fine-tuning, alpha 0) and
    the fine-tuned one (alpha 1), scored on val; the best is loaded into ``model``.

    Both ends lie in one basin (fine-tuning started from the first), so the interpolation is a
    working network; it keeps more of the pretrained features, which is what holds up on photos
    unlike the training set. Ties go to the smaller alpha, for that reason. Records
    ``metrics["wise_ft"] = {"val_accuracy": {alpha: accuracy}, "alpha"}`` and updates
    ``metrics["best_val_accuracy"]``.

    Returns:
        The chosen state dict (``tuned_state`` itself when alpha 1 wins).
    """
    loader = DataLoader(val_ds, shuffle=False, **loader_kw)
    scores = {1.0: metrics["best_val_accuracy"]}
    for alpha in sorted(a for a in args.wise_ft_alphas if 0 <= a < 1):
        model.load_state_dict(interpolate_weights(head_state, tuned_state, alpha))
        scores[alpha] = evaluate(model, loader, criterion, device, f"val, alpha {alpha}")["accuracy"]
        logger.info("WiSE-FT alpha %.2f: val %.4f", alpha, scores[alpha])
    alpha = min(scores, key=lambda a: (-scores[a], a))
    chosen = tuned_state if alpha == 1.0 else interpolate_weights(head_state, tuned_state, alpha)
    model.load_state_dict(chosen)
    metrics["wise_ft"] = {"val_accuracy": {str(a): scores[a] for a in sorted(scores)}, "alpha": alpha}
    metrics["best_val_accuracy"] = scores[alpha]
    logger.info("WiSE-FT: alpha %.2f kept (val %.4f; fine-tuned alone %.4f)", alpha, scores[alpha],
                scores[1.0])
    return chosen


def choose_tta(args, model: nn.Module, val_ds, loader_kw: dict, criterion,
               device: torch.device, metrics: dict) -> nn.Module:
    """Scores the best model on val with and without flip test-time augmentation.

    ``--tta flip`` keeps the flips; ``--tta auto`` keeps them only when val accuracy rises.
    Records ``metrics["tta"] = {"val_accuracy", "val_accuracy_flip", "used"}``.

    Returns:
        ``FlipAverage(model)`` when flips are kept, else ``model``.
    """
    loader = DataLoader(val_ds, shuffle=False, **loader_kw)
    plain = evaluate(model, loader, criterion, device, "val")["accuracy"]
    flip = evaluate(FlipAverage(model), loader, criterion, device, "val, flipped too")["accuracy"]
    used = args.tta == "flip" or flip > plain
    metrics["tta"] = {"val_accuracy": plain, "val_accuracy_flip": flip, "used": used}
    logger.info("test-time flips: val %.4f -> %.4f: %s", plain, flip,
                "served with the model" if used else "not used")
    return FlipAverage(model) if used else model


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
