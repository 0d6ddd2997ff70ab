"""Training, the predict CLI and archiving on real data (scikit-learn's digits scans)."""

import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
import yaml

from handler.backends import int8_weight_bits, onnx_file
from training.digits import write_digits
from training import archive, predict, train
from training.models import build_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_digits(root, size=32, seed=0)
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
    # --amp auto's choice on this machine, with its reason (timings where bf16 is native)
    amp = ckpt["metrics"]["amp"]
    assert ckpt["args"]["amp"] == amp["mode"] == "auto" and amp["chosen"] in ("none", "bf16")
    assert amp["reason"]


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


def test_predict_plot_draws_each_photo_next_to_its_bars(trained, digits, tmp_path, capsys):
    from PIL import Image

    from handler.preprocessing import decode_image
    from training.reports import topk_figure
    out, _ = trained
    images = [sorted((digits / "test" / d).glob("*.png"))[0] for d in ("3", "7")]
    ckpt = out / "checkpoint_best.pt"
    args = predict.get_args_parser().parse_args([*map(str, images), "--checkpoint", str(ckpt),
                                                 "--topk", "3", "--device", "cpu",
                                                 "--plot", str(tmp_path / "topk.png")])
    assert predict.main(args) == 0
    width, height = Image.open(tmp_path / "topk.png").size
    assert width == 900 and height > 500  # a row per photo
    model, classes, tf = predict.load_classifier(ckpt, torch.device("cpu"))
    records = predict.predict(model, classes, tf, images[1].read_bytes(), 3, torch.device("cpu"))
    fig = topk_figure([("7", decode_image(images[1].read_bytes()), records)])
    bars = fig.axes[1]
    assert [p.get_width() for p in bars.patches] == pytest.approx([100 * r["probability"] for r in records][::-1])
    assert [t.get_text() for t in bars.get_yticklabels()] == [r["label"] for r in records][::-1]
    assert fig.axes[0].images[0].get_array().shape[:2] == decode_image(images[1].read_bytes()).size[::-1]


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
    # default back-end: measured on this CPU among those passing the accuracy gate, on the
    # run's own labelled photos (no val/: train/)
    handler = cfg["handler"]
    chosen, selection = handler["backend"], handler["backend_selection"]
    speed, accuracy, rejected = (selection["images_per_s"], selection["accuracy"],
                                 selection["rejected"])
    # every candidate was either gated and timed or, too slow on this CPU (bf16 without
    # avx512_bf16 / AMX), rejected untried
    assert set(speed) == set(accuracy) and not set(speed) & set(rejected)
    assert set(speed) | set(rejected) == {"eager", "bf16", "onnxruntime", "onnxruntime-int8"}
    assert all("too slow on this CPU" in why for why in rejected.values())
    assert chosen == max(speed, key=speed.get) and chosen in selection["reason"]
    assert all(accuracy["eager"] - accuracy[n] <= 1.0 for n in speed)
    assert selection["check_dir"].endswith("train") and selection["batch_size"] == 16
    assert selection["threads"] >= 1 and isinstance(selection["cpu_flags"], list)
    assert set(handler["gpu_backends"]) <= {"eager", "bf16"} and "eager" in handler["gpu_backends"]
    onnx_files = {n for n in names if n.endswith(".onnx")}  # only the files the choice reads
    int8_files = {"model.int8.onnx"} | {"model.int8-w8.onnx" for bits, w in
                                        selection["int8_weights"].items() if bits == 8 and w["kept"]}
    assert onnx_files == ({"onnxruntime": {"model.onnx"}, "onnxruntime-int8": int8_files}
                          .get(chosen, set()))
    # both int8 widths gated, each where its arithmetic is exact for this CPU
    assert set(selection["int8_weights"]) == {7, 8}
    assert selection["int8_weights"][7]["arithmetic"] == "native"
    assert selection["int8_served_here"] == (
        8 if int8_weight_bits() == 8 and selection["int8_weights"][8]["kept"] else 7)


