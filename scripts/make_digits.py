"""Write scikit-learn's handwritten digits (real scans, shipped with the package) as an ImageFolder.

    python -m scripts.make_digits data/digits

What is written: ``training/digits.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.digits import write_digits


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("output", type=Path)
    p.add_argument("--size", type=int, default=32, help="side of the written PNGs, px")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args) -> dict[str, int]:
    counts = write_digits(args.output, args.size, args.seed)
    print(f"wrote {counts['train']}/{counts['val']}/{counts['test']} train/val/test digits "
          f"to {args.output}")
    return counts


if __name__ == "__main__":
    main(get_args_parser().parse_args())
