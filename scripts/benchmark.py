"""Throughput and latency of the served model against its in-process limit.

    python scripts/benchmark.py --checkpoint runs/intel-scenes/checkpoint_best.pt \\
        [--images ../shared/data/intel-scenes/test] [--concurrency 1 2 4 8 16 32] [--requests 400]

1. In-process limit: the same weights' forward pass on already preprocessed tensors, at batch 1
   and at ``--batch-size``, with ``--threads`` intra-op threads, no server (eager fp32 ceiling).
2. Our handler in a real TorchServe (archive built from the checkpoint with ``--batch-size``,
   ``--max-batch-delay``, ``--workers``, ``--threads``), swept over ``--concurrency``: real photos
   sent as raw bodies over loopback HTTP; per point throughput (images/s), p50/p90/p99 latency (ms),
   errors and mean queue time (ms, from TorchServe's ``ts_queue_latency_microseconds``).

Writes ``benchmark.json`` and ``benchmark.md`` to ``--output-dir`` and prints the ratio of our
peak throughput to the in-process limit. Bounded (a fixed request count per point), loopback only.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.classify import list_images  # noqa: E402
from scripts.ts_server import ROOT, TorchServe, server_overrides  # noqa: E402
from training import archive  # noqa: E402
from training.predict import load_classifier  # noqa: E402

MODEL = "bench"


def in_process_limit(checkpoint: Path, images: list[bytes], batch_size: int, threads: int,
                     seconds: float) -> dict:
    """Forward-pass throughput on preprocessed tensors (images/s) at batch 1 and ``batch_size``."""
    torch.set_num_threads(threads)
    model, _, transform = load_classifier(checkpoint, torch.device("cpu"))
    tensors = torch.stack([transform.load(images[i % len(images)]) for i in range(batch_size)])
    out = {}
    for bs in sorted({1, batch_size}):
        x = tensors[:bs].contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                model(x)
                n += 1
            elapsed = time.perf_counter() - start
        out[bs] = {"images_per_s": round(n * bs / elapsed, 2), "ms_per_batch": round(1000 * elapsed / n, 2)}
    return out


def queue_us_total(ts: TorchServe) -> tuple[float, float]:
    """(cumulative queue time in µs, requests) for the model, from /metrics."""
    text = requests.get(f"{ts.url('metrics')}/metrics", timeout=10).text

    def total(name):
        return sum(float(m[1]) for m in re.finditer(rf'^{name}{{model_name="{MODEL}"[^}}]*}} (\S+)', text, re.M))
    return total("ts_queue_latency_microseconds"), total("ts_inference_requests_total")


def sweep_point(ts: TorchServe, images: list[bytes], concurrency: int, requests_n: int) -> dict:
    """Sends ``requests_n`` images at ``concurrency`` in flight; returns the point's figures."""
    url = f"{ts.url('inference')}/predictions/{MODEL}"
    headers = {**ts.headers("inference"), "Content-Type": "application/octet-stream"}
    local = threading.local()
    latencies, errors = [], 0
    lock = threading.Lock()

    def send(i):
        nonlocal errors
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        t = time.perf_counter()
        try:
            ok = session.post(url, data=images[i % len(images)], headers=headers, timeout=120).status_code == 200
        except requests.RequestException:
            ok = False
        with lock:
            latencies.append((time.perf_counter() - t) * 1000)
            errors += not ok
    q0, r0 = queue_us_total(ts)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, range(requests_n)))
    wall = time.perf_counter() - start
    q1, r1 = queue_us_total(ts)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"concurrency": concurrency, "requests": requests_n, "errors": errors,
            "images_per_s": round(requests_n / wall, 2), "p50_ms": round(cuts[49], 1),
            "p90_ms": round(cuts[89], 1), "p99_ms": round(cuts[98], 1),
            "queue_ms_mean": round((q1 - q0) / max(r1 - r0, 1) / 1000, 2)}


def to_markdown(result: dict) -> str:
    cfg, limit = result["config"], result["in_process_limit"]
    lines = [f"Model `{cfg['arch']}` {cfg['crop_size']} px, batchSize {cfg['batch_size']}, maxBatchDelay "
             f"{cfg['max_batch_delay']} ms, {cfg['workers']} worker(s) x {cfg['threads']} threads.", "",
             "In-process limit (preprocessed tensors, eager fp32): " + ", ".join(
                 f"batch {bs}: {v['images_per_s']} images/s ({v['ms_per_batch']} ms/batch)"
                 for bs, v in limit.items()), "",
             "| concurrency | images/s | p50 ms | p90 ms | p99 ms | queue ms | errors |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['concurrency']} | {p['images_per_s']} | {p['p50_ms']} | {p['p90_ms']} | {p['p99_ms']} "
              f"| {p['queue_ms_mean']} | {p['errors']} |" for p in result["sweep"]]
    lines += ["", f"Peak served / in-process limit at batch {cfg['batch_size']}: "
                  f"{result['ratio_peak_to_limit']:.2f}"]
    return "\n".join(lines) + "\n"


def main(args) -> dict:
    paths = [p for p, _ in list_images(args.images)][: args.max_images]
    if not paths:
        raise SystemExit(f"no images under {args.images}")
    images = [p.read_bytes() for p in paths]
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    limit = in_process_limit(args.checkpoint, images, args.batch_size, args.threads, args.limit_seconds)
    print(f"in-process limit: {limit}")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        archive.main(archive.get_args_parser().parse_args([
            "--checkpoint", str(args.checkpoint), "--model-name", MODEL, "--export-path", str(store),
            "--batch-size", str(args.batch_size), "--max-batch-delay", str(args.max_batch_delay),
            "--min-workers", str(args.workers), "--max-workers", str(args.workers),
            "--num-threads", str(args.threads)]))
        ts = TorchServe(workdir=Path(tmp) / "ts", model_store=store, models=[f"{MODEL}={MODEL}.mar"],
                        overrides=server_overrides()).start()
        try:
            ts.wait_ready([MODEL], timeout_s=300)
            sweep_point(ts, images, max(args.concurrency), min(50, args.requests))  # warm-up
            sweep = []
            for c in args.concurrency:
                point = sweep_point(ts, images, c, args.requests)
                print(json.dumps(point))
                sweep.append(point)
        finally:
            ts.stop()
    peak = max(p["images_per_s"] for p in sweep)
    result = {"config": {"arch": ckpt["arch"], "crop_size": ckpt["preprocessing"]["crop_size"],
                         "batch_size": args.batch_size, "max_batch_delay": args.max_batch_delay,
                         "workers": args.workers, "threads": args.threads, "images": len(images)},
              "in_process_limit": limit, "sweep": sweep,
              "ratio_peak_to_limit": peak / limit[args.batch_size]["images_per_s"]}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "benchmark.json").write_text(json.dumps(result, indent=2))
    (args.output_dir / "benchmark.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "intel-scenes" / "test")
    p.add_argument("--max-images", type=int, default=200, help="distinct images cycled through")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--requests", type=int, default=400, help="requests per sweep point")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batch-delay", type=int, default=5, help="ms")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per worker")
    p.add_argument("--limit-seconds", type=float, default=5.0, help="timing of each in-process point")
    p.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "benchmark")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
