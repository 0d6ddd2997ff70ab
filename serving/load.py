"""The load generator the benchmark drives: real photos over keep-alive HTTP at a fixed
concurrency, with client- and server-side figures per point.
"""

from __future__ import annotations

import http.client
import statistics
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from urllib3.filepost import encode_multipart_formdata

from serving.metrics import server_totals, settled_totals
from serving.server import TorchServe


class Client:
    """One keep-alive HTTP/1.1 connection (``http.client``), reopened after an error.

    The load generator shares the CPU with the server it measures, so it uses the standard
    library's client directly: ``requests`` cost several times more CPU per request, taken
    from the model while it runs (the ``client_cpu_ms_per_request`` figure shows what is left).
    """

    def __init__(self, base_url: str, timeout_s: float = 120.0):
        url = urllib.parse.urlsplit(base_url)
        self.host, self.port, self.timeout_s = url.hostname, url.port, timeout_s
        self.conn: Optional[http.client.HTTPConnection] = None

    def post(self, path: str, body: bytes, headers: dict) -> int:
        """Returns the HTTP status, or 0 when the connection failed."""
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            self.conn.request("POST", path, body=body, headers=headers)
            response = self.conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return 0


def multipart(images: list[bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field per image (``image0``, ``image1``, ...),
    as ``curl -F image0=@a.jpg -F image1=@b.jpg`` sends it (urllib3's encoder). Returns
    (body, Content-Type)."""
    return encode_multipart_formdata(
        [(f"image{i}", (f"{i}.jpg", img, "application/octet-stream")) for i, img in enumerate(images)])


def sweep_point(ts: TorchServe, model: str, images: list[bytes], concurrency: int, requests_n: int,
                images_per_request: int = 1) -> dict:
    """Sends ``requests_n`` requests of ``images_per_request`` images (raw body for one, a
    multipart body with a file per image for several) at ``concurrency`` in flight; returns the
    point's figures (``images_per_s`` counts images, not requests).

    Besides client-side throughput and latency: the server's mean queue time per request,
    (our handler only) mean preprocessing ms per image, inference ms per batch and images per
    batch, from the handler's metrics, the share of wall time the worker spent in forward passes
    (``model_busy``), and the load generator's own CPU ms per request.
    """
    path = f"/predictions/{model}"
    headers = {**ts.headers("inference"), "Content-Type": "application/octet-stream"}
    bodies = [(image, headers) for image in images]
    if images_per_request > 1:  # each multipart body has its own boundary, so its own header
        bodies = []
        for i in range(len(images)):
            body, content_type = multipart([images[(i * images_per_request + j) % len(images)]
                                            for j in range(images_per_request)])
            bodies.append((body, {**headers, "Content-Type": content_type}))
    local = threading.local()
    latencies, errors = [], 0
    lock = threading.Lock()

    def send(i):
        nonlocal errors
        client = getattr(local, "client", None) or Client(ts.url("inference"))
        local.client = client
        t = time.perf_counter()
        body, body_headers = bodies[i % len(bodies)]
        ok = client.post(path, body, body_headers) == 200
        with lock:
            latencies.append((time.perf_counter() - t) * 1000)
            errors += not ok
    before = server_totals(ts.url("metrics"), model)
    start, cpu_start = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, range(requests_n)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    d = settled_totals(ts.url("metrics"), model, before, requests_n * images_per_request)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    point = {"concurrency": concurrency, "requests": requests_n, "errors": errors,
             "images_per_request": images_per_request,
             "images_per_s": round(requests_n * images_per_request / wall, 2), "p50_ms": round(cuts[49], 1),
             "p90_ms": round(cuts[89], 1), "p99_ms": round(cuts[98], 1),
             "queue_ms_mean": round(d["queue_us"] / max(d["requests"], 1) / 1000, 2),
             "client_cpu_ms_per_request": round(1000 * cpu / requests_n, 2)}
    if d["batches"]:
        # model_busy: the share of the point's wall time the worker spent in forward passes
        # (the server's own overhead is the rest, whatever the machine's speed at the time)
        point.update(preprocess_ms_mean=round(1000 * d["preprocess_s"] / max(d["preprocessed"], 1), 2),
                     inference_ms_per_batch=round(1000 * d["inference_s"] / d["batches"], 1),
                     images_per_batch=round(d["preprocessed"] / d["batches"], 2),
                     model_busy=round(d["inference_s"] / wall, 3))
    return point
