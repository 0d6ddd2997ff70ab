"""End-to-end: a real TorchServe (Java frontend + Python worker) over real HTTP on loopback."""

import base64
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from conftest import ROOT, build_archive, encode, running_server, scene
from serving.server import TorchServe
from training.predict import load_classifier

pytestmark = pytest.mark.e2e
MODEL = "tiny3"
MAX_REQUEST_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory, three_class_checkpoint):
    store = tmp_path_factory.mktemp("model_store")
    # default k 5 > 3 classes; batches of up to 4 gathered for 200 ms so concurrent requests share one
    build_archive(three_class_checkpoint, store, MODEL, "--version", "1.0", "--batch-size", "4",
                  "--max-batch-delay", "200", "--num-threads", "1")
    with running_server(tmp_path_factory.mktemp("ts"), store, [f"{MODEL}={MODEL}.mar"],
                        max_request_size=str(MAX_REQUEST_BYTES)) as ts:
        yield ts


@pytest.fixture(scope="module")
def reference(three_class_checkpoint):
    """In-process top-k for comparing with what the server answers."""
    model, classes, tf = load_classifier(three_class_checkpoint, torch.device("cpu"))

    def predict(data: bytes):
        with torch.inference_mode():
            probs = model(tf.load(data)[None]).softmax(1)[0]
        order = probs.argsort(descending=True).tolist()
        return [classes[i] for i in order], [probs[i].item() for i in order]
    return predict


def predict_url(ts):
    return f"{ts.url('inference')}/predictions/{MODEL}"


def test_raw_body_put_and_post_match_in_process_prediction(server, reference, jpeg_bytes):
    auth = server.headers("inference")
    labels, probs = reference(jpeg_bytes)
    for r in (requests.put(predict_url(server), data=jpeg_bytes, headers=auth, timeout=60),  # curl -T
              requests.post(predict_url(server), data=jpeg_bytes,
                            headers={**auth, "Content-Type": "image/jpeg"}, timeout=60)):
        assert r.status_code == 200, r.text
        body = r.json()
        assert [rec["label"] for rec in body] == labels  # default k=5, clamped to 3 classes
        assert [rec["probability"] for rec in body] == pytest.approx(probs, abs=1e-5)
        assert sorted(rec["index"] for rec in body) == [0, 1, 2]


