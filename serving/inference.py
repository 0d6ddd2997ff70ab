"""A client of TorchServe's inference API: top-k per image, accuracy over an ImageFolder split.

The CLI is ``python -m scripts.classify``.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import requests

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(path: Path) -> list[tuple[Path, Optional[str]]]:
    """(file, true label or None) for an image file, or for every image under a folder.

    Under a folder, an image's label is its parent folder's name (ImageFolder layout); images
    directly in ``path`` have none. Sorted by path.
    """
    if path.is_file():
        return [(path, None)]
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, p.parent.name if p.parent != path else None) for p in files]


@dataclass
class Answer:
    """One image's answer: HTTP status, JSON body (top-k records or the error), latency in ms."""

    path: Path
    truth: Optional[str]
    status: int
    body: object
    latency_ms: float

    @property
    def label(self) -> Optional[str]:
        """Top-1 label of a 200 answer, else None."""
        return self.body[0]["label"] if self.status == 200 and self.body else None


def classify(url: str, model: str, images: list[tuple[Path, Optional[str]]], *,
             headers: Optional[dict] = None, topk: Optional[int] = None, concurrency: int = 4,
             timeout_s: float = 120.0) -> list[Answer]:
    """Sends every image to ``POST <url>/predictions/<model>``, ``concurrency`` in flight.

    The body is the raw file (``application/octet-stream``), or multipart with a ``topk`` field
    when ``topk`` is given. One keep-alive session per thread.

    Returns:
        One ``Answer`` per image, in the order of ``images``.
    """
    endpoint = f"{url.rstrip('/')}/predictions/{model}"
    headers = dict(headers or {})
    local = threading.local()

    def send(item: tuple[Path, Optional[str]]) -> Answer:
        path, truth = item
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        data = path.read_bytes()
        t0 = time.perf_counter()
        if topk:  # multipart carries the per-request topk
            r = session.post(endpoint, files={"data": data, "topk": str(topk)}, headers=headers,
                             timeout=timeout_s)
        else:
            r = session.post(endpoint, data=data, timeout=timeout_s,
                             headers={**headers, "Content-Type": "application/octet-stream"})
        try:
            body = r.json()
        except ValueError:
            body = {"message": r.text}
        return Answer(path, truth, r.status_code, body, (time.perf_counter() - t0) * 1000)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(send, images))


def summarize(answers: list[Answer], wall_s: float) -> dict:
    """Totals, accuracy against the folder labels, and which images were missed or failed.

    Returns:
        ``{"images", "failed", "wall_s", "images_per_s"}``; with labelled images also
        ``"correct"``, ``"accuracy"`` (0..1), ``"per_class"`` (``{label: {"correct",
        "images"}}``) and ``"missed"`` (``[{"path", "truth", "predicted", "probability"}]``);
        ``"failures"``: ``[{"path", "status", "body"}]``.
    """
    failed = [a for a in answers if a.status != 200]
    summary = {"images": len(answers), "failed": len(failed), "wall_s": round(wall_s, 2),
               "images_per_s": round(len(answers) / wall_s, 2) if wall_s > 0 else None,
               "failures": [{"path": str(a.path), "status": a.status, "body": a.body}
                            for a in failed]}
    labelled = [a for a in answers if a.status == 200 and a.truth is not None]
    if labelled:
        per_class: dict[str, dict] = {}
        for a in labelled:
            row = per_class.setdefault(a.truth, {"correct": 0, "images": 0})
            row["images"] += 1
            row["correct"] += a.label == a.truth
        summary["correct"] = sum(row["correct"] for row in per_class.values())
        summary["accuracy"] = summary["correct"] / len(labelled)
        summary["per_class"] = dict(sorted(per_class.items()))
        summary["missed"] = [{"path": str(a.path), "truth": a.truth, "predicted": a.label,
                              "probability": a.body[0]["probability"]}
                             for a in labelled if a.label != a.truth]
    return summary
