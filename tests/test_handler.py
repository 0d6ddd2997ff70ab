"""The handler in-process, with TorchServe's real Context and a tiny fixed-weight model."""

import base64
import json
import logging
import re

import pytest
import torch
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from conftest import ROOT, TINY_PREPROCESSING, encode, scene
from handler.preprocessing import EvalTransform
from training.archive import export_files, get_args_parser
from training.data import image_folder
from training.predict import load_classifier

pytestmark = pytest.mark.unit
CLASSES = ["cat", "dog", "bird"]


def _model_dir(tmp_path, checkpoint, *archive_args):
    """The directory TorchServe would unpack the archive into."""
    backend = [] if "--backend" in archive_args else ["--backend", "eager"]
    args = get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--model-name", "m",
                                         *backend, *archive_args])
    ckpt = torch.load(checkpoint, weights_only=True)
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = export_files(ckpt, tmp_path, args)
    return tmp_path, yaml.safe_load(files["config"].read_text())


def _metrics_cache():
    """The metrics cache a TorchServe worker builds from config.properties' metrics_config."""
    cache = MetricsCacheYamlImpl(config_file_path=str(ROOT / "monitoring" / "metrics.yaml"))
    cache.initialize_cache()
    return cache


def _context(model_dir, cfg, headers=None, n=1):
    ctx = Context("m", str(model_dir), {"model": {"serializedFile": "model.pt", "modelVersion": "1.0"}},
                  8, None, "0.12.0", metrics=_metrics_cache(), model_yaml_config=cfg)
    ctx.request_processor = [RequestProcessor(h) for h in (headers or [{}] * n)]
    return ctx


@pytest.fixture()
def handler(tmp_path, three_class_checkpoint):
    from handler.classifier_handler import ImageClassifierHandler
    model_dir, cfg = _model_dir(tmp_path, three_class_checkpoint, "--topk", "2")
    h = ImageClassifierHandler()
    h.initialize(_context(model_dir, cfg))
    return h, model_dir, cfg


def _run(h, model_dir, cfg, rows, headers=None):
    ctx = _context(model_dir, cfg, headers, n=len(rows))
    out = h.handle(rows, ctx)
    return out, [ctx.get_response_status(i)[0] or 200 for i in range(len(rows))]