def test_per_request_topk_multipart_json_and_invocations(server, reference):
    png = encode(scene(seed=7), "PNG")
    labels, _ = reference(png)
    auth = server.headers("inference")
    r = requests.post(predict_url(server), files={"data": ("x.png", png, "image/png")},
                      data={"topk": "2"}, headers=auth, timeout=60)
    assert r.status_code == 200 and [x["label"] for x in r.json()] == labels[:2]
    r = requests.post(predict_url(server), json={"data": base64.b64encode(png).decode(), "topk": 1},
                      headers=auth, timeout=60)
    assert r.status_code == 200 and [x["label"] for x in r.json()] == labels[:1]
    r = requests.post(f"{server.url('inference')}/invocations",
                      params={"model_name": MODEL, "topk": "1"}, data=png,
                      headers={**auth, "Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200 and [x["label"] for x in r.json()] == labels[:1]


def test_corrupt_file_gets_4xx_while_concurrent_good_requests_get_200(server, reference, jpeg_bytes):
    auth = server.headers("inference")
    pid_before = [w["pid"] for w in server.workers(MODEL)]
    bodies = [jpeg_bytes, jpeg_bytes[:300], jpeg_bytes, b"GIF89a garbage", jpeg_bytes, b""] * 2

    def send(body):
        return requests.put(predict_url(server), data=body, headers=auth, timeout=60)
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(send, bodies))
    labels, _ = reference(jpeg_bytes)
    for body, r in zip(bodies, responses):
        if body == jpeg_bytes:
            assert r.status_code == 200 and [x["label"] for x in r.json()] == labels
        else:
            assert r.status_code == 400, r.text
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["type"] == "undecodable" and r.json()["message"]
    assert [w["pid"] for w in server.workers(MODEL)] == pid_before  # the worker lived
    assert requests.put(predict_url(server), data=jpeg_bytes, headers=auth, timeout=60).status_code == 200


def test_bad_topk_is_422(server, jpeg_bytes):
    r = requests.post(predict_url(server), files={"data": jpeg_bytes}, data={"topk": "0"},
                      headers=server.headers("inference"), timeout=60)
    assert r.status_code == 422 and r.json()["type"] == "bad_parameter"


def test_management_api_lists_and_describes_the_model(server):
    auth = server.headers("management")
    listed = requests.get(f"{server.url('management')}/models", headers=auth, timeout=10).json()
    assert MODEL in [m["modelName"] for m in listed["models"]]
    described = requests.get(f"{server.url('management')}/models/{MODEL}", headers=auth, timeout=10).json()[0]
    assert described["modelVersion"] == "1.0"
    assert described["batchSize"] == 4 and described["maxBatchDelay"] == 200
    assert described["workers"] and all(w["status"] == "READY" for w in described["workers"])


def test_token_authorization_is_enforced(server, jpeg_bytes):
    # A missing or wrong key: 401 (stock TorchServe 0.12 answers 400; build/ts-patches.jar fixes it)
    for r in (requests.put(predict_url(server), data=jpeg_bytes, timeout=10),
              requests.put(predict_url(server), data=jpeg_bytes, timeout=10,
                           headers={"Authorization": "Bearer wrong-key"}),
              requests.get(f"{server.url('management')}/models", timeout=10),
              requests.get(f"{server.url('management')}/models", timeout=10,
                           headers={"Authorization": "Bearer wrong-key"})):
        assert r.status_code == 401 and r.json()["type"] == "InvalidKeyException", r.text
    assert requests.get(f"{server.url('management')}/models", timeout=10,
                        headers=server.headers("management")).status_code == 200


def test_prometheus_metrics_count_inference_requests(server, jpeg_bytes):
    requests.put(predict_url(server), data=jpeg_bytes, headers=server.headers("inference"), timeout=60)
    text = requests.get(f"{server.url('metrics')}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("ts_inference_requests_total")]
    assert lines, text[:500]
    assert any(f'model_name="{MODEL}"' in line and float(line.rsplit(" ", 1)[1]) >= 1 for line in lines)


def test_archive_contents(server):
    with zipfile.ZipFile(server.model_store / f"{MODEL}.mar") as mar:
        names = set(mar.namelist())
        labels = json.loads(mar.read("index_to_name.json"))
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
    # the handler/ package whole (its modules, no __pycache__), its entry module at the top
    shipped = {f"handler/{p.name}" for p in (ROOT / "handler").glob("*.py")}
    assert {"model.pt", "classifier_handler.py", "model-config.yaml", "index_to_name.json"} | shipped \
        == names - {"MAR-INF/MANIFEST.json"} - {n for n in names if n.endswith(".onnx")}
    assert labels == {"0": "cat", "1": "dog", "2": "bird"}
    assert manifest["model"]["modelVersion"] == "1.0"


def test_unknown_model_or_version_is_404(server, jpeg_bytes):
    auth = server.headers("inference")
    for url in (f"{server.url('inference')}/predictions/nope", f"{predict_url(server)}/9.9"):
        r = requests.put(url, data=jpeg_bytes, headers=auth, timeout=10)
        assert r.status_code == 404, r.text


def test_body_over_max_request_size_is_413(server):
    r = requests.put(predict_url(server), data=b"\xff" * (MAX_REQUEST_BYTES + 1),
                     headers=server.headers("inference"), timeout=30)
    assert r.status_code == 413


def test_curl_data_binary_default_content_type_reaches_the_handler_as_bytes(server, jpeg_bytes):
    """curl --data-binary @photo.jpg without -H sends application/x-www-form-urlencoded: 0.12's
    frontend answered 500 ErrorDataDecoderException; patched, the body is the image."""
    import subprocess
    url = predict_url(server)
    expected = requests.put(url, data=jpeg_bytes, headers=server.headers("inference"), timeout=30).json()
    r = requests.post(url, data=jpeg_bytes, timeout=30, headers={
        **server.headers("inference"), "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json() == expected
    r = requests.post(url, data=b"not=an&image=1", timeout=30, headers={
        **server.headers("inference"), "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json()["type"] == "undecodable"  # the bytes, not form fields
    photo = server.workdir / "photo.jpg"
    photo.write_bytes(jpeg_bytes)
    curl = subprocess.run(["curl", "-s", "-w", "\\n%{http_code}", "--data-binary", f"@{photo}", "-H",
                           f"Authorization: Bearer {server.token('inference')}", url],
                          capture_output=True, text=True, timeout=30)
    body, code = curl.stdout.rsplit("\n", 1)
    assert code == "200" and json.loads(body) == expected


def test_frontend_jvm_gets_the_vmargs_of_config_properties(server):
    import psutil

    from serving.server import read_properties
    vmargs = read_properties(ROOT / "config.properties")["vmargs"].split()
    assert "-XX:TieredStopAtLevel=1" in vmargs and "-Xmx2560m" in vmargs  # a bounded heap
    java = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if p.name() == "java"]
    assert len(java) == 1 and set(vmargs) <= set(java[0].cmdline())


def test_workers_get_the_short_openmp_spin(server):
    """The worker process (started by the frontend) runs with serving.server.WORKER_ENV: libgomp
    reads GOMP_SPINCOUNT when PyTorch loads it, so it has to be in the worker's environment."""
    import psutil

    from serving.server import WORKER_ENV
    [worker] = server.workers(MODEL)
    assert psutil.Process(worker["pid"]).environ()["GOMP_SPINCOUNT"] == WORKER_ENV["GOMP_SPINCOUNT"]


def test_an_archive_that_cannot_load_fails_the_start_with_the_workers_error(tmp_path):
    """A corrupt archive: start fails with the worker's own error, not after the READY timeout,
    and the log tail holds this run's lines only; no empty models/<id>/ folders are left."""
    import os

    from serving.server import ServerError, server_overrides
    store = tmp_path / "store"
    store.mkdir()
    (store / "bad.mar").write_bytes(os.urandom(4096))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "ts_log.log").write_text("MARKER-OF-AN-EARLIER-RUN\n")
    ts = TorchServe(workdir=tmp_path, model_store=store, models=["bad=bad.mar"],
                    overrides=server_overrides())
    ts.start()
    try:
        with pytest.raises(ServerError) as err:
            ts.wait_ready(["bad"], timeout_s=170)
    finally:
        ts.stop()
    message = str(err.value)
    print(f"\n[bad archive] {message.splitlines()[0]}")
    assert "could not load ['bad']: its workers died while loading it" in message
    assert "ModuleNotFoundError" in message.splitlines()[0]  # the worker's last error line
    assert "MARKER-OF-AN-EARLIER-RUN" not in message
    assert not (tmp_path / "models").exists()
