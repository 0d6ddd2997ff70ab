"""Train-time augmentation. Evaluation re-uses ``handler.preprocessing.EvalTransform``."""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T


class ClassificationPresetTrain:
    """Random-resized crop, horizontal flip, optional TrivialAugment, normalize.

    After torchvision's references/classification/presets.py ``ClassificationPresetTrain``.
    Input: RGB PIL image. Output: float32 tensor [3, crop_size, crop_size].
    """

    def __init__(self, *, crop_size: int, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear", scale: tuple[float, float] = (0.25, 1.0),
                 hflip_prob: float = 0.5, auto_augment: str = "none"):
        mode = InterpolationMode(interpolation)
        steps = [T.RandomResizedCrop(crop_size, scale=scale, interpolation=mode, antialias=True)]
        if hflip_prob > 0:
            steps.append(T.RandomHorizontalFlip(hflip_prob))
        if auto_augment == "ta_wide":
            steps.append(T.TrivialAugmentWide(interpolation=mode))
        elif auto_augment != "none":
            raise ValueError(f"unknown auto_augment {auto_augment!r} (none, ta_wide)")
        steps += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
        self.transforms = T.Compose(steps)

    def __call__(self, img):
        return self.transforms(img)
