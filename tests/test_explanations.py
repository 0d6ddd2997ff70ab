"""Explanations: integrated-gradients saliency of the top-1 class (handler/explanations.py) and
the handler answering explanation requests per request, in every form, next to predictions."""

import base64
import json

import pytest
import torch

from conftest import encode, scene
from handler.explanations import explanation_answer, explanation_records, saliency
from test_handler import _context, _model_dir, _run, handler  # noqa: F401 (the fixture)

pytestmark = pytest.mark.unit


class QuadrantModel(torch.nn.Module):
    """Class 0's logit is the mean of the top-left quadrant, class 1's of the bottom-right:
    the attribution of each class lies in its quadrant alone."""

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        return torch.stack([x[..., :h, :w].mean(dim=(1, 2, 3)), x[..., h:, w:].mean(dim=(1, 2, 3))], 1)


def test_saliency_lies_where_the_logit_looks():
    x = torch.rand(2, 3, 32, 32) + 0.5
    x[0, :, :16, :16] += 1.0  # image 0: class 0 wins; image 1: class 1
    x[1, :, 16:, 16:] += 1.0
    probs, maps = saliency(QuadrantModel(), x, steps=8, grid=4)
    assert probs.argmax(1).tolist() == [0, 1]
    assert maps.shape == (2, 4, 4) and maps.dtype == torch.float32
    assert float(maps.amax()) == pytest.approx(1.0) and float(maps.amin()) >= 0
    assert float(maps[0, :2, :2].min()) > 0.5 and float(maps[0, 2:, :].max()) == 0
    assert float(maps[1, 2:, 2:].min()) > 0.5 and float(maps[1, :2, :].max()) == 0
    _, forced = saliency(QuadrantModel(), x[:1], steps=8, grid=4, target=torch.tensor([1]))
    assert float(forced[0, :2, :2].max()) == 0 and float(forced[0, 2:, 2:].min()) > 0.5


def test_answer_forms():
    probs = torch.tensor([[0.1, 0.9], [0.7, 0.3]])
    maps = torch.rand(2, 3, 3)
    records = explanation_records(probs, maps, ["a", "b"])
    assert [(r["label"], r["index"], r["probability"]) for r in records] == [("b", 1, 0.9), ("a", 0, 0.7)]
    assert explanation_answer("v1", records) == {"explanations": records}
    v2 = explanation_answer("v2", records, model_name="m", model_version="1", request_id="r")
    assert v2["id"] == "r" and [o["name"] for o in v2["outputs"]] == [
        "saliency", "labels", "probabilities", "indices"]
    assert v2["outputs"][0]["shape"] == [2, 3, 3] and len(v2["outputs"][0]["data"]) == 18
    assert v2["outputs"][0]["data"][:3] == records[0]["saliency"][0]
    with pytest.raises(ValueError):
        explanation_answer("single", records)


EXPLAIN = {"explain": "True"}


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_mixed_batch_answers_each_request_its_own_way(tmp_path, three_class_checkpoint, backend):
    """Predictions, explanations (of either back-end's archive) and a bad explanation in one
    batch: each request gets its own kind of answer; the explanations' top-1 is the
    prediction's."""
    from handler.classifier_handler import ImageClassifierHandler
    model_dir, cfg = _model_dir(tmp_path, three_class_checkpoint, "--topk", "2", "--backend", backend)
    h = ImageClassifierHandler()
    h.initialize(_context(model_dir, cfg))
    a, b = encode(scene(seed=3)), encode(scene(seed=4, width=200))
    rows = [{"body": a}, {"body": a}, {"body": b"junk"}, {"body": b},
            {"body": {"instances": [{"b64": base64.b64encode(x).decode()} for x in (a, b)]}}]
    headers = [{}, EXPLAIN, EXPLAIN, EXPLAIN, EXPLAIN]
    out, status = _run(h, model_dir, cfg, rows, headers)
    assert status == [200, 200, 400, 200, 200]
    assert isinstance(out[0], list) and len(out[0]) == 2 and "saliency" not in out[0][0]
    grid = cfg["handler"].get("explain_grid", 32)
    for answer in (out[1], out[3]):
        assert len(answer["saliency"]) == grid and {len(r) for r in answer["saliency"]} == {grid}
        assert max(max(r) for r in answer["saliency"]) == pytest.approx(1.0)
    assert out[1]["label"] == out[0][0]["label"]
    assert pytest.approx(out[1]["probability"], abs=2e-3) == out[0][0]["probability"]
    assert out[1]["saliency"] != out[3]["saliency"]  # the map follows the image
    assert out[2]["type"] == "undecodable"
    assert out[4]["explanations"] == [out[1], out[3]]  # v1: the same maps, request order
    json.dumps(out)


def test_explanation_image_cap_is_a_413(handler):
    h, model_dir, cfg = handler
    images = [base64.b64encode(encode(scene(seed=s))).decode() for s in range(5)]
    out, status = _run(h, model_dir, cfg, [{"body": {"data": images}}, {"body": {"data": images}}],
                       [EXPLAIN, {}])
    assert status == [413, 200]
    assert "max_images_per_explanation" in out[0]["message"] and len(out[1]) == 5



def test_a_failing_explanation_fails_alone(handler, monkeypatch):
    """A bug in the explanation path (injected here) is a 500 for the explanation requests; the
    predictions batched with them are answered."""
    from handler import classifier_handler

    def broken(*args, **kwargs):
        raise RuntimeError("injected")
    monkeypatch.setattr(classifier_handler, "saliency", broken)
    h, model_dir, cfg = handler
    image = encode(scene(seed=9))
    out, status = _run(h, model_dir, cfg, [{"body": image}, {"body": image}], [EXPLAIN, {}])
    assert status == [500, 200]
    assert out[0]["type"] == "internal" and "explaining" in out[0]["message"] and len(out[1]) == 2