def test_int8_archive_records_its_gate(trained, tmp_path):
    out, _ = trained
    mar = archive.main(archive.get_args_parser().parse_args([
        "--checkpoint", str(out / "checkpoint_best.pt"), "--model-name", "digits",
        "--export-path", str(tmp_path), "--backend", "onnxruntime-int8"]))
    with zipfile.ZipFile(mar) as z:
        cfg = yaml.safe_load(z.read("model-config.yaml"))
        names = z.namelist()
    gate = cfg["handler"]["quantization"]
    assert cfg["handler"]["backend"] == "onnxruntime-int8"
    assert gate["calibration_dir"].endswith("train") and gate["calibration_images"] == 64
    assert gate["check_images"] == 400
    assert gate["fp32_accuracy"] - gate["int8_accuracy"] <= 1.0 and gate["top1_agreement"] > 90
    # the 7-bit graph every CPU serves exactly, and the 8-bit one for VNNI CPUs where it passed
    weights = gate["weights"]
    assert "model.int8.onnx" in names and weights[7]["kept"]
    assert ("model.int8-w8.onnx" in names) == weights[8]["kept"]
    assert weights[8]["arithmetic"] == ("native" if int8_weight_bits() == 8 else "reference")
    served = weights[gate["served_here"]]
    assert (gate["int8_accuracy"], gate["top1_agreement"]) == (served["accuracy"],
                                                               served["top1_agreement"])


def test_int8_archive_built_without_vnni_gates_the_8bit_graph_by_reference(
        trained, tmp_path, monkeypatch):
    """On a CPU without VNNI (simulated: its flags), the 8-bit graph cannot run exactly: it is
    gated in reference arithmetic and shipped for VNNI workers; this CPU serves the 7-bit one."""
    import handler.backends as backends
    monkeypatch.setattr(backends, "cpu_flags", lambda: ["avx2"])
    out, _ = trained
    mar = archive.main(archive.get_args_parser().parse_args([
        "--checkpoint", str(out / "checkpoint_best.pt"), "--model-name", "digits",
        "--export-path", str(tmp_path), "--backend", "onnxruntime-int8"]))
    with zipfile.ZipFile(mar) as z:
        gate = yaml.safe_load(z.read("model-config.yaml"))["handler"]["quantization"]
        names = z.namelist()
    weights = gate["weights"]
    assert gate["served_here"] == 7 and gate["int8_accuracy"] == weights[7]["accuracy"]
    assert weights[7]["arithmetic"] == "native" and weights[8]["arithmetic"] == "reference"
    assert ("model.int8-w8.onnx" in names) == weights[8]["kept"] and "model.int8.onnx" in names


def test_auto_backend_keeps_fp32_when_the_gate_refuses_the_others(trained, tmp_path):
    out, _ = trained
    mar = archive.main(archive.get_args_parser().parse_args([
        "--checkpoint", str(out / "checkpoint_best.pt"), "--model-name", "digits",
        "--export-path", str(tmp_path), "--check-images", "60", "--max-accuracy-drop", "-100",
        "--auto-candidates", "eager", "onnxruntime-int8"]))
    cfg = yaml.safe_load(zipfile.ZipFile(mar).read("model-config.yaml"))["handler"]
    assert cfg["backend"] == "eager"  # the fp32 reference is never refused
    assert set(cfg["backend_selection"]["rejected"]) == {"onnxruntime-int8"}
    assert cfg["gpu_backends"] == ["eager"]


def test_auto_backend_rejects_a_candidate_too_slow_to_matter_without_gating_it(
        trained, tmp_path, monkeypatch):
    from training import backend_choice
    # every candidate but eager now counts as too slow for this CPU
    monkeypatch.setattr(backend_choice, "MIN_SPEED_OF_EAGER", 1e6)
    out, _ = trained
    mar = archive.main(archive.get_args_parser().parse_args([
        "--checkpoint", str(out / "checkpoint_best.pt"), "--model-name", "digits",
        "--export-path", str(tmp_path), "--check-images", "60",
        "--auto-candidates", "eager", "bf16", "onnxruntime-int8"]))
    with zipfile.ZipFile(mar) as z:
        cfg = yaml.safe_load(z.read("model-config.yaml"))["handler"]
        names = z.namelist()
    selection = cfg["backend_selection"]
    assert cfg["backend"] == "eager" and set(selection["rejected"]) == {"bf16", "onnxruntime-int8"}
    assert all("not gated" in why for why in selection["rejected"].values())
    assert set(selection["accuracy"]) == set(selection["images_per_s"]) == {"eager"}
    assert cfg["gpu_backends"] == ["eager"]  # an untried bf16 is not offered to GPU workers
    assert not [n for n in names if n.endswith(".onnx")]


