"""Classify images through a running TorchServe: top-k per image, accuracy over a folder.

    python -m scripts.classify --model scenes ../shared/data/intel-scenes/test
    python -m scripts.classify --model scenes photo.jpg --topk 3

A folder with one sub-folder per class (an ImageFolder split) gives accuracy against the
folder names; every image is sent over HTTP (raw body, ``POST /predictions/<model>``).
``--output`` writes the totals, per-class accuracy, and every missed or failed image.
Exit code 1 if any request failed or accuracy is below ``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from handler.postprocessing import format_topk
from serving.inference import classify, list_images, summarize
from serving.server import ROOT, bearer


def spread(n: int, total: int) -> list[int]:
    """``n`` indices spread evenly over ``range(total)`` (the sample shown: across classes)."""
    if n <= 0 or total == 0:
        return []
    n = min(n, total)
    return sorted({round(i * (total - 1) / max(n - 1, 1)) for i in range(n)})


def main(args) -> int:
    images = list_images(args.path)
    if not images:
        print(f"error: no images under {args.path}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    answers = classify(args.url, args.model, images, headers=bearer(args.key_file, "inference"),
                       topk=args.topk, concurrency=args.concurrency)
    summary = {"model": args.model, **summarize(answers, time.perf_counter() - t0)}
    for a in (answers[i] for i in spread(args.show, len(answers))):
        print(f"\n{a.path}" + (f"  (true: {a.truth})" if a.truth else "") + f"  [{a.latency_ms:.0f} ms]")
        print(format_topk(a.body) if a.status == 200 else f"HTTP {a.status}: {a.body}")
    for failure in summary["failures"][:10]:
        print(f"FAILED {failure['path']}: HTTP {failure['status']} {failure['body']}", file=sys.stderr)
    print(f"\nsent {summary['images']} images over HTTP to {args.url.rstrip('/')}/predictions/"
          f"{args.model}: {summary['failed']} failed, {summary['images_per_s']} images/s")
    if "accuracy" in summary:
        print(f"top-1 accuracy over HTTP: {summary['correct']}/{summary['images'] - summary['failed']}"
              f" = {summary['accuracy']:.4f}; per class: " + ", ".join(
                  f"{name} {row['correct']}/{row['images']}" for name, row in summary["per_class"].items()))
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2))
    if summary["failed"] or summary.get("accuracy", 1.0) < args.min_accuracy:
        return 1
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", type=Path, help="an image, or a folder (class sub-folders give accuracy)")
    p.add_argument("--model", required=True, help="model name on the server")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="inference API")
    p.add_argument("--key-file", type=Path, default=ROOT / "key_file.json",
                   help="TorchServe key file (token authorization)")
    p.add_argument("--topk", type=int, default=None, help="k per request (default: the model's)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--show", type=int, default=5,
                   help="images whose top-k table is printed, spread over the sorted list")
    p.add_argument("--min-accuracy", type=float, default=0.0, help="fail below this accuracy")
    p.add_argument("--output", type=Path, default=None,
                   help="write the summary JSON here (totals, per class, missed images)")
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
