"""Classify images through a running TorchServe: top-k per image, accuracy over a folder.

    python scripts/classify.py --model scenes ../shared/data/intel-scenes/test
    python scripts/classify.py --model scenes photo.jpg --topk 3

A folder with one sub-folder per class (an ImageFolder split) gives accuracy against the
folder names; every image is sent over HTTP (raw body, ``POST /predictions/<model>``).
Exit code 1 if any request failed or accuracy is below ``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from handler.postprocessing import format_topk  # noqa: E402
from scripts.ts_server import ROOT  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(path: Path) -> list[tuple[Path, str | None]]:
    """(file, true label or None) for an image file, or for every image under a folder."""
    if path.is_file():
        return [(path, None)]
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, p.parent.name if p.parent != path else None) for p in files]


def auth_headers(key_file: Path) -> dict[str, str]:
    """Bearer header with the inference key from TorchServe's ``key_file.json`` ({} if absent)."""
    if not key_file.is_file():
        return {}
    return {"Authorization": f"Bearer {json.loads(key_file.read_text())['inference']['key']}"}


def main(args) -> int:
    images = list_images(args.path)
    if not images:
        print(f"error: no images under {args.path}", file=sys.stderr)
        return 1
    url = f"{args.url.rstrip('/')}/predictions/{args.model}"
    headers = {"Content-Type": "application/octet-stream", **auth_headers(args.key_file)}
    local = threading.local()

    def send(item):
        path, truth = item
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        t0 = time.perf_counter()
        files = {"data": path.read_bytes(), "topk": str(args.topk)} if args.topk else None
        if files:  # multipart carries the per-request topk
            r = session.post(url, files=files, headers={k: v for k, v in headers.items()
                                                          if k != "Content-Type"}, timeout=120)
        else:
            r = session.post(url, data=path.read_bytes(), headers=headers, timeout=120)
        return path, truth, r.status_code, r.json(), (time.perf_counter() - t0) * 1000

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(send, images))
    wall_s = time.perf_counter() - t0

    failed = [(p, code, body) for p, _, code, body, _ in results if code != 200]
    for path, truth, code, body, latency_ms in results[:args.show]:
        print(f"\n{path}" + (f"  (true: {truth})" if truth else "") + f"  [{latency_ms:.0f} ms]")
        print(format_topk(body) if code == 200 else f"HTTP {code}: {body}")
    for path, code, body in failed[:10]:
        print(f"FAILED {path}: HTTP {code} {body}", file=sys.stderr)
    labelled = [(truth, body[0]["label"]) for _, truth, code, body, _ in results
                if code == 200 and truth is not None]
    summary = {"model": args.model, "images": len(results), "failed": len(failed),
               "wall_s": round(wall_s, 2), "images_per_s": round(len(results) / wall_s, 2)}
    if labelled:
        summary["accuracy"] = sum(t == p for t, p in labelled) / len(labelled)
        summary["correct"] = sum(t == p for t, p in labelled)
    print(f"\nsent {len(results)} images over HTTP to {url}: {len(failed)} failed, "
          f"{summary['images_per_s']} images/s")
    if "accuracy" in summary:
        print(f"top-1 accuracy over HTTP: {summary['correct']}/{len(labelled)} = "
              f"{summary['accuracy']:.4f}")
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2))
    if failed or summary.get("accuracy", 1.0) < args.min_accuracy:
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
    p.add_argument("--show", type=int, default=5, help="images whose top-k table is printed")
    p.add_argument("--min-accuracy", type=float, default=0.0, help="fail below this accuracy")
    p.add_argument("--output", type=Path, default=None, help="write the summary JSON here")
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
