"""ImageFolder datasets for train / val / test, decoded exactly as the server decodes."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable, Optional

from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

from handler.preprocessing import EvalTransform, decode_image

logger = logging.getLogger(__name__)


def load_image_file(path: str, *, draft_size: Optional[int] = None):
    """ImageFolder loader: file -> RGB PIL image through ``decode_image`` (the server's path)."""
    with open(path, "rb") as f:
        return decode_image(f.read(), draft_size=draft_size)


def image_folder(root: Path, transform: Callable, draft_size: Optional[int] = None) -> ImageFolder:
    """An ``ImageFolder`` (one sub-folder per class) using the server's decoder.

    Raises:
        FileNotFoundError: ``root`` is missing or has no class folders with images.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    return ImageFolder(str(root), transform=transform,
                       loader=functools.partial(load_image_file, draft_size=draft_size))


def make_datasets(data_dir: Path, train_transform: Callable, eval_transform: EvalTransform,
                  *, val_fraction: float = 0.25, seed: int = 0
                  ) -> tuple[Dataset, Dataset, Optional[Dataset], list[str]]:
    """Train, val and (optional) test datasets from ``data_dir/{train,val,test}``.

    When ``val/`` is missing, a stratified ``val_fraction`` of ``train/`` (seeded) is held
    out. Val and test images go through ``eval_transform`` with the same JPEG draft decode
    as the handler, so their tensors equal what the server computes.

    Returns:
        (train, val, test or None, class names in index order). Class names come from
        ``train/``'s folder names (``class_to_idx``).

    Raises:
        FileNotFoundError: no ``train/`` folder.
        ValueError: val/test folders name classes that differ from train's.
    """
    draft = eval_transform.resize_size
    # the fast path extracts train features with the eval transform: decode as the server does
    train_draft = draft if isinstance(train_transform, EvalTransform) else None
    train = image_folder(data_dir / "train", train_transform, train_draft)
    classes = train.classes
    if (data_dir / "val").is_dir():
        val = image_folder(data_dir / "val", eval_transform, draft)
    else:
        idx = list(range(len(train)))
        train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed,
                                              stratify=train.targets)
        logger.info("no val/ folder: holding out %d of %d train images (stratified, seed %d)",
                    len(val_idx), len(idx), seed)
        val = Subset(image_folder(data_dir / "train", eval_transform, draft), val_idx)
        train = Subset(train, train_idx)
    test = image_folder(data_dir / "test", eval_transform, draft) if (data_dir / "test").is_dir() else None
    for name, ds in (("val", val), ("test", test)):
        ds_classes = (ds.dataset if isinstance(ds, Subset) else ds).classes if ds is not None else classes
        if ds_classes != classes:
            raise ValueError(f"{name}/ classes {ds_classes} differ from train/ classes {classes}")
    return train, val, test, classes