def test_outputs_match_the_model_exactly(handler, three_class_checkpoint, jpeg_bytes):
    h, model_dir, cfg = handler
    out, status = _run(h, model_dir, cfg, [{"body": jpeg_bytes}])
    model, classes, tf = load_classifier(three_class_checkpoint, torch.device("cpu"))
    with torch.inference_mode():
        probs = model(tf.load(jpeg_bytes)[None]).softmax(1)[0]
    top = probs.topk(2)
    assert status == [200]
    assert [r["index"] for r in out[0]] == top.indices.tolist()
    assert [r["label"] for r in out[0]] == [classes[i] for i in top.indices.tolist()]
    assert [r["probability"] for r in out[0]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_bad_request_in_a_batch_fails_alone(handler, jpeg_bytes):
    h, model_dir, cfg = handler
    png = encode(scene(seed=5), "PNG")
    rows = [{"body": jpeg_bytes}, {"body": b"not an image"}, {"data": png, "topk": b"3"},
            {"data": jpeg_bytes, "topk": b"0"}, {"body": {"data": base64.b64encode(png).decode()}}]
    out, status = _run(h, model_dir, cfg, rows)
    assert status == [200, 400, 200, 422, 200]
    assert out[1]["type"] == "undecodable" and "cannot identify" in out[1]["message"]
    assert out[3]["type"] == "bad_parameter"
    assert len(out[0]) == 2 and len(out[2]) == 3  # default k=2 from model-config, per-request 3
    assert out[4] == out[2][:2]  # same PNG via JSON base64: same answer
    json.dumps(out)  # every answer is JSON-serializable


def test_all_bad_batch_skips_inference_and_answers_each(handler):
    h, model_dir, cfg = handler
    out, status = _run(h, model_dir, cfg, [{"body": b""}, {}],)
    assert status == [400, 400]
    assert "empty" in out[0]["message"] and "no image" in out[1]["message"]


def test_form_urlencoded_request_gets_415(handler):
    h, model_dir, cfg = handler
    out, status = _run(h, model_dir, cfg, [{"garbage": b""}],
                       headers=[{"Content-Type": "application/x-www-form-urlencoded"}])
    assert status == [415] and "--data-binary" in out[0]["message"]


def test_k_is_clamped_to_the_three_classes(handler, jpeg_bytes):
    h, model_dir, cfg = handler
    out, status = _run(h, model_dir, cfg, [{"data": jpeg_bytes, "topk": b"10000"}])
    assert status == [200] and len(out[0]) == 3


def test_initialize_fails_fast_on_missing_labels_or_config(tmp_path, three_class_checkpoint):
    from handler.classifier_handler import ImageClassifierHandler
    model_dir, cfg = _model_dir(tmp_path, three_class_checkpoint)
    with pytest.raises(ValueError, match="preprocessing"):
        ImageClassifierHandler().initialize(_context(model_dir, {"handler": {"topk": 5}}))
    (model_dir / "index_to_name.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    with pytest.raises(ValueError, match="labels"):
        ImageClassifierHandler().initialize(_context(model_dir, cfg))
    (model_dir / "index_to_name.json").unlink()
    with pytest.raises(FileNotFoundError):
        ImageClassifierHandler().initialize(_context(model_dir, cfg))


def test_evaluation_and_handler_see_identical_tensors(tmp_path, three_class_checkpoint):
    """The one preprocessing: training's eval dataset and the handler produce the same input."""
    from handler.classifier_handler import ImageClassifierHandler
    folder = tmp_path / "test" / "cat"
    folder.mkdir(parents=True)
    big = encode(scene(900, 700, seed=9), "JPEG")  # large enough for the JPEG draft path
    (folder / "a.jpg").write_bytes(big)
    tf = EvalTransform.from_dict(TINY_PREPROCESSING)
    eval_tensor, _ = image_folder(tmp_path / "test", tf, draft_size=tf.resize_size)[0]

    (tmp_path / "m").mkdir()
    model_dir, cfg = _model_dir(tmp_path / "m", three_class_checkpoint)
    h = ImageClassifierHandler()
    h.initialize(_context(model_dir, cfg))
    batch = h.preprocess([{"body": big}])
    # the model's input: the handler's uint8 pixels, normalized as inference does it
    assert torch.equal(h.transform.normalize(batch.pixels)[0], eval_tensor)


def test_metrics_are_emitted_per_stage_and_per_rejection(handler, jpeg_bytes, caplog):
    h, model_dir, cfg = handler
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        _run(h, model_dir, cfg, [{"body": jpeg_bytes}, {"body": b"junk"}, {"data": jpeg_bytes, "topk": b"-1"},
                                 {"body": jpeg_bytes}])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]

    def emitted(name):
        pattern = re.compile(rf"\[METRICS\]{name}\.\w+:([0-9.e-]+)\|#(.*?)\|#type:(\w+)")
        return [(float(m[1]), m[2], m[3]) for m in map(pattern.match, lines) if m]
    assert len(emitted("classifier_preprocess_seconds")) == 2  # per decoded image
    assert [v for v, _, _ in emitted("classifier_batch_size")] == [2.0]
    assert len(emitted("classifier_inference_seconds")) == 1
    top1 = emitted("classifier_top1_probability")
    assert len(top1) == 2 and all(1 / 3 <= v <= 1 for v, _, _ in top1)
    rejected = emitted("classifier_rejected_inputs_total")
    assert sorted(dims.rsplit(":", 1)[1] for _, dims, _ in rejected) == ["bad_parameter", "undecodable"]
    assert all(kind == "COUNTER" for _, _, kind in rejected)
    assert all(kind == "HISTOGRAM" for _, _, kind in top1)
    assert all("ModelName:m,ModelVersion:1.0" in dims for _, dims, _ in top1 + rejected)


@pytest.mark.parametrize("backend", ["onnxruntime", "bf16"])
def test_backend_from_model_config_serves_like_eager(tmp_path, three_class_checkpoint, jpeg_bytes, backend):
    from handler.classifier_handler import ImageClassifierHandler
    eager_dir, eager_cfg = _model_dir(tmp_path / "eager", three_class_checkpoint, "--topk", "3")
    other_dir, other_cfg = _model_dir(tmp_path / backend, three_class_checkpoint, "--topk", "3",
                                      "--backend", backend)
    assert other_cfg["handler"]["backend"] == backend
    assert (other_dir / "model.onnx").is_file() == (backend == "onnxruntime")
    rows = [{"body": jpeg_bytes}, {"body": b"junk"}, {"body": encode(scene(seed=9), "PNG")}]
    outs = []
    for model_dir, cfg in ((eager_dir, eager_cfg), (other_dir, other_cfg)):
        h = ImageClassifierHandler()
        h.initialize(_context(model_dir, cfg))
        assert h.backend == cfg["handler"]["backend"]
        outs.append(_run(h, model_dir, cfg, rows))
    (eager, eager_status), (other, other_status) = outs
    assert eager_status == other_status == [200, 400, 200]
    for e, o in ((eager[0], other[0]), (eager[2], other[2])):
        assert [r["label"] for r in o] == [r["label"] for r in e]
        tol = 1e-4 if backend == "onnxruntime" else 2e-2
        assert [r["probability"] for r in o] == pytest.approx([r["probability"] for r in e], abs=tol)


def test_unknown_backend_in_model_config_fails_fast(tmp_path, three_class_checkpoint):
    from handler.classifier_handler import ImageClassifierHandler
    model_dir, cfg = _model_dir(tmp_path, three_class_checkpoint)
    cfg["handler"]["backend"] = "tensorrt"
    with pytest.raises(ValueError, match="tensorrt"):
        ImageClassifierHandler().initialize(_context(model_dir, cfg))


def test_misspelt_or_mistyped_settings_fail_the_load_naming_the_key(tmp_path, three_class_checkpoint):
    """handler.settings: a typo is an error naming it and the accepted keys, not a default."""
    from handler.classifier_handler import ImageClassifierHandler
    from handler.settings import DEFAULT_RETAIN_HEAP_MB, HandlerSettings
    model_dir, cfg = _model_dir(tmp_path, three_class_checkpoint)
    typo = {**cfg, "handler": {**cfg["handler"], "top_k": 3}}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['top_k'\]; accepted: .*'topk'"):
        ImageClassifierHandler().initialize(_context(model_dir, typo))
    for key, bad in (("topk", 0), ("topk", "3"), ("num_threads", -1), ("retain_heap_mb", True),
                     ("gpu_backends", "eager")):
        with pytest.raises(ValueError, match=f"handler.{key}"):
            HandlerSettings.from_config({**cfg["handler"], key: bad})
    with pytest.raises(ValueError, match="handler: section"):
        HandlerSettings.from_config(None)
    settings = HandlerSettings.from_config({"preprocessing": cfg["handler"]["preprocessing"]})
    assert (settings.topk, settings.backend, settings.retain_heap_mb) == (5, "eager", DEFAULT_RETAIN_HEAP_MB)
    h = ImageClassifierHandler()
    h.initialize(_context(model_dir, {**cfg, "handler": {**cfg["handler"], "topk": 2}}))
    assert h.default_topk == 2


def test_gpu_backends_must_be_torch_backends(tmp_path, three_class_checkpoint):
    from handler.classifier_handler import ImageClassifierHandler
    model_dir, cfg = _model_dir(tmp_path, three_class_checkpoint)
    cfg["handler"]["gpu_backends"] = ["eager", "onnxruntime-int8"]  # a CPU graph
    with pytest.raises(ValueError, match="gpu_backends"):
        ImageClassifierHandler().initialize(_context(model_dir, cfg))


def test_worker_times_its_gpu_candidates_and_keeps_the_model_fp32(three_class_checkpoint):
    """What a CUDA worker does at load, run on the CPU: each candidate is timed, the fastest
    named, and the fp32 model the eager runner uses is not cast by the bf16 candidate."""
    from handler.classifier_handler import ImageClassifierHandler
    from training.predict import load_classifier

    model, _, _ = load_classifier(three_class_checkpoint, torch.device("cpu"))
    example = torch.zeros(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    chosen, speed = ImageClassifierHandler._fastest_on_gpu(model, ["eager", "bf16"], example)
    assert set(speed) == {"eager", "bf16"} and all(v > 0 for v in speed.values())
    assert chosen == max(speed, key=speed.get)
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("max_workers", [1, 2])
def test_threads_default_to_the_cpus_shared_by_the_workers(tmp_path, three_class_checkpoint, max_workers):
    import os

    from handler.classifier_handler import ImageClassifierHandler
    model_dir, cfg = _model_dir(tmp_path, three_class_checkpoint, "--max-workers", str(max_workers))
    assert cfg["handler"]["num_threads"] == 0
    ImageClassifierHandler().initialize(_context(model_dir, cfg))  # conftest restores the count
    assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // max_workers)
    cfg["handler"]["num_threads"] = 3
    ImageClassifierHandler().initialize(_context(model_dir, cfg))
    assert torch.get_num_threads() == 3


def test_torch_runs_on_one_thread_beside_onnx_runtime(tmp_path, three_class_checkpoint,
                                                       jpeg_bytes, monkeypatch):
    """With an ONNX Runtime back-end on the CPU, ONNX Runtime gets the worker's threads and
    torch (which only preprocesses there) one, so that its spinning OpenMP threads do not hold
    the cores ONNX Runtime is about to use (``handler.backends.torch_threads``), and ONNX
    Runtime's own spin is bounded to 20 us (``handler.backends.WORKER_SPIN_US``); an
    explanation (eager gradients) runs on the worker's threads again. Eager keeps them all."""
    from handler import classifier_handler
    seen = []

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return saliency(*args, **kwargs)
    saliency = classifier_handler.saliency
    monkeypatch.setattr(classifier_handler, "saliency", spy)
    for backend, torch_count in (("onnxruntime", 1), ("eager", 2)):  # conftest restores it
        model_dir, cfg = _model_dir(tmp_path / backend, three_class_checkpoint,
                                    "--backend", backend, "--num-threads", "2")
        h = classifier_handler.ImageClassifierHandler()
        h.initialize(_context(model_dir, cfg))
        assert torch.get_num_threads() == torch_count and h.threads == 2
        if backend == "onnxruntime":  # its threads, and their spin bounded (WORKER_SPIN_US)
            options = h.model.session.get_session_options()
            assert options.intra_op_num_threads == 2
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
            assert options.get_session_config_entry("session.intra_op.spin_duration_us") == "20"
        out, status = _run(h, model_dir, cfg, [{"body": jpeg_bytes}] * 2,
                           [{}, {"explain": "True"}])
        assert status == [200, 200] and out[1]["label"] == out[0][0]["label"]
        assert seen.pop() == 2 and torch.get_num_threads() == torch_count


def test_worker_heap_setting_comes_from_the_archive(tmp_path, three_class_checkpoint, monkeypatch):
    from handler import classifier_handler
    calls = []
    monkeypatch.setattr(classifier_handler, "retain_heap", lambda mb: calls.append(mb) or mb > 0)
    model_dir, cfg = _model_dir(tmp_path / "default", three_class_checkpoint)
    assert cfg["handler"]["retain_heap_mb"] == 1024
    classifier_handler.ImageClassifierHandler().initialize(_context(model_dir, cfg))
    model_dir, cfg = _model_dir(tmp_path / "off", three_class_checkpoint, "--retain-heap-mb", "0")
    classifier_handler.ImageClassifierHandler().initialize(_context(model_dir, cfg))
    assert calls == [1024, 0]


# --- several images per request; KServe v1 and the Open Inference Protocol (v2) ---

def _images(n: int, seed: int = 20) -> list[bytes]:
    return [encode(scene(64 + 8 * i, 48 + 4 * i, seed=seed + i)) for i in range(n)]


def _expected(checkpoint, images: list[bytes], k: int) -> list[list[str]]:
    model, classes, tf = load_classifier(checkpoint, torch.device("cpu"))
    with torch.inference_mode():
        probs = model(torch.stack([tf.load(b) for b in images])).softmax(1)
    return [[classes[i] for i in row] for row in probs.topk(k).indices.tolist()]


def test_several_images_per_request_in_every_form(handler, three_class_checkpoint):
    h, model_dir, cfg = handler
    imgs = _images(3)
    b64 = [base64.b64encode(b).decode() for b in imgs]
    want = _expected(three_class_checkpoint, imgs, 2)
    json_h = {"Content-Type": "application/json"}
    rows = [{"body": {"data": b64, "topk": 2}},                                   # /predictions JSON list
            {"a": imgs[0], "b": imgs[1], "c": imgs[2], "topk": b"2"},             # multipart, 3 files
            {"body": {"instances": [{"b64": b64[0]}, {"data": b64[1]}, b64[2]],   # KServe v1
                      "parameters": {"topk": 2}}},
            {"body": {"id": "req-7", "inputs": [{"name": "images", "shape": [3], "datatype": "BYTES",
                                                 "data": b64}], "parameters": {"topk": 2}}}]
    out, status = _run(h, model_dir, cfg, rows, headers=[json_h, {}, json_h, json_h])
    assert status == [200] * 4
    assert [[r["label"] for r in image] for image in out[0]] == want
    assert [[r["label"] for r in image] for image in out[1]] == want
    assert [[r["label"] for r in image] for image in out[2]["predictions"]] == want
    v2 = out[3]
    assert (v2["model_name"], v2["model_version"], v2["id"]) == ("m", "1.0", "req-7")
    labels, probs, indices = v2["outputs"]
    assert [t["name"] for t in v2["outputs"]] == ["labels", "probabilities", "indices"]
    assert [t["datatype"] for t in v2["outputs"]] == ["BYTES", "FP32", "INT64"]
    assert all(t["shape"] == [3, 2] for t in v2["outputs"])
    assert [labels["data"][2 * i:2 * i + 2] for i in range(3)] == want
    assert probs["data"] == [r["probability"] for image in out[0] for r in image]
    assert indices["data"] == [r["index"] for image in out[0] for r in image]


def test_v2_binary_tensor_extension(handler, three_class_checkpoint):
    """The Open Inference Protocol's binary data extension: a JSON header, then the BYTES
    tensor as 4-byte little-endian lengths and raw bytes."""
    import struct
    h, model_dir, cfg = handler
    imgs = _images(2, seed=40)
    raw = b"".join(struct.pack("<I", len(b)) + b for b in imgs)
    header = json.dumps({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    out, status = _run(h, model_dir, cfg, [{"body": header + raw}],
                       headers=[{"Content-Type": "application/octet-stream",
                                 "Inference-Header-Content-Length": str(len(header))}])
    assert status == [200]
    assert out[0]["outputs"][0]["data"] == [x for row in _expected(three_class_checkpoint, imgs, 2) for x in row]


def test_one_bad_image_fails_its_request_naming_it_and_only_it(handler, jpeg_bytes):
    h, model_dir, cfg = handler
    good = base64.b64encode(jpeg_bytes).decode()
    bad = base64.b64encode(b"not an image").decode()
    json_h = {"Content-Type": "application/json"}
    rows = [{"body": {"instances": [{"b64": good}, {"b64": bad}, {"b64": good}]}},
            {"body": {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": [good, "%%"]}]}},
            {"body": {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}},
            {"body": {"data": [good, bad]}},
            {"body": jpeg_bytes}]
    out, status = _run(h, model_dir, cfg, rows, headers=[json_h] * 4 + [{}])
    assert status == [400, 400, 400, 400, 200]
    assert set(out[0]) == {"error"} and "image 1 of 3" in out[0]["error"]          # v1's error form
    assert set(out[1]) == {"error"} and 'input "x" element 1' in out[1]["error"]   # v2's
    assert "datatype BYTES" in out[2]["error"]
    assert out[3]["type"] == "undecodable" and "image 1 of 2" in out[3]["message"]  # TorchServe's
    assert isinstance(out[4], list) and len(out[4]) == 2


def test_forward_passes_stay_under_the_cap_however_many_images_a_batch_carries(
        tmp_path, three_class_checkpoint, caplog):
    """8 requests of 20 images with max_images_per_forward 16: 160 images in 10 forward passes
    of at most 16, each request's answers in its own order; 65 images in one request: 413."""
    import logging

    from handler.classifier_handler import ImageClassifierHandler
    model_dir, cfg = _model_dir(tmp_path, three_class_checkpoint)
    cfg["handler"]["max_images_per_forward"] = 16
    h = ImageClassifierHandler()
    h.initialize(_context(model_dir, cfg))
    requests = [_images(20, seed=100 + 20 * r) for r in range(8)]
    rows = [{"body": {"data": [base64.b64encode(b).decode() for b in imgs], "topk": 1}} for imgs in requests]
    caplog.set_level(logging.INFO)
    out, status = _run(h, model_dir, cfg, rows, headers=[{"Content-Type": "application/json"}] * 8)
    assert status == [200] * 8
    for imgs, answer in zip(requests, out):
        assert [image[0]["label"] for image in answer] == \
            [row[0] for row in _expected(three_class_checkpoint, imgs, 1)]
    sizes = [float(m) for m in re.findall(r"classifier_batch_size\.Count:([\d.]+)", caplog.text)]
    assert sizes and max(sizes) <= 16 and sum(sizes) == 160
    many = {"body": {"data": [base64.b64encode(b"x").decode()] * 65}}
    out, status = _run(h, model_dir, cfg, [many], headers=[{"Content-Type": "application/json"}])
    assert status == [413] and "at most 64" in out[0]["message"]
