"""Training, the predict CLI and archiving on real data (scikit-learn's digits scans)."""

import argparse
import json
import shutil
import zipfile
from collections import Counter

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
import yaml

from scripts import make_digits
from training import archive, predict, train
from training.models import build_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    make_digits.main(argparse.Namespace(output=root, size=32, seed=0))
    return root


def test_digits_imagefolder_is_stratified(digits):
    counts = {split: sum(1 for _ in (digits / split).rglob("*.png")) for split in ("train", "val", "test")}
    assert sum(counts.values()) == 1797
    assert counts["train"] == 1078 and abs(counts["val"] - counts["test"]) <= 1
    per_class = Counter(p.parent.name for p in (digits / "test").rglob("*.png"))
    assert sorted(per_class) == [str(d) for d in range(10)] and min(per_class.values()) >= 34


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    shutil.copytree(digits / "train", data / "train")  # no val/: the trainer must split one off
    shutil.copytree(digits / "test", data / "test")
    out = tmp_path_factory.mktemp("run")
    args = train.get_args_parser().parse_args([
        "--data-dir", str(data), "--output-dir", str(out), "--arch", "mobilenet_v3_small",
        "--epochs", "2", "--image-size", "32", "--batch-size", "64", "--lr", "3e-3",
        "--hidden-units", "32", "--dropout", "0.1", "--workers", "0", "--val-fraction", "0.2"])
    metrics = train.main(args)
    return out, metrics


