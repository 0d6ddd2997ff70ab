"""scikit-learn's handwritten digits (real scans, shipped with the package) as an ImageFolder:
the offline demo's data (``make demo``).

1797 8x8 grayscale scans of digits 0-9 (UCI optical recognition of handwritten digits),
upscaled to ``size`` px PNG, split train/val/test 60/20/20, stratified and seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def write_digits(output: Path, size: int = 32, seed: int = 0) -> dict[str, int]:
    """Writes ``output/{train,val,test}/<digit>/<index>.png``.

    Returns:
        Images written per split.
    """
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 16 grey levels -> 8 bit
    idx = np.arange(len(images))
    train, rest = train_test_split(idx, test_size=0.4, stratify=digits.target, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest],
                                 random_state=seed)
    for split, ids in (("train", train), ("val", val), ("test", test)):
        for i in ids:
            folder = Path(output) / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], "L").resize((size, size), Image.BILINEAR)
            img.save(folder / f"{i:04d}.png")
    return {"train": len(train), "val": len(val), "test": len(test)}
