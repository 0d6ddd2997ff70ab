"""KServe v1 and the Open Inference Protocol (v2) on our handler, several images per request,
and the v2 health and model routes, against a real TorchServe over HTTP.

The frontend routes POST /v1/models/{m}:predict and /v2/models/{m}/infer to the handler with the
JSON body; the frontend patch answers the v2 health, readiness and metadata routes.
"""

import base64
import json
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from conftest import build_archive, encode, make_checkpoint, running_server, scene
from training.predict import load_classifier

pytestmark = pytest.mark.e2e
MODEL = "proto3"
CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("proto") / "ckpt.pt", CLASSES, seed=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    store = tmp_path_factory.mktemp("proto-store")
    build_archive(checkpoint, store, MODEL, "--topk", "3", "--num-threads", "1", "--batch-size", "4")
    with running_server(tmp_path_factory.mktemp("proto-ts"), store, [f"{MODEL}={MODEL}.mar"]) as ts:
        yield ts


@pytest.fixture(scope="module")
def expected(checkpoint):
    model, classes, tf = load_classifier(checkpoint, torch.device("cpu"))

    def top(images: list[bytes], k: int) -> list[list[str]]:
        with torch.inference_mode():
            probs = model(torch.stack([tf.load(b) for b in images])).softmax(1)
        return [[classes[i] for i in row] for row in probs.topk(k).indices.tolist()]
    return top


IMAGES = [encode(scene(80 + 16 * i, 60 + 8 * i, seed=30 + i)) for i in range(5)]
B64 = [base64.b64encode(b).decode() for b in IMAGES]


def post(ts, path: str, **kwargs) -> requests.Response:
    headers = {**ts.headers("inference"), **kwargs.pop("headers", {})}
    return requests.post(f"{ts.url('inference')}{path}", headers=headers, timeout=60, **kwargs)


def labels_v2(body: dict) -> list[list[str]]:
    out = next(t for t in body["outputs"] if t["name"] == "labels")
    n, k = out["shape"]
    return [out["data"][i * k:(i + 1) * k] for i in range(n)]


def test_kserve_v1_one_and_several_images(server, expected):
    r = post(server, f"/v1/models/{MODEL}:predict", json={"instances": [{"b64": B64[0]}]})
    assert r.status_code == 200, r.text
    assert [[p["label"] for p in image] for image in r.json()["predictions"]] == expected(IMAGES[:1], 3)
    r = post(server, f"/v1/models/{MODEL}:predict",
             json={"instances": [{"b64": b} for b in B64], "parameters": {"topk": 2}})
    assert r.status_code == 200
    assert [[p["label"] for p in image] for image in r.json()["predictions"]] == expected(IMAGES, 2)


