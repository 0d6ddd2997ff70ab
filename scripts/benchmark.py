"""Throughput and latency of the served model against its in-process limit and the stock handler.

    python -m scripts.benchmark --checkpoint runs/intel-scenes/checkpoint_best.pt \\
        [--images ../shared/data/intel-scenes/test] [--concurrency 1 2 4 8 16 32] [--requests 400] \\
        [--backends eager onnxruntime onnxruntime-int8 bf16] [--serve eager onnxruntime-int8] \\
        [--crop-size 224 --resize-size 256] [--stock]

What is measured, and the ratios printed: ``serving/benchmark.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from handler.settings import DEFAULT_RETAIN_HEAP_MB
from handler.backends import BACKENDS
from serving.benchmark import DEFAULT_BACKEND, run
from serving.server import ROOT


def get_args_parser() -> argparse.ArgumentParser:
    data = ROOT.parent / "shared" / "data" / "intel-scenes"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--images", type=Path, default=data / "test", help="photos sent to the server")
    p.add_argument("--max-images", type=int, default=200, help="distinct images cycled through")
    p.add_argument("--accuracy-dir", type=Path, default=data / "test",
                   help="labelled ImageFolder scored in-process per back-end (skipped if missing)")
    p.add_argument("--calibration-dir", type=Path, default=None,
                   help="int8 calibration ImageFolder (default: the archive step's)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["eager", DEFAULT_BACKEND])
    p.add_argument("--serve", nargs="*", choices=BACKENDS, default=["eager", DEFAULT_BACKEND],
                   help="back-ends (of --backends) swept in TorchServe")
    p.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True,
                   help="also sweep TorchServe's stock image_classifier (needs captum, >= 5 classes)")
    p.add_argument("--crop-size", type=int, default=None,
                   help="serve at this resolution instead of the trained one (speed only)")
    p.add_argument("--resize-size", type=int, default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--requests", type=int, default=400, help="requests per sweep point")
    p.add_argument("--images-per-request", type=int, default=1,
                   help="images per request to our handler (several: one multipart file each); "
                        "the stock handler always gets one")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batch-delay", type=int, default=5, help="ms")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per worker")
    p.add_argument("--retain-heap-mb", type=int, default=DEFAULT_RETAIN_HEAP_MB,
                   help="free heap kept between batches, workers and in-process limit alike "
                        "(handler/backends.retain_heap; 0: glibc's defaults)")
    p.add_argument("--limit-seconds", type=float, default=5.0, help="timing of each in-process point")
    p.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "benchmark")
    return p


def main(args) -> dict:
    return run(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
