"""Metrics scraped by a real Prometheus (Debian's prometheus) from a real TorchServe."""

import shutil
import subprocess
import time

import pytest
import requests

from conftest import build_archive, encode, running_server, scene
from serving.server import free_ports

pytestmark = pytest.mark.e2e
MODEL = "mon3"
GOOD, UNDECODABLE, BAD_TOPK = 12, 3, 2


@pytest.fixture(scope="module")
def server(tmp_path_factory, three_class_checkpoint):
    store = tmp_path_factory.mktemp("model_store")
    build_archive(three_class_checkpoint, store, MODEL, "--version", "3.1", "--num-threads", "1")
    with running_server(tmp_path_factory.mktemp("ts"), store, [f"{MODEL}={MODEL}.mar"]) as ts:
        yield ts


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, server):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not installed: `make setup` installs Debian's prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    target = server.url("metrics").split("://", 1)[1]
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: torchserve\n    static_configs: [{{targets: ['{target}']}}]\n")
    port = free_ports(1)[0]
    log = open(work / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, (work / "prometheus.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def query(prom: str, expr: str) -> dict[tuple, float]:
    """Instant PromQL query -> {tuple of sorted label items: value}."""
    r = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    return {tuple(sorted(s["metric"].items())): float(s["value"][1])
            for s in r.json()["data"]["result"]}


def wait_for(prom: str, expr: str, expected: float, timeout_s: float = 60.0) -> float:
    """Polls ``sum(expr)`` until it equals ``expected`` (scrapes are asynchronous)."""
    deadline, value = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        values = query(prom, f"sum({expr})")
        value = next(iter(values.values()), None)
        if value == expected:
            return value
        time.sleep(1)
    return value


def test_prometheus_sees_requests_rejections_and_stage_metrics(server, prometheus):
    url = f"{server.url('inference')}/predictions/{MODEL}"
    auth = server.headers("inference")
    statuses = []
    for i in range(GOOD):
        statuses.append(requests.put(url, data=encode(scene(seed=i)), headers=auth, timeout=60).status_code)
    for _ in range(UNDECODABLE):
        statuses.append(requests.put(url, data=b"not an image", headers=auth, timeout=60).status_code)
    for _ in range(BAD_TOPK):
        statuses.append(requests.post(url, files={"data": encode(scene())}, data={"topk": "0"},
                                      headers=auth, timeout=60).status_code)
    assert statuses == [200] * GOOD + [400] * UNDECODABLE + [422] * BAD_TOPK

    sel = f'{{model_name="{MODEL}"}}'
    assert wait_for(prometheus, f"ts_inference_requests_total{sel}", GOOD + UNDECODABLE + BAD_TOPK) \
        == GOOD + UNDECODABLE + BAD_TOPK
    model = f'ModelName="{MODEL}",ModelVersion="3.1"'
    assert wait_for(prometheus, f"classifier_rejected_inputs_total{{{model}}}", UNDECODABLE + BAD_TOPK) \
        == UNDECODABLE + BAD_TOPK
    by_reason = query(prometheus, f"sum by (Reason) (classifier_rejected_inputs_total{{{model}}})")
    assert {dict(k)["Reason"]: v for k, v in by_reason.items()} == {"undecodable": UNDECODABLE,
                                                                     "bad_parameter": BAD_TOPK}
    for name in ("classifier_preprocess_seconds", "classifier_top1_probability",
                 "classifier_images_per_request"):
        assert wait_for(prometheus, f"{name}_count{{{model}}}", GOOD) == GOOD, name
    batches = query(prometheus, f"sum(classifier_batch_size_sum{{{model}}})")
    assert list(batches.values()) == [GOOD]  # every good image went through one forward pass
    forwards = next(iter(query(prometheus, f"sum(classifier_batch_size_count{{{model}}})").values()))
    assert 1 <= forwards <= GOOD  # batches of 1..GOOD images
    for name in ("classifier_inference_seconds", "classifier_postprocess_seconds"):  # one per batch
        assert list(query(prometheus, f"sum({name}_count{{{model}}})").values()) == [forwards], name
    confidence = query(prometheus, f"sum(classifier_top1_probability_sum{{{model}}}) / "
                                   f"sum(classifier_top1_probability_count{{{model}}})")
    assert 1 / 3 <= next(iter(confidence.values())) <= 1.0  # mean top-1 of 3 classes
    p99 = query(prometheus, f"histogram_quantile(0.99, sum by (le) "
                            f"(classifier_inference_seconds_bucket{{{model}}}))")
    assert 0 < next(iter(p99.values())) <= 10
    workers = query(prometheus, f"count(classifier_worker_batches_total{{{model}}} > 0)")
    assert list(workers.values()) == [1]