def test_open_inference_protocol_v2(server, expected):
    body = {"id": "abc-1", "inputs": [{"name": "images", "shape": [5], "datatype": "BYTES", "data": B64}],
            "parameters": {"topk": 2}}
    r = post(server, f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["model_name"], out["model_version"], out["id"]) == (MODEL, "1.0", "abc-1")
    assert labels_v2(out) == expected(IMAGES, 2)
    probs = next(t for t in out["outputs"] if t["name"] == "probabilities")
    assert probs["datatype"] == "FP32" and probs["shape"] == [5, 2]
    # the binary data extension: JSON header, then the BYTES tensor as length-prefixed raw bytes
    raw = b"".join(struct.pack("<I", len(b)) + b for b in IMAGES[:2])
    header = json.dumps({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    r = post(server, f"/v2/models/{MODEL}/infer", data=header + raw,
             headers={"Content-Type": "application/octet-stream",
                      "Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    assert labels_v2(r.json()) == expected(IMAGES[:2], 3)


def test_bad_inputs_mixed_with_good_ones_fail_alone(server, expected):
    """Concurrent requests batched together: each bad one gets its 4xx in its protocol's form,
    naming the image; the good ones their answers."""
    bad = base64.b64encode(b"not an image").decode()
    calls = [
        ("v1 good", f"/v1/models/{MODEL}:predict", {"json": {"instances": [{"b64": b} for b in B64[:3]]}}),
        ("v1 bad", f"/v1/models/{MODEL}:predict", {"json": {"instances": [{"b64": B64[0]}, {"b64": bad}]}}),
        ("v2 good", f"/v2/models/{MODEL}/infer",
         {"json": {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": B64[:2]}]}}),
        ("v2 bad", f"/v2/models/{MODEL}/infer",
         {"json": {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": [B64[0], "%%"]}]}}),
        ("v2 wrong type", f"/v2/models/{MODEL}/infer",
         {"json": {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}]}}),
        ("v1 not an object", f"/v1/models/{MODEL}:predict", {"json": [1, 2]}),
    ]
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = dict(zip([c[0] for c in calls],
                           pool.map(lambda c: post(server, c[1], **c[2]), calls)))
    assert answers["v1 good"].status_code == 200
    assert [[p["label"] for p in i] for i in answers["v1 good"].json()["predictions"]] == expected(IMAGES[:3], 3)
    assert answers["v2 good"].status_code == 200 and labels_v2(answers["v2 good"].json()) == expected(IMAGES[:2], 3)
    assert answers["v1 bad"].status_code == 400 and "image 1 of 2" in answers["v1 bad"].json()["error"]
    assert answers["v2 bad"].status_code == 400 and "element 1" in answers["v2 bad"].json()["error"]
    assert answers["v2 wrong type"].status_code == 400 and "BYTES" in answers["v2 wrong type"].json()["error"]
    assert answers["v1 not an object"].status_code == 400


def test_several_images_on_predictions(server, expected):
    url = f"/predictions/{MODEL}"
    r = post(server, url, json={"data": B64[:4], "topk": 2})
    assert r.status_code == 200 and [[p["label"] for p in i] for i in r.json()] == expected(IMAGES[:4], 2)
    files = [(f"image{i}", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(IMAGES[:3])]
    r = post(server, url, files=files + [("topk", (None, "1"))])
    assert r.status_code == 200 and [[p["label"] for p in i] for i in r.json()] == expected(IMAGES[:3], 1)
    from serving.load import multipart  # the benchmark's several-images body
    body, content_type = multipart(IMAGES[:4])
    r = post(server, url, data=body, headers={"Content-Type": content_type})
    assert r.status_code == 200 and [[p["label"] for p in i] for i in r.json()] == expected(IMAGES[:4], 3)
    r = post(server, url, files=[("data", ("0.jpg", IMAGES[0], "image/jpeg"))])  # one: the single form
    assert r.status_code == 200 and [p["label"] for p in r.json()] == expected(IMAGES[:1], 3)[0]


def test_benchmark_load_sends_several_images_per_request(server):
    """The benchmark's load generator with 3 images per request: every body (each with its own
    multipart boundary) answered 200, and the handler counted 3 images per request."""
    from serving.load import sweep_point
    point = sweep_point(server, MODEL, IMAGES, concurrency=2, requests_n=6, images_per_request=3)
    assert point["errors"] == 0 and point["images_per_request"] == 3, point
    assert point["images_per_batch"] >= 3 and point["preprocess_ms_mean"] > 0


def test_v2_health_readiness_and_metadata(server):
    base = server.url("inference")
    # probes: open (a Kubernetes probe cannot know the key generated at start)
    assert requests.get(f"{base}/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(f"{base}/v2/health/ready", timeout=10).json() == {"ready": True}
    r = requests.get(f"{base}/v2/models/{MODEL}/ready", timeout=10)
    assert r.status_code == 200 and r.json() == {"name": MODEL, "ready": True}
    assert requests.get(f"{base}/v2/models/{MODEL}/versions/1.0/ready", timeout=10).status_code == 200
    assert requests.get(f"{base}/v2/models/nope/ready", timeout=10).status_code == 404
    # metadata: behind the inference key, like the other inference routes
    assert requests.get(f"{base}/v2/models/{MODEL}", timeout=10).status_code == 401
    meta = requests.get(f"{base}/v2/models/{MODEL}", headers=server.headers("inference"), timeout=10).json()
    assert meta["name"] == MODEL and meta["versions"] == ["1.0"]
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["labels", "probabilities", "indices"]
    server_meta = requests.get(f"{base}/v2", headers=server.headers("inference"), timeout=10).json()
    assert server_meta["name"] == "torchserve"


def test_explanations_on_every_route(server, expected):
    """TorchServe's explanations API on the three routes: per image, the top-1 class (the
    prediction's) and a square saliency map that follows the image; bad input is a 4xx in the
    route's form; a client's own ``explain`` header does not turn a prediction into one."""
    r = post(server, f"/explanations/{MODEL}", data=IMAGES[0],
             headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    one = r.json()
    grid = len(one["saliency"])
    assert grid > 1 and {len(row) for row in one["saliency"]} == {grid}
    assert one["label"] == expected(IMAGES[:1], 1)[0][0] and one["method"] == "integrated_gradients"
    assert max(max(row) for row in one["saliency"]) == 1.0 and min(min(row) for row in one["saliency"]) >= 0
    r = post(server, f"/v1/models/{MODEL}:explain", json={"instances": [{"b64": b} for b in B64[:2]]})
    assert r.status_code == 200, r.text
    v1 = r.json()["explanations"]
    assert [e["label"] for e in v1] == [top[0] for top in expected(IMAGES[:2], 1)]
    assert v1[0]["saliency"] == one["saliency"] and v1[1]["saliency"] != one["saliency"]
    r = post(server, f"/v2/models/{MODEL}/explain",
             json={"id": "x1", "inputs": [{"name": "images", "shape": [2], "datatype": "BYTES", "data": B64[:2]}]})
    assert r.status_code == 200, r.text
    maps = next(o for o in r.json()["outputs"] if o["name"] == "saliency")
    assert r.json()["id"] == "x1" and maps["shape"] == [2, grid, grid]
    assert maps["data"][:grid] == v1[0]["saliency"][0]
    # bad input, in each route's form
    r = post(server, f"/explanations/{MODEL}", data=b"not an image",
             headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and r.json()["type"] == "undecodable"
    r = post(server, f"/v1/models/{MODEL}:explain", json={"instances": [{"b64": "%%"}]})
    assert r.status_code == 400 and "error" in r.json()
    r = post(server, f"/v2/models/{MODEL}/explain", json={"inputs": [{"name": "x", "shape": [1],
                                                                      "datatype": "FP32", "data": [1.0]}]})
    assert r.status_code == 400 and "BYTES" in r.json()["error"]
    r = post(server, f"/explanations/{MODEL}", json={"data": B64[:5]})
    assert r.status_code == 413 and "max_images_per_explanation" in r.json()["message"]
    r = post(server, f"/predictions/{MODEL}", data=IMAGES[0],
             headers={"Content-Type": "application/octet-stream", "explain": "True"})
    assert r.status_code == 200 and [p["label"] for p in r.json()] == expected(IMAGES[:1], 3)[0]
