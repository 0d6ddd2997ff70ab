"""Write scikit-learn's handwritten digits (real scans, shipped with the package) as an ImageFolder.

    python scripts/make_digits.py data/digits

1797 8x8 grayscale scans of digits 0-9 (UCI optical recognition of handwritten digits),
upscaled to 32x32 PNG, split train/val/test 60/20/20, stratified and seeded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main(args) -> None:
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 16 grey levels -> 8 bit
    idx = np.arange(len(images))
    train, rest = train_test_split(idx, test_size=0.4, stratify=digits.target, random_state=args.seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest],
                                 random_state=args.seed)
    for split, ids in (("train", train), ("val", val), ("test", test)):
        for i in ids:
            folder = args.output / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], "L").resize((args.size, args.size), Image.BILINEAR)
            img.save(folder / f"{i:04d}.png")
    print(f"wrote {len(train)}/{len(val)}/{len(test)} train/val/test digits to {args.output}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", type=Path)
    p.add_argument("--size", type=int, default=32, help="side of the written PNGs, px")
    p.add_argument("--seed", type=int, default=0)
    main(p.parse_args())