def test_auto_backend_without_labelled_photos_times_fp32_backends_only(trained, tmp_path):
    out, _ = trained
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    ckpt["args"]["data_dir"] = str(tmp_path / "moved")
    torch.save(ckpt, tmp_path / "ckpt.pt")
    mar = archive.main(archive.get_args_parser().parse_args([
        "--checkpoint", str(tmp_path / "ckpt.pt"), "--model-name", "digits",
        "--export-path", str(tmp_path)]))
    selection = yaml.safe_load(zipfile.ZipFile(mar).read("model-config.yaml"))["handler"][
        "backend_selection"]
    assert set(selection["images_per_s"]) == {"eager", "onnxruntime"} and not selection["accuracy"]


def test_int8_accuracy_gate_refuses_to_build(trained, tmp_path):
    out, _ = trained
    args = archive.get_args_parser().parse_args([
        "--checkpoint", str(out / "checkpoint_best.pt"), "--model-name", "digits",
        "--export-path", str(tmp_path), "--check-images", "50", "--max-accuracy-drop", "-100",
        "--backend", "onnxruntime-int8"])
    with pytest.raises(ValueError, match="int8 loses .* --backend onnxruntime or eager"):
        archive.main(args)
    assert not list(tmp_path.glob("*.mar"))


def test_int8_needs_labelled_calibration_images(trained, tmp_path):
    out, _ = trained
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    ckpt["args"]["data_dir"] = str(tmp_path / "moved")
    torch.save(ckpt, tmp_path / "ckpt.pt")
    args = archive.get_args_parser().parse_args([
        "--checkpoint", str(tmp_path / "ckpt.pt"), "--model-name", "digits", "--export-path", str(tmp_path),
        "--backend", "onnxruntime-int8"])
    with pytest.raises(FileNotFoundError, match="--calibration-dir"):
        archive.main(args)


