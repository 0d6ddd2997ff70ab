"""Forward-pass cost with glibc's default heap against the worker's retained heap, A/B.

    python -m scripts.bench_heap [--arch densenet121 vgg16] [--batch-size 8] [--crop-size 224] \\
        [--threads 2] [--rounds 3] [--batches 6]

Each round runs one fresh process per setting, alternating (default, retained), so both see the
same minute of this shared machine. Each process builds the model (random weights: speed only),
warms up with 2 batches, then times ``--batches`` forward passes on one channels_last float32
batch and prints per batch: wall ms, user and system CPU ms, minor page faults, and the process's
peak RSS (``getrusage``). "retained" is ``handler.backends.retain_heap(--retain-heap-mb)``, as a
worker applies it at load (``model-config.yaml handler.retain_heap_mb``). Figures only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from handler.settings import DEFAULT_RETAIN_HEAP_MB
from handler.backends import retain_heap
from training.models import build_model

ROOT = Path(__file__).resolve().parent.parent


def measure(arch: str, batch_size: int, crop_size: int, threads: int, batches: int, retain_mb: int) -> dict:
    """Per-batch figures of ``batches`` forward passes in this process (see the module doc)."""
    retained = retain_heap(retain_mb)
    torch.set_num_threads(threads)
    model = build_model(arch, 6).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, crop_size, crop_size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(batches):
            model(x)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"arch": arch, "heap": "retained" if retained else "default",
            "ms_per_batch": round(1000 * wall / batches),
            "user_ms": round(1000 * (after.ru_utime - before.ru_utime) / batches),
            "sys_ms": round(1000 * (after.ru_stime - before.ru_stime) / batches, 1),
            "minor_faults": round((after.ru_minflt - before.ru_minflt) / batches),
            "peak_rss_mb": after.ru_maxrss // 1024}


def main(args) -> list[dict]:
    rows = []
    for arch in args.arch:
        for _ in range(args.rounds):
            for retain_mb in (0, args.retain_heap_mb):
                out = subprocess.run(
                    [sys.executable, "-m", "scripts.bench_heap", "--measure", "--arch", arch, "--retain-heap-mb",
                     str(retain_mb), "--batch-size", str(args.batch_size), "--crop-size",
                     str(args.crop_size), "--threads", str(args.threads), "--batches", str(args.batches)],
                    capture_output=True, text=True, check=True, cwd=ROOT).stdout
                row = json.loads(out.splitlines()[-1])
                print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
                rows.append(row)
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["densenet121", "vgg16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="A/B pairs per architecture")
    p.add_argument("--batches", type=int, default=6, help="timed forward passes per process")
    p.add_argument("--retain-heap-mb", type=int, default=DEFAULT_RETAIN_HEAP_MB)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    if a.measure:
        print(json.dumps(measure(a.arch[0], a.batch_size, a.crop_size, a.threads, a.batches,
                                 a.retain_heap_mb)))
    else:
        main(a)
