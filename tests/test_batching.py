"""Dynamic batching in a real TorchServe with our frontend agent (scripts/ts_patches/).

IdleDispatch: a request that reaches an idle model goes to the worker at once instead of
waiting ``maxBatchDelay`` for company; under concurrent load batches still form. The archive
uses a long maxBatchDelay (1.5 s) so that the two behaviours are told apart by a wide margin,
not by tight timings: upstream TorchServe (``TS_IDLE_DISPATCH=0``) holds every lone request for
the whole delay.
"""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import build_archive, running_server

pytestmark = pytest.mark.e2e
MODEL = "tiny3"
DELAY_MS = 1500


@pytest.fixture(scope="module")
def store(tmp_path_factory, three_class_checkpoint):
    store = tmp_path_factory.mktemp("store")
    build_archive(three_class_checkpoint, store, MODEL, "--batch-size", "8",
                  "--max-batch-delay", str(DELAY_MS), "--num-threads", "1")
    return store


def lone_request_seconds(ts, body: bytes, n: int = 4) -> list[float]:
    """Latency of ``n`` requests sent one after another (each finds the model idle)."""
    url, auth = f"{ts.url('inference')}/predictions/{MODEL}", ts.headers("inference")
    out = []
    for _ in range(n):
        start = time.perf_counter()
        r = requests.put(url, data=body, headers=auth, timeout=60)
        out.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
    return out


def batch_size_sum_and_count(ts) -> tuple[float, float]:
    """(images, batches) from the handler's classifier_batch_size histogram."""
    text = requests.get(f"{ts.url('metrics')}/metrics", timeout=10).text
    values = {}
    for suffix in ("sum", "count"):
        match = re.search(rf"^classifier_batch_size_{suffix}{{[^}}]*}} (\S+)$", text, re.M)
        values[suffix] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def test_lone_requests_skip_the_batch_delay_and_load_still_batches(tmp_path, store, jpeg_bytes):
    with running_server(tmp_path, store, [f"{MODEL}={MODEL}.mar"]) as ts:
        lone = lone_request_seconds(ts, jpeg_bytes)
        # the first request also warms up the frontend's code paths; upstream: >= 1.5 s each
        assert max(lone[1:]) < DELAY_MS / 1000 / 2, lone

        images_before, batches_before = batch_size_sum_and_count(ts)
        url, auth = f"{ts.url('inference')}/predictions/{MODEL}", ts.headers("inference")
        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(
                lambda _: requests.put(url, data=jpeg_bytes, headers=auth, timeout=60).status_code,
                range(12)))
        assert statuses == [200] * 12
        images, batches = batch_size_sum_and_count(ts)
        images, batches = images - images_before, batches - batches_before
        assert images == 12
        # One short batch may go out at once (the model was idle); the requests queued behind
        # it are batched as upstream does.
        assert batches <= 4, (images, batches)
        assert "patched org/pytorch/serve/wlm/Model" in (ts.log_dir / "console.log").read_text()


def test_switched_off_lone_requests_wait_for_the_delay_as_upstream(tmp_path, store, jpeg_bytes):
    with running_server(tmp_path, store, [f"{MODEL}={MODEL}.mar"],
                        env={"TS_IDLE_DISPATCH": "0"}) as ts:
        lone = lone_request_seconds(ts, jpeg_bytes, n=2)
        assert min(lone) >= DELAY_MS / 1000, lone