@pytest.mark.e2e
def test_served_int8_archive_answers_like_the_int8_model(trained, digits, tmp_path):
    """An int8 archive in a real TorchServe: same top-1 as ONNX Runtime in-process."""
    from conftest import running_server
    from serving.inference import list_images
    from training.export import onnx_predictions

    out, _ = trained
    store = tmp_path / "store"
    mar = archive.main(archive.get_args_parser().parse_args([
        "--checkpoint", str(out / "checkpoint_best.pt"), "--model-name", "digits8",
        "--export-path", str(store), "--batch-size", "8", "--num-threads", "1",
        "--backend", "onnxruntime-int8"]))
    zipfile.ZipFile(mar).extractall(tmp_path / "mar")
    _, classes, tf = predict.load_classifier(out / "checkpoint_best.pt", torch.device("cpu"))
    files = [p for p, _ in list_images(digits / "test")][::12]
    # the int8 file a worker on this CPU reads (8-bit weights with VNNI)
    expected = onnx_predictions(Path(onnx_file("onnxruntime-int8", str(tmp_path / "mar"))),
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


def test_fast_path_head_scores_the_same_inside_the_full_model(digits, tmp_path):
    """--head-from-features: the head fitted on cached features, put back into the network,
    must give the val accuracy the fit reported; then --epochs fine-tunes from it."""
    from torch.utils.data import DataLoader

    from training.data import image_folder
    from training.predict import load_classifier

    common = ["--data-dir", str(digits), "--arch", "tf_efficientnet_lite0", "--weights", "package",
              "--head-from-features", "--image-size", "32", "--no-feature-flips", "--workers", "0",
              "--feature-cache", str(tmp_path / "cache"), "--head-cs", "0.01", "1.0",
              "--amp", "none"]  # both runs extract the same features: no timed choice between them
    out = tmp_path / "head"
    metrics = train.main(train.get_args_parser().parse_args([*common, "--output-dir", str(out)]))
    table = json.loads((out / "head_fit.json").read_text())
    chosen = next(row for row in table if row.get("chosen"))
    assert [row["C"] for row in table] == [0.01, 1.0] and metrics["epoch"] == 0
    assert metrics["best_val_accuracy"] == chosen["val_accuracy"] > 0.5
    assert (out / "head_fit.png").stat().st_size > 0 and "test_accuracy" in metrics

    model, _, tf = load_classifier(out / "checkpoint_best.pt", torch.device("cpu"))
    assert tf.mean == (0.5, 0.5, 0.5) and tf.interpolation == "bicubic"  # from the weights
    val = image_folder(digits / "val", tf, tf.resize_size)
    correct = 0
    with torch.inference_mode():
        for x, y in DataLoader(val, batch_size=64):
            correct += (model(x).argmax(1) == y).sum().item()
    assert correct / len(val) == pytest.approx(chosen["val_accuracy"], abs=1.5 / len(val))

    tuned = tmp_path / "tuned"
    metrics = train.main(train.get_args_parser().parse_args([
        *common, "--output-dir", str(tuned), "--epochs", "1", "--train-last", "2", "--lr", "2e-4",
        "--freeze-bn-stats", "--hflip-prob", "0", "--tta", "auto", "--wise-ft", "auto",
        "--wise-ft-alphas", "0.5"]))
    history = json.loads((tuned / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    best_trained = max(chosen["val_accuracy"], history[0]["val_accuracy"])
    if metrics["epoch"] == 1:  # fine-tuning won: WiSE-FT scored the halfway weights too
        wise = metrics["wise_ft"]
        assert wise["val_accuracy"]["1.0"] == history[0]["val_accuracy"]
        assert metrics["best_val_accuracy"] == max(wise["val_accuracy"].values()) >= best_trained
        ends = [torch.load(d / name, weights_only=True)["model"]
                for d, name in ((out, "checkpoint_best.pt"), (tuned, "checkpoint_last.pt"))]
        kept = torch.load(tuned / "checkpoint_best.pt", weights_only=True)["model"]
        expected_state = train.interpolate_weights(*ends, wise["alpha"])
        assert all(torch.allclose(kept[k].float(), expected_state[k].float(), atol=1e-6) for k in kept)
    else:  # the fitted head won (one epoch at 32 px does not beat it here): nothing to mix
        assert metrics["best_val_accuracy"] == best_trained and "wise_ft" not in metrics
        head = torch.load(out / "checkpoint_best.pt", weights_only=True)["model"]
        kept = torch.load(tuned / "checkpoint_best.pt", weights_only=True)["model"]
        assert all(torch.equal(kept[k], head[k]) for k in kept)
    # --tta auto: flips kept only if they raised val accuracy, and the checkpoint says so
    tta = metrics["tta"]
    assert tta["used"] == (tta["val_accuracy_flip"] > tta["val_accuracy"])
    ckpt = torch.load(tuned / "checkpoint_best.pt", weights_only=True)
    assert ckpt["tta"] == ("flip" if tta["used"] else None)
    assert tta["val_accuracy"] == pytest.approx(metrics["best_val_accuracy"], abs=1.5 / len(val))


def test_wise_ft_interpolates_and_keeps_the_smallest_best_alpha():
    """Two classes, one point each; the start's weights swap them, the end's are right. The
    interpolation is right for alpha > 0.5 only (at 0.5 the logits tie): 0.75 and 1.0 score
    100 %, and the smaller wins."""
    from torch.utils.data import TensorDataset

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2, bias=False))
    start = {"1.weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
    end = {"1.weight": torch.eye(2)}
    mixed = train.interpolate_weights(start, end, 0.25)
    assert torch.equal(mixed["1.weight"], 0.75 * start["1.weight"] + 0.25 * end["1.weight"])
    val = TensorDataset(torch.eye(2).reshape(2, 2, 1, 1), torch.tensor([0, 1]))
    args = train.get_args_parser().parse_args(["--data-dir", "x", "--wise-ft", "auto"])
    metrics = {"best_val_accuracy": 1.0}
    chosen = train.choose_wise_ft(args, model, start, end, val, {"batch_size": 2},
                                  torch.nn.CrossEntropyLoss(), torch.device("cpu"), metrics)
    assert metrics["wise_ft"] == {"val_accuracy": {"0.25": 0.0, "0.5": 0.5, "0.75": 1.0, "1.0": 1.0},
                                  "alpha": 0.75}
    assert torch.equal(chosen["1.weight"], train.interpolate_weights(start, end, 0.75)["1.weight"])
    assert torch.equal(model.state_dict()["1.weight"], chosen["1.weight"])
    with pytest.raises(ValueError, match="--head-from-features"):
        train.main(train.get_args_parser().parse_args(["--data-dir", "x", "--wise-ft", "auto"]))


def test_learning_curves_mark_the_best_epoch_and_keep_a_loss_spike_off_the_axis():
    import matplotlib.pyplot as plt

    from training.reports import learning_curves_figure
    history = [{"epoch": e, "train_loss": tl, "val_loss": vl, "train_accuracy": ta, "val_accuracy": va}
               for e, tl, vl, ta, va in [(1, 9.0, 8.0, 0.5, 0.6), (2, 0.4, 0.3, 0.9, 0.93),
                                         (3, 0.3, 0.25, 0.95, 0.96), (4, 0.2, 0.28, 0.97, 0.95)]]
    fig = learning_curves_figure(history)
    loss, acc = fig.axes
    for ax in (loss, acc):  # the dashed line at the best val epoch (3), not the last (4)
        assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [3]
    assert loss.get_ylim()[1] < 1.0  # the 9.0 spike does not flatten epochs 2-4
    assert any("off the axis" in t.get_text() for t in loss.texts)
    plt.close(fig)
    calm = [dict(h, train_loss=0.5, val_loss=0.4) for h in history]
    fig = learning_curves_figure(calm)
    assert not fig.axes[0].texts
    plt.close(fig)


def test_mixup_and_cutmix_mix_images_and_targets_alike():
    """Each mixed image is lam x itself + (1 - lam) x its neighbour in the batch (MixUp: every
    pixel; CutMix: a box of that area), and its soft target says the same lam."""
    assert train.batch_mixing(0.0, 0.0, 4) is None
    n = 8
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 16, 16).contiguous()
    targets = torch.arange(n) % 4  # a neighbour (i - 1) never has the same class
    for alphas in ((0.4, 0.0), (0.0, 1.0), (0.2, 1.0)):
        mix = train.batch_mixing(*alphas, num_classes=4)
        for seed in range(5):
            torch.manual_seed(seed)
            mixed, soft = mix(images, targets)
            assert soft.shape == (n, 4) and torch.allclose(soft.sum(1), torch.ones(n))
            lam = soft[torch.arange(n), targets]
            partner = soft[torch.arange(n), targets.roll(1)]
            assert torch.allclose(lam + partner, torch.ones(n))
            expected = lam * torch.arange(n) + partner * torch.arange(n).roll(1)
            assert torch.allclose(mixed.mean(dim=(1, 2, 3)), expected, atol=1e-4), alphas


def test_training_epoch_with_mixing_takes_soft_targets():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    data = TensorDataset(torch.randn(16, 3, 12, 12), torch.arange(16) % 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def criterion(logits, labels):
        seen.append(labels)
        return torch.nn.functional.cross_entropy(logits, labels)
    out = train.train_one_epoch(model, DataLoader(data, batch_size=8), criterion,
                                opt, torch.device("cpu"), "t", mix=train.batch_mixing(0.2, 1.0, 3))
    assert out["images"] == 16 and torch.isfinite(torch.tensor(out["loss"]))
    # the loss got class probabilities, not the int64 labels
    assert len(seen) == 2 and all(t.dtype == torch.float32 and t.shape == (8, 3) for t in seen)
    assert all(torch.allclose(t.sum(1), torch.ones(8)) for t in seen)


def test_learning_rate_warms_up_and_decays_every_batch():
    from argparse import Namespace
    from torch.utils.data import DataLoader, TensorDataset

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten())
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    args = Namespace(epochs=3, lr_warmup_epochs=1, lr_scheduler="cosine", lr_step_size=10,
                     lr_gamma=0.1)
    sched = train.make_scheduler(args, opt, steps_per_epoch=4)
    loader = DataLoader(TensorDataset(torch.randn(16, 3, 2, 2), torch.arange(16) % 3), batch_size=4)
    lrs = []
    for _ in range(3):  # the loop the trainer runs: the scheduler steps inside the epoch
        lrs.append(opt.param_groups[0]["lr"])
        train.train_one_epoch(model, loader, torch.nn.functional.cross_entropy, opt,
                              torch.device("cpu"), "t", scheduler=sched)
    # every step of the 12 moved the rate: warm-up 0.02 -> 0.2 over epoch 1, then cosine to 0
    assert lrs[0] == pytest.approx(0.02) and lrs[1] == pytest.approx(0.2)
    assert 0.05 < lrs[2] < 0.15  # half way down the cosine, not held for the whole epoch
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    factors = [train.lr_factor(s, steps_per_epoch=4, epochs=3, warmup_epochs=1) for s in range(13)]
    assert factors[:5] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0])
    assert all(a > b for a, b in zip(factors[4:], factors[5:]))
    assert [train.lr_factor(s, steps_per_epoch=2, epochs=6, schedule="step", step_size=2,
                            gamma=0.5) for s in (0, 3, 4, 11)] == [1.0, 1.0, 0.5, 0.25]


