"""Reliability against a real TorchServe: hostile input, soak, worker crash, full queue, timeout.

Bounded and self-stopping, loopback only. CI sizes are modest; the full sizes run with
``RELIABILITY_FULL=1`` (soak 20000 requests). Figures are printed for the record (``pytest -s``).
"""

import os
import signal
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests
import torch
from PIL import Image

from conftest import build_archive, encode, make_checkpoint, running_server, scan_bomb, scene
from training.predict import load_classifier

pytestmark = pytest.mark.e2e
MODEL = "rel3"
FULL = os.environ.get("RELIABILITY_FULL") == "1"
MAX_REQUEST_BYTES = 2 * 1024 * 1024


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring width x height pixels (a decompression bomb needs no pixel data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def palette_png_with_transparency() -> bytes:
    img = scene(40, 30, seed=6).convert("P", palette=Image.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


JPEG = encode(scene(seed=11))
# name -> (requests kwargs, expected status, expected "type" or None for a 200)
CORPUS = {
    "empty body": (dict(data=b""), 400, "undecodable"),
    "random bytes": (dict(data=np.random.default_rng(0).bytes(5000)), 400, "undecodable"),
    "truncated JPEG": (dict(data=JPEG[: len(JPEG) // 3]), 400, "undecodable"),
    "PNG declaring 50000x50000": (dict(data=png_declaring(50000, 50000)), 413, "too_large"),
    "1x1 image": (dict(data=encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")), 200, None),
    "20000x10 image": (dict(data=encode(scene(20000, 10), "PNG")), 200, None),
    "animated GIF": (dict(data=animated_gif()), 200, None),
    "CMYK JPEG": (dict(data=encode(scene(seed=12).convert("CMYK"), "JPEG")), 200, None),
    "16-bit PNG": (dict(data=encode(Image.fromarray(np.full((20, 20), 40000, np.uint16)), "PNG")), 200, None),
    "palette PNG with transparency": (dict(data=palette_png_with_transparency()), 200, None),
    "SVG": (dict(data=b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'), 400, "undecodable"),
    "PDF": (dict(data=b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"), 400, "undecodable"),
    "text file named .jpg": (dict(files={"data": ("photo.jpg", b"just text", "image/jpeg")}), 400, "undecodable"),
    "JSON with invalid base64": (dict(json={"data": "%%%not base64%%%"}), 400, "bad_request"),
    "JSON without the image field": (dict(json={"topk": 2}), 400, "bad_request"),
    "multipart without a file": (dict(files={"topk": (None, "2")}), 400, "bad_request"),
    "topk=0": (dict(files={"data": JPEG, "topk": (None, "0")}), 422, "bad_parameter"),
    "topk=-1": (dict(files={"data": JPEG, "topk": (None, "-1")}), 422, "bad_parameter"),
    "topk=abc": (dict(files={"data": JPEG, "topk": (None, "abc")}), 422, "bad_parameter"),
    "topk=10000 (clamped)": (dict(files={"data": JPEG, "topk": (None, "10000")}), 200, None),
    # JSON whose top level is not an object: 500 "internal error" before, 400 now
    **{f"JSON top level {body}": (dict(data=body, headers={"Content-Type": "application/json"}),
                                  400, "bad_request")
       for body in (b'["a"]', b"[256]", b"-1", b"1.5", b"100000000000")},
    "Content-Type: Application/JSON (capitals)": (
        dict(data=b'{"data": "%s"}' % __import__("base64").b64encode(JPEG),
             headers={"Content-Type": "Application/JSON"}), 200, None),
    "progressive JPEG, 3006 scans (scan bomb)": (dict(data=scan_bomb()), 413, "too_large"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("rel") / "ckpt.pt", ["cat", "dog", "bird"], seed=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    store = tmp_path_factory.mktemp("store")
    build_archive(checkpoint, store, MODEL, "--batch-size", "8", "--max-batch-delay", "10",
                  "--num-threads", "1")
    # Upstream batching (no IdleDispatch): two requests sent together then wait 10 ms for each
    # other and share a batch, which is what the hostile-input tests are about.
    with running_server(tmp_path_factory.mktemp("ts"), store, [f"{MODEL}={MODEL}.mar"],
                        env={"TS_IDLE_DISPATCH": "0"},
                        max_request_size=str(MAX_REQUEST_BYTES)) as ts:
        yield ts


@pytest.fixture(scope="module")
def reference(checkpoint):
    model, classes, tf = load_classifier(checkpoint, torch.device("cpu"))

    def top(data: bytes):
        with torch.inference_mode():
            probs = model(tf.load(data)[None]).softmax(1)[0]
        return classes[int(probs.argmax())], float(probs.max())
    return top


def url(ts, model=MODEL, version=None):
    return f"{ts.url('inference')}/predictions/{model}" + (f"/{version}" if version else "")


def worker_pids(ts):
    return sorted(w["pid"] for w in ts.workers(MODEL))


@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_input_is_answered_alone(server, reference, name):
    kwargs, status, kind = CORPUS[name]
    auth = server.headers("inference")
    pids = worker_pids(server)
    kwargs = dict(kwargs)
    headers = {**auth, **kwargs.pop("headers", {})}
    with ThreadPoolExecutor(2) as pool:  # the good request shares a batch with the hostile one
        hostile = pool.submit(requests.post, url(server), headers=headers, timeout=60, **kwargs)
        good = pool.submit(requests.put, url(server), data=JPEG, headers=auth, timeout=60)
        hostile, good = hostile.result(), good.result()
    assert good.status_code == 200 and good.json()[0]["label"] == reference(JPEG)[0]
    assert hostile.status_code == status, hostile.text
    body = hostile.json()
    if kind is None:
        assert isinstance(body, list) and 1 <= len(body) <= 3
    else:
        assert body["type"] == kind and body["code"] == status and len(body["message"]) > 10
    assert worker_pids(server) == pids  # the worker stayed up


def test_frontend_errors(server):
    auth = server.headers("inference")
    too_big = requests.put(url(server), data=b"\xff" * (MAX_REQUEST_BYTES + 1), headers=auth, timeout=60)
    assert too_big.status_code == 413
    for u in (url(server, "no-such-model"), url(server, version="9.9")):
        r = requests.put(u, data=JPEG, headers=auth, timeout=60)
        assert r.status_code == 404 and r.json()["type"] in ("ModelNotFoundException",
                                                             "ModelVersionNotFoundException")


def rss_mb(ts) -> dict:
    """Resident memory (MiB) of the frontend (java) and each worker of the server."""
    root = psutil.Process(ts.proc.pid)
    out = {}
    for p in root.children(recursive=True):
        name = "frontend" if "java" in p.name() else (f"worker {p.pid}" if "python" in p.name() else None)
        if name:
            out[name] = round(p.memory_info().rss / 2**20, 1)
    return out


def test_soak_mixed_traffic(server, reference):
    n = 20000 if FULL else 5000
    goods = [encode(scene(seed=100 + i)) for i in range(4)]
    expected = {g: reference(g) for g in goods}
    bads = [b"", b"\x00" * 50, JPEG[:200], b"GIF89a nope"]
    plan = [bads[i % 4] if i % 20 == 19 else goods[i % 4] for i in range(n)]  # 5 % bad
    auth = server.headers("inference")
    rss_start = rss_mb(server)
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=16))

    def send(body):
        try:
            r = session.put(url(server), data=body, headers=auth, timeout=60)
            return body, r.status_code, r.json()
        except (requests.RequestException, ValueError) as exc:
            return body, 0, str(exc)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, plan))
    wall = time.perf_counter() - t0
    rss_end = rss_mb(server)
    statuses = [s for _, s, _ in results]
    wrong = [(body in expected, s, ans) for body, s, ans in results
             if (body in expected and (s != 200 or ans[0]["label"] != expected[body][0]
                                       or abs(ans[0]["probability"] - expected[body][1]) > 1e-4))
             or (body not in expected and s != 400)]
    print(f"\n[soak] {n} requests at concurrency 16 in {wall:.1f} s ({n / wall:.0f} req/s): "
          f"2xx {sum(s == 200 for s in statuses)}, 4xx {sum(400 <= s < 500 for s in statuses)}, "
          f"5xx {sum(s >= 500 for s in statuses)}, lost {statuses.count(0)}; RSS MiB start {rss_start} "
          f"end {rss_end}")
    assert not wrong, wrong[:5]
    assert statuses.count(200) == n - n // 20 and statuses.count(400) == n // 20


def test_worker_killed_during_load_is_restarted(server):
    auth = server.headers("inference")
    (pid,) = worker_pids(server)
    results, stop = [], False

    def loop():
        s = requests.Session()
        while not stop:
            t = time.monotonic()
            try:
                results.append((t, s.put(url(server), data=JPEG, headers=auth, timeout=30).status_code))
            except requests.RequestException:
                results.append((t, 0))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(loop) for _ in range(4)]
        time.sleep(2)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        recovered_at = None
        deadline = killed_at + 120
        while time.monotonic() < deadline:
            ok_after = [t for t, s in results if s == 200 and t > killed_at + 0.1]
            new = [p for p in worker_pids(server) if p != pid]
            if ok_after and new and all(w["status"] == "READY" for w in server.workers(MODEL)):
                recovered_at = min(ok_after)
                break
            time.sleep(0.2)
        time.sleep(2)
        stop = True
        for f in futures:
            f.result()
    failed = [(round(t - killed_at, 2), s) for t, s in results if s != 200]
    recovery = f"{recovered_at - killed_at:.2f} s" if recovered_at else "none"
    print(f"\n[worker kill -9] requests {len(results)}, failed {len(failed)} {failed[:8]}, "
          f"recovery {recovery}")
    assert recovered_at is not None, "no new READY worker answered within 120 s"
    assert all(-0.5 <= t <= recovered_at - killed_at for t, _ in failed)  # only around the crash
    # TorchServe answers the batch that was on the killed worker with 507 ("Worker died")
    assert all(s == 507 for _, s in failed), failed
    assert requests.put(url(server), data=JPEG, headers=auth, timeout=30).status_code == 200


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A deliberately slow model (DenseNet121 at 2560 px).

    It must outlast the 1 s responseTimeout with a margin on any of these machines: at 1536 px
    the worker (with its retained heap) answered in 0.9 s on an AVX-512 CPU, about 2 s on an
    AVX2 one; 2560 px is 2.8 times the work.
    """
    root = tmp_path_factory.mktemp("slow")
    ckpt = make_checkpoint(root / "slow.pt", ["a", "b"], arch="densenet121",
                           preprocessing={"crop_size": 2560, "resize_size": 2560,
                                          "mean": [0.5] * 3, "std": [0.25] * 3})
    store = root / "store"
    build_archive(ckpt, store, "slowq", "--batch-size", "1", "--response-timeout", "120")
    build_archive(ckpt, store, "slowt", "--batch-size", "1", "--response-timeout", "1")
    with running_server(root / "ts", store, ["slowq=slowq.mar", "slowt=slowt.mar"],
                        env={"TS_IDLE_TIMEOUT_S": "1"}, job_queue_size="3") as ts:
        yield ts


def test_full_queue_answers_503_quickly(slow_server):
    auth = slow_server.headers("inference")

    def send(_):
        t = time.perf_counter()
        r = requests.put(url(slow_server, "slowq"), data=JPEG, headers=auth, timeout=300)
        return r.status_code, time.perf_counter() - t, r.text
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(send, range(12)))
    rejected = [(s, round(dt, 2), text) for s, dt, text in results if s != 200]
    accepted = [dt for s, dt, _ in results if s == 200]
    print(f"\n[queue full] 12 concurrent, job_queue_size 3: 200 x{len(accepted)} "
          f"(max {max(accepted):.1f} s), 503 x{len(rejected)} (max {max(d for _, d, _ in rejected):.2f} s)")
    assert rejected and all(s == 503 for s, _, _ in rejected)
    assert all(dt < 2.0 for _, dt, _ in rejected)  # refused at once, not after a wait
    assert len(accepted) >= 3


def test_request_outliving_response_timeout_is_answered(slow_server):
    auth = slow_server.headers("inference")
    t = time.perf_counter()
    r = requests.put(url(slow_server, "slowt"), data=JPEG, headers=auth, timeout=120)
    elapsed = time.perf_counter() - t
    print(f"\n[timeout] responseTimeout 1 s: HTTP {r.status_code} after {elapsed:.1f} s: {r.text[:120]}")
    # TorchServe's answer to a request that outlives responseTimeout: the worker is restarted
    assert r.status_code == 500 and "Worker died" in r.json()["message"] and elapsed < 60
    slow_server.wait_ready(["slowt"], timeout_s=180)  # the worker comes back


# --- hostile clients: decode bombs next to good traffic, pipelining, stalled connections ---

IDLE_TIMEOUT_S = 2
MAX_CONNECTIONS = 24


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory, checkpoint):
    """The tiny model behind a frontend with short, test-sized connection limits (the frontend
    patch reads TS_IDLE_TIMEOUT_S and TS_MAX_CONNECTIONS; production defaults: 60 s and half
    the JVM's file limit). Idle dispatch on, as served."""
    store = tmp_path_factory.mktemp("guarded-store")
    build_archive(checkpoint, store, MODEL, "--num-threads", "1")
    with running_server(tmp_path_factory.mktemp("guarded"), store, [f"{MODEL}={MODEL}.mar"],
                        env={"TS_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
                             "TS_MAX_CONNECTIONS": str(MAX_CONNECTIONS)}) as ts:
        yield ts


def exchange(ts, data: bytes, read_s: float = 10.0) -> tuple[bytes, float, str]:
    """Sends raw bytes on one new connection to the inference API; reads until the server closes
    the connection or ``read_s`` passes. Returns (bytes read, seconds, "closed" or "open")."""
    import socket
    host, port = ts.url("inference").removeprefix("http://").split(":")
    start, out = time.perf_counter(), b""
    with socket.create_connection((host, int(port)), timeout=read_s) as s:
        s.sendall(data)
        try:
            while chunk := s.recv(65536):
                out += chunk
            state = "closed"
        except ConnectionResetError:
            state = "closed"
        except TimeoutError:
            state = "open"
    return out, time.perf_counter() - start, state


def http(ts, method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: {ts.url('inference').removeprefix('http://')}",
            f"Authorization: Bearer {ts.token('inference')}", f"Content-Length: {len(body)}"]
    head += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def answers(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each HTTP/1.1 response in ``raw``, in order (Content-Length framed)."""
    import re
    out = []
    while (m := re.match(rb"HTTP/1\.1 (\d{3})[^\r]*\r\n(.*?)\r\n\r\n", raw, re.S)):
        length = int(re.search(rb"(?i)content-length: *(\d+)", m[2])[1])
        start = m.end()
        out.append((int(m[1]), raw[start:start + length]))
        raw = raw[start + length:]
    return out


def test_pipelined_answers_come_back_in_request_order(guarded_server, reference):
    """HTTP/1.1 pipelining: a slow prediction, /ping, a 400 and a fast prediction sent at once
    on one connection are answered in that order (0.12 sent /ping's answer first, and closed
    the connection on the 400, dropping what was queued behind it)."""
    import json
    big = encode(Image.effect_noise((1600, 1600), 60).convert("RGB"), "PNG")  # slow to decode
    data = (http(guarded_server, "POST", f"/predictions/{MODEL}", big, Content_Type="application/octet-stream")
            + http(guarded_server, "GET", "/ping")
            + http(guarded_server, "POST", f"/predictions/{MODEL}", b"not an image",
                   Content_Type="application/octet-stream")
            + http(guarded_server, "POST", f"/predictions/{MODEL}", JPEG, Content_Type="image/jpeg"))
    raw, seconds, _ = exchange(guarded_server, data, read_s=IDLE_TIMEOUT_S + 8)
    got = answers(raw)
    print(f"\n[pipelining] 4 requests on one connection: statuses {[s for s, _ in got]} in {seconds:.1f} s")
    assert [s for s, _ in got] == [200, 200, 400, 200]
    assert json.loads(got[0][1])[0]["label"] == reference(big)[0]
    assert json.loads(got[1][1]) == {"status": "Healthy"}
    assert json.loads(got[2][1])["type"] == "undecodable"
    assert json.loads(got[3][1])[0]["label"] == reference(JPEG)[0]


@pytest.mark.parametrize("name,data", [
    ("Content-Length longer than the body", b"POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc"),
    ("negative Content-Length", b"POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
    ("chunked body never finished", b"POST /ping HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
    ("binary junk", bytes(range(256)) * 8),
    ("nothing at all", b""),
])
def test_stalled_connections_are_closed(guarded_server, name, data):
    """Requests that never complete are closed within the idle timeout (0.12 held them open
    forever); junk the HTTP decoder rejects gets a 400 and a close at once."""
    raw, seconds, state = exchange(guarded_server, data, read_s=IDLE_TIMEOUT_S + 8)
    print(f"\n[stalled: {name}] {state} after {seconds:.1f} s, answer {raw[:12]!r}")
    assert state == "closed" and seconds < IDLE_TIMEOUT_S + 5
    assert raw == b"" or raw.startswith(b"HTTP/1.1 400")


def test_a_request_in_flight_outlives_the_idle_timeout(slow_server):
    """The idle timeout (1 s on this server) never cuts a request the worker is still
    computing: slowq outlasts the 1 s responseTimeout of slowt on every machine here."""
    auth = slow_server.headers("inference")
    start = time.perf_counter()
    r = requests.put(url(slow_server, "slowq"), data=JPEG, headers=auth, timeout=120)
    print(f"\n[in flight] slowq answered {r.status_code} after {time.perf_counter() - start:.1f} s "
          "(idle timeout 1 s)")
    assert r.status_code == 200 and time.perf_counter() - start > 1


def test_connections_over_the_cap_are_refused_fast_and_service_recovers(guarded_server):
    import socket
    host, port = guarded_server.url("inference").removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        start = time.perf_counter()
        over = exchange(guarded_server, b"", read_s=5)
        print(f"\n[cap {MAX_CONNECTIONS}] connection {MAX_CONNECTIONS + 1}: {over[0][:32]!r}, "
              f"{over[2]} after {over[1] * 1000:.0f} ms")
        assert over[0].startswith(b"HTTP/1.1 503") and over[2] == "closed" and time.perf_counter() - start < 2
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    r = requests.put(url(guarded_server), data=JPEG, headers=guarded_server.headers("inference"), timeout=30)
    assert r.status_code == 200  # the held ones went: served at once


def test_a_scan_bomb_is_refused_while_its_neighbours_are_served(guarded_server, reference):
    """The ~720 KB progressive JPEG that kept a worker busy 120 s: 413 naming the budget,
    the worker not restarted, the requests around it answered."""
    auth = guarded_server.headers("inference")
    pids = worker_pids(guarded_server)

    def good(_):
        t = time.perf_counter()
        r = requests.put(url(guarded_server), data=JPEG, headers=auth, timeout=60)
        return r.status_code, time.perf_counter() - t
    with ThreadPoolExecutor(4) as pool:  # normal: the same traffic without the bomb
        normal = list(pool.map(good, range(40)))
    bomb = scan_bomb()
    with ThreadPoolExecutor(4) as pool:
        neighbours = [pool.submit(good, i) for i in range(40)]
        t = time.perf_counter()
        refusals = [requests.put(url(guarded_server), data=bomb, headers=auth, timeout=60)
                    for _ in range(10)]  # one after the other, for as long as the neighbours run
        bomb_s = (time.perf_counter() - t) / len(refusals)
        neighbours = [f.result() for f in neighbours]
    refused = refusals[-1]
    p50 = lambda xs: sorted(s for _, s in xs)[len(xs) // 2]  # noqa: E731
    print(f"\n[scan bomb] {len(bomb)} bytes, 10 times: HTTP {refused.status_code} in {bomb_s * 1000:.0f} ms each; "
          f"neighbours at concurrency 4: p50 {p50(neighbours) * 1000:.1f} ms, normal "
          f"{p50(normal) * 1000:.1f} ms ({p50(neighbours) / p50(normal):.2f}x); worker restarted: "
          f"{worker_pids(guarded_server) != pids}")
    assert all(r.status_code == 413 and "decode budget" in r.json()["message"] for r in refusals)
    assert all(status == 200 for status, _ in neighbours)
    assert worker_pids(guarded_server) == pids