def test_training_writes_every_output(trained):
    out, metrics = trained
    for name in ("args.yaml", "checkpoint_best.pt", "checkpoint_last.pt", "history.csv",
                 "history.json", "learning_curves.png", "test_report.json",
                 "classification_report.txt", "confusion_matrix.png", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert metrics["best_val_accuracy"] == max(h["val_accuracy"] for h in history)
    assert yaml.safe_load((out / "args.yaml").read_text())["arch"] == "mobilenet_v3_small"


def test_checkpoint_is_self_describing(trained):
    out, _ = trained
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    assert ckpt["class_names"] == [str(d) for d in range(10)]
    assert ckpt["arch"] == "mobilenet_v3_small" and ckpt["num_classes"] == 10
    assert ckpt["preprocessing"]["crop_size"] == 32 and ckpt["preprocessing"]["resize_size"] == 37
    assert ckpt["head"] == {"hidden_units": 32, "dropout": 0.1}
    assert ckpt["args"]["val_fraction"] == 0.2 and "best_val_accuracy" in ckpt["metrics"]


def test_test_report_is_consistent(trained):
    out, metrics = trained
    report = json.loads((out / "test_report.json").read_text())
    cm = torch.tensor(report["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == report["num_images"] == 360
    assert report["accuracy"] == pytest.approx(cm.diag().sum().item() / cm.sum().item())
    assert report["accuracy"] == metrics["test_accuracy"]
    assert set(report["per_class"]["3"]) >= {"precision", "recall", "f1-score", "support"}


def test_predict_cli_prints_topk_table(trained, digits, capsys):
    out, _ = trained
    image = sorted((digits / "test" / "7").glob("*.png"))[0]
    args = predict.get_args_parser().parse_args([str(image), "--checkpoint", str(out / "checkpoint_best.pt"),
                                                 "--topk", "3", "--device", "cpu"])
    assert predict.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["rank", "label", "index", "probability"]
    rows = [line.split() for line in lines[2:5]]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    probs = [float(r[3]) for r in rows]
    assert probs == sorted(probs, reverse=True) and all(r[1] == r[2] for r in rows)


def test_archive_has_config_and_labels_from_checkpoint(trained, tmp_path):
    out, _ = trained
    mar = archive.main(archive.get_args_parser().parse_args([
        "--checkpoint", str(out / "checkpoint_best.pt"), "--model-name", "digits", "--version", "2.0",
        "--export-path", str(tmp_path), "--topk", "3", "--batch-size", "16", "--max-batch-delay", "5",
        "--max-workers", "2", "--device-type", "gpu", "--device-ids", "0"]))
    with zipfile.ZipFile(mar) as z:
        cfg = yaml.safe_load(z.read("model-config.yaml"))
        labels = json.loads(z.read("index_to_name.json"))
        exported = torch.load(z.open("model.pt"), weights_only=True)
        names = z.namelist()
    assert labels == {str(i): str(i) for i in range(10)}
    assert cfg["batchSize"] == 16 and cfg["maxBatchDelay"] == 5 and cfg["maxWorkers"] == 2
    assert cfg["deviceType"] == "gpu" and cfg["deviceIds"] == [0]
    assert cfg["handler"]["topk"] == 3 and cfg["handler"]["preprocessing"]["crop_size"] == 32
    assert exported["head"] == {"hidden_units": 32, "dropout": 0.1}
    # default back-end: int8 ONNX Runtime, calibrated on the run's own data (no val/: train/)
    gate = cfg["handler"]["quantization"]
    assert cfg["handler"]["backend"] == "onnxruntime-int8" and "model.int8.onnx" in names
    assert gate["calibration_dir"].endswith("train") and gate["calibration_images"] == 64
    assert gate["check_images"] == 400
    assert gate["fp32_accuracy"] - gate["int8_accuracy"] <= 1.0 and gate["top1_agreement"] > 90


def test_int8_accuracy_gate_refuses_to_build(trained, tmp_path):
    out, _ = trained
    args = archive.get_args_parser().parse_args([
        "--checkpoint", str(out / "checkpoint_best.pt"), "--model-name", "digits",
        "--export-path", str(tmp_path), "--check-images", "50", "--max-accuracy-drop", "-100"])
    with pytest.raises(ValueError, match="int8 loses .* --backend onnxruntime or eager"):
        archive.main(args)
    assert not list(tmp_path.glob("*.mar"))


def test_int8_needs_labelled_calibration_images(trained, tmp_path):
    out, _ = trained
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    ckpt["args"]["data_dir"] = str(tmp_path / "moved")
    torch.save(ckpt, tmp_path / "ckpt.pt")
    args = archive.get_args_parser().parse_args([
        "--checkpoint", str(tmp_path / "ckpt.pt"), "--model-name", "digits", "--export-path", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="--calibration-dir"):
        archive.main(args)


@pytest.mark.e2e
def test_served_int8_archive_answers_like_the_int8_model(trained, digits, tmp_path):
    """The default (int8) archive in a real TorchServe: same top-1 as ONNX Runtime in-process."""
    from conftest import running_server
    from scripts.classify import list_images
    from training.export import onnx_predictions

    out, _ = trained
    store = tmp_path / "store"
    mar = archive.main(archive.get_args_parser().parse_args([
        "--checkpoint", str(out / "checkpoint_best.pt"), "--model-name", "digits8",
        "--export-path", str(store), "--batch-size", "8", "--num-threads", "1"]))
    zipfile.ZipFile(mar).extract("model.int8.onnx", tmp_path)
    _, classes, tf = predict.load_classifier(out / "checkpoint_best.pt", torch.device("cpu"))
    files = [p for p, _ in list_images(digits / "test")][::12]
    expected = onnx_predictions(tmp_path / "model.int8.onnx",
                                torch.stack([tf.load(p.read_bytes()) for p in files]))
    with running_server(tmp_path / "ts", store, ["digits8=digits8.mar"]) as ts:
        url = f"{ts.url('inference')}/predictions/digits8"
        with ThreadPoolExecutor(8) as pool:  # concurrent: answered in batches
            answers = list(pool.map(lambda p: requests.post(
                url, data=p.read_bytes(), headers={**ts.headers("inference"),
                                                   "Content-Type": "image/png"}, timeout=60), files))
    assert [a.status_code for a in answers] == [200] * len(files)
    assert [a.json()[0]["label"] for a in answers] == [classes[i] for i in expected]


@pytest.mark.parametrize("arch,attr", [("densenet121", "classifier"), ("vgg16", "classifier.6"),
                                       ("resnet18", "fc")])
def test_build_model_replaces_the_classifier(arch, attr):
    model = build_model(arch, 4, hidden_units=16, freeze_backbone=True)
    head = model.get_submodule(attr)
    assert isinstance(head, torch.nn.Sequential) and head[-1].out_features == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(attr + ".") for n in trainable)


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("densenet122", 3)
    with pytest.raises(ValueError, match="unknown weights"):
        build_model("densenet121", 3, weights="IMAGENET9K")