def _tiny_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, 3))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_autocast_runs_the_training_forward_in_16_bits_and_keeps_float32_weights(dtype):
    from torch.utils.data import DataLoader, TensorDataset
    from training.amp import grad_scaler

    torch.manual_seed(0)
    model = _tiny_net()
    seen = []
    model[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []

    def criterion(logits, labels):
        losses.append(logits.dtype)
        return torch.nn.functional.cross_entropy(logits, labels)
    loader = DataLoader(TensorDataset(torch.randn(16, 3, 12, 12), torch.arange(16) % 3), batch_size=8)
    device = torch.device("cpu")
    # fp16 on a CPU only to run the GradScaler path GPUs take (train.main refuses it on a CPU)
    scaler = torch.amp.GradScaler("cpu") if dtype is torch.float16 else grad_scaler(device, dtype)
    out = train.train_one_epoch(model, loader, criterion, opt, device, "t", amp=dtype, scaler=scaler)
    assert out["images"] == 16 and torch.isfinite(torch.tensor(out["loss"]))
    assert seen == [dtype or torch.float32] * 2  # the convolution ran in the autocast type
    assert losses == [torch.float32] * 2  # the loss is taken in float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_amp_auto_times_float32_and_bf16_and_leaves_the_model_as_it_was():
    from training import amp

    torch.manual_seed(0)
    model = _tiny_net().train()  # batch norm in train mode: a forward moves its statistics
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 3
    loss = torch.nn.functional.cross_entropy
    dtype, record = amp.choose_amp("auto", model, x, y, loss, flags=["avx2", "amx_bf16"])
    assert set(record["step_s"]) == {"none", "bf16"} and all(s > 0 for s in record["step_s"].values())
    wins = record["step_s"]["none"] / record["step_s"]["bf16"] >= amp.MIN_SPEEDUP
    assert (dtype, record["chosen"]) == ((torch.bfloat16, "bf16") if wins else (None, "none"))
    assert all(f"{name} {s * 1000:.0f} ms" in record["reason"] for name, s in record["step_s"].items())
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # weights and running statistics
    assert all(p.grad is None for p in model.parameters())
    # no native bf16: nothing is timed
    dtype, record = amp.choose_amp("auto", model, x, y, loss, flags=["avx2"])
    assert dtype is None and "step_s" not in record and "amx_bf16" in record["reason"]
    assert amp.choose_amp("none", model, x, y, loss)[0] is None
    assert amp.choose_amp("bf16", model, x, y, loss)[0] is torch.bfloat16
    with pytest.raises(ValueError, match="CUDA"):
        amp.choose_amp("fp16", model, x, y, loss)


def test_zero_epochs_without_a_head_fit_keeps_the_model_as_built(digits, tmp_path):
    # what the benchmark's speed-only checkpoints are (an architecture with random weights)
    args = train.get_args_parser().parse_args([
        "--data-dir", str(digits), "--output-dir", str(tmp_path), "--arch", "mobilenet_v3_small",
        "--epochs", "0", "--image-size", "32", "--workers", "0"])
    metrics = train.main(args)
    ckpt = torch.load(tmp_path / "checkpoint_best.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and metrics["epoch"] == 0 and 0 <= metrics["best_val_accuracy"] <= 1
    assert not (tmp_path / "history.json").exists()  # no epoch ran
    model = build_model("mobilenet_v3_small", 10)
    model.load_state_dict(ckpt["model"])  # the architecture's own weights, strictly
    report = json.loads((tmp_path / "test_report.json").read_text())
    assert report["accuracy"] == metrics["test_accuracy"]
