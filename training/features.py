"""The fast path for small data: frozen-backbone features, computed once, and a linear head
fitted on them in seconds.

    features = cached_features(backbone, dataset, cache_dir=..., flip=True)   # once per photo
    head, table = fit_linear_head(train, val)                                 # seconds

The cache is keyed by everything the features depend on: the backbone's weights (a hash of its
state_dict), the preprocessing, the file list (path, size, mtime, label) and the augmentation,
so a second run on the same photos, or a run that changes only the head, skips extraction.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from training.amp import autocast

logger = logging.getLogger(__name__)

# Inverse L2 strengths tried for the logistic-regression head (scikit-learn's ``C``), on
# standardized features; the one with the best val accuracy wins (ties: the stronger penalty).
DEFAULT_CS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class Features:
    """Pooled backbone features of one split.

    Attributes:
        features: float32 [N, F], the head's input for each photo.
        flipped: float32 [N, F] of the horizontally flipped photos, or None.
        labels: int64 [N], class indices (``class_to_idx``).
    """

    features: np.ndarray
    flipped: Optional[np.ndarray]
    labels: np.ndarray

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Training rows: every photo, plus its flipped copy when there is one.

        Returns:
            (float32 [N or 2N, F], int64 [N or 2N]).
        """
        if self.flipped is None:
            return self.features, self.labels
        return (np.concatenate([self.features, self.flipped]),
                np.concatenate([self.labels, self.labels]))


def file_list(dataset: Dataset) -> list[tuple[str, int]]:
    """(path, label) of every sample of an ``ImageFolder`` or a ``Subset`` of one, in order."""
    if isinstance(dataset, Subset):
        return [file_list(dataset.dataset)[i] for i in dataset.indices]
    return [(str(path), int(label)) for path, label in dataset.samples]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state_dict (names, dtypes, shapes and bytes), hex."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_key(weights: str, preprocessing: dict, files: Sequence[tuple[str, int]],
              flip: bool, amp: Optional[torch.dtype] = None) -> str:
    """The cache entry name: SHA-256 over the weights digest, preprocessing, each file's path,
    size, mtime and label, the augmentation and the autocast type (``amp``; float32 features
    keep the key they had before ``--amp`` existed). Any change gives another entry."""
    stats = []
    for path, label in files:
        st = Path(path).stat()
        stats.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns, label])
    fields = {"weights": weights, "preprocessing": preprocessing, "files": stats, "flip": flip}
    if amp is not None:
        fields["amp"] = str(amp)
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@torch.inference_mode()
def extract(backbone: nn.Module, dataset: Dataset, *, flip: bool, batch_size: int = 32,
            workers: int = 0, device: torch.device = torch.device("cpu"),
            desc: str = "features", amp: Optional[torch.dtype] = None) -> Features:
    """Runs ``backbone`` (eval mode) over ``dataset``; under autocast to ``amp`` when given
    (``training/amp.py``: the type ``--amp`` chose for training), features stored as float32.

    Args:
        backbone: maps float32 [B, 3, H, W] to float32 [B, F] (the model with its head set to
            ``nn.Identity``, ``training.models.set_head``).
        dataset: yields (float32 [3, H, W] eval-transformed image, int label).
        flip: also run each batch flipped left-right (the flipped copy of a photo is a
            photo of the same class; a cheap extra training row).
    """
    backbone.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    feats, flipped, labels = [], [], []
    for images, targets in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):  # no bar off a terminal
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            feats.append(backbone(images).float().cpu())
            if flip:
                flipped.append(backbone(images.flip(3)).float().cpu())
        labels.append(targets)
    return Features(torch.cat(feats).numpy(), torch.cat(flipped).numpy() if flip else None,
                    torch.cat(labels).numpy().astype(np.int64))


def cached_features(backbone: nn.Module, dataset: Dataset, *, preprocessing: dict,
                    cache_dir: Optional[Path], flip: bool, weights: Optional[str] = None,
                    **kwargs) -> Features:
    """``extract`` through an on-disk cache (``cache_dir/<key>.npz``; None: no cache).

    Args:
        weights: the backbone's ``weights_digest`` (computed when None).
        kwargs: passed to ``extract``.
    """
    if cache_dir is None:
        return extract(backbone, dataset, flip=flip, **kwargs)
    key = cache_key(weights or weights_digest(backbone), preprocessing, file_list(dataset), flip,
                    kwargs.get("amp"))
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            logger.info("%s: %d cached feature rows from %s", kwargs.get("desc", "features"),
                        len(z["labels"]), path)
            return Features(z["features"], z["flipped"] if flip else None, z["labels"])
    found = extract(backbone, dataset, flip=flip, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=found.features, labels=found.labels,
             flipped=found.flipped if flip else np.zeros((0,), np.float32))
    tmp.replace(path)
    return found


def fit_linear_head(train: Features, val: Features, *, cs: Sequence[float] = DEFAULT_CS,
                    seed: int = 0) -> tuple[nn.Linear, list[dict]]:
    """Fits a multinomial logistic-regression head (scikit-learn, L-BFGS) on frozen features.

    Features are standardized with the train rows' mean and std; each ``C`` in ``cs`` is
    fitted on the train rows (flipped copies included) and scored on ``val``'s unflipped
    rows, the way the served model sees them. The standardization is folded into the
    returned layer: ``W' = W / std``, ``b' = b - W' @ mean``.

    Returns:
        (``nn.Linear(F, C)`` float32, giving the chosen fit's logits from raw features;
        one ``{"C", "train_accuracy", "val_accuracy", "fit_s"}`` row per ``C``, with
        ``"chosen": True`` on the winner: best val accuracy, ties to the smaller ``C``).
    """
    import time

    from sklearn.linear_model import LogisticRegression

    x, y = train.rows()
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs, vs = (x - mean) / std, (val.features - mean) / std
    table, best = [], None
    for c in cs:
        start = time.perf_counter()
        clf = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(xs, y)
        row = {"C": c, "train_accuracy": float((clf.predict(xs) == y).mean()),
               "val_accuracy": float((clf.predict(vs) == val.labels).mean()),
               "fit_s": time.perf_counter() - start}
        table.append(row)
        logger.info("head C=%g: train %.4f val %.4f (%.1f s)", c, row["train_accuracy"],
                    row["val_accuracy"], row["fit_s"])
        if best is None or row["val_accuracy"] > best[0]["val_accuracy"]:
            best = (row, clf)
    best[0]["chosen"] = True
    return linear_from_sklearn(best[1], mean, std), table


def refit_linear_head(rows: Sequence[Features], c: float, *, seed: int = 0) -> nn.Linear:
    """Fits the head again with a chosen ``C`` on several splits' rows (e.g. train + val,
    once ``C`` was chosen on val)."""
    from sklearn.linear_model import LogisticRegression

    parts = [f.rows() for f in rows]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    mean, std = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit((x - mean) / std, y)
    return linear_from_sklearn(clf, mean, std)


def linear_from_sklearn(clf, mean: np.ndarray, std: np.ndarray) -> nn.Linear:
    """``nn.Linear`` giving ``clf``'s class logits on ``(x - mean) / std`` from raw ``x``.

    For two classes scikit-learn keeps one row ``z`` (the log-odds of class 1); the layer
    then outputs ``[-z/2, z/2]``, whose softmax is the same probability.
    """
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    weight = coef / std[None, :]
    bias = intercept - weight @ mean
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        layer.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return layer
