"""A tiny smoke run of scripts/benchmark.py: structure and error-free figures, no timing asserts."""

import json

import pytest

from conftest import encode, make_checkpoint, scene
from scripts import benchmark

pytestmark = pytest.mark.e2e
CLASSES = ["a", "b", "c", "d", "e"]  # the stock image_classifier handler needs >= 5 classes


def expected_accuracy(checkpoint, folder) -> float:
    """Top-1 % of the checkpoint's model on ``folder``, computed here, one image at a time."""
    import torch

    from serving.inference import list_images
    from training.predict import load_classifier
    model, classes, transform = load_classifier(checkpoint, torch.device("cpu"))
    images = list_images(folder)
    with torch.inference_mode():
        correct = sum(classes[model(transform.load(path.read_bytes())[None]).argmax(1).item()] == truth
                      for path, truth in images)
    return round(100 * correct / len(images), 2)


def test_benchmark_smoke(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt", CLASSES)
    for i in range(10):
        folder = tmp_path / "images" / CLASSES[i % 5]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(encode(scene(seed=i)))
    args = benchmark.get_args_parser().parse_args([
        "--checkpoint", str(checkpoint), "--images", str(tmp_path / "images"),
        "--accuracy-dir", str(tmp_path / "images"), "--backends", "eager", "onnxruntime",
        "--serve", "onnxruntime", "--stock", "--concurrency", "1", "8", "--requests", "12",
        "--batch-size", "4", "--threads", "1", "--limit-seconds", "0.3",
        "--output-dir", str(tmp_path / "out")])
    result = benchmark.main(args)
    saved = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert list(saved["backends"]) == ["eager", "onnxruntime"]
    for b in saved["backends"].values():
        assert set(b["limit"]) == {"1", "4"} and b["warmup_s"] > 0 and b["archive_s"] > 0
        assert b["accuracy"] == expected_accuracy(checkpoint, tmp_path / "images")
    # the same weights in fp32: ONNX Runtime scores the same images the same way
    assert saved["backends"]["eager"]["accuracy"] == saved["backends"]["onnxruntime"]["accuracy"]
    assert list(saved["sweeps"]) == ["ours:onnxruntime", "stock"]
    for label, sweep in saved["sweeps"].items():
        assert [p["concurrency"] for p in sweep] == [1, 8]
        for p in sweep:
            assert p["errors"] == 0 and p["requests"] == 12, (label, p)
            assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] and p["images_per_s"] > 0
            assert p["queue_ms_mean"] >= 0
    ours = saved["sweeps"]["ours:onnxruntime"]
    assert all(p["inference_ms_per_batch"] > 0 and 1 <= p["images_per_batch"] <= 4 for p in ours)
    assert all(0 < p["model_busy"] <= 1 and p["client_cpu_ms_per_request"] > 0 for p in ours)
    assert "limit_at_sweep" in saved["backends"]["onnxruntime"]  # re-measured next to its sweep
    assert "limit_at_sweep" not in saved["backends"]["eager"]  # not served
    assert ours[0]["images_per_batch"] == 1  # concurrency 1: nothing to batch with
    assert "preprocess_ms_mean" not in saved["sweeps"]["stock"][0]  # the stock handler has no such metric
    # the ratios are the run's own figures divided as the goals define them
    ratios, limits = saved["ratios"], saved["backends"]
    c8 = {label: next(p for p in sweep if p["concurrency"] == 8) for label, sweep in saved["sweeps"].items()}
    assert ratios["ours:onnxruntime peak / in-process limit"] == round(
        max(p["images_per_s"] for p in ours) / limits["onnxruntime"]["limit_at_sweep"]["4"]["images_per_s"], 2)
    pipeline = limits["onnxruntime"]["limit_at_sweep"]["pipeline"]  # decode + preprocess + forward
    assert pipeline["images_per_s"] > 0 and pipeline["ms_per_batch"] > 0
    assert ratios["ours:onnxruntime peak / in-process pipeline (decode, preprocess, forward)"] == round(
        max(p["images_per_s"] for p in ours) / pipeline["images_per_s"], 2)
    assert ratios["ours:onnxruntime p50 at concurrency 1 - batch-1 forward (ms)"] == round(
        ours[0]["p50_ms"] - limits["onnxruntime"]["limit_at_sweep"]["1"]["ms_per_batch"], 1)
    assert ratios["ours:onnxruntime / stock at concurrency 8"] == round(
        c8["ours:onnxruntime"]["images_per_s"] / c8["stock"]["images_per_s"], 2)
    assert ratios["ours:onnxruntime p99 / stock p99 at concurrency 8"] == round(
        c8["ours:onnxruntime"]["p99_ms"] / c8["stock"]["p99_ms"], 2)
    assert ratios["onnxruntime in-process / eager in-process (batch 4)"] == round(
        limits["onnxruntime"]["limit"]["4"]["images_per_s"] / limits["eager"]["limit"]["4"]["images_per_s"], 2)
    assert "| concurrency |" in (tmp_path / "out" / "benchmark.md").read_text()
    assert (tmp_path / "out" / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_throughput_figure_draws_every_point_and_the_limits():
    point = lambda c, x, p50, p99: {"concurrency": c, "images_per_s": x, "p50_ms": p50, "p99_ms": p99}
    result = {
        "config": {"arch": "m", "crop_size": 224, "batch_size": 8, "workers": 1, "threads": 2},
        "backends": {"onnxruntime-int8": {"limit_at_sweep": {"8": {"images_per_s": 500.0},
                                                            "pipeline": {"images_per_s": 311.0}}}},
        "sweeps": {"ours:onnxruntime-int8": [point(1, 139.0, 6.6, 13.4), point(16, 230.0, 63.7, 89.4)],
                   "stock": [point(1, 20.0, 50.0, 60.0)]}}
    from serving.benchmark import latency_throughput_figure

    fig = latency_throughput_figure(result)
    ax = fig.axes[0]
    curves = {(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in ax.lines}
    assert ((139.0, 230.0), (6.6, 63.7)) in curves and ((139.0, 230.0), (13.4, 89.4)) in curves
    assert ((20.0,), (50.0,)) in curves and ((20.0,), (60.0,)) in curves  # p50 and p99 of each sweep
    verticals = {line.get_xdata()[0] for line in ax.lines if len(set(line.get_xdata())) == 1
                 and len(line.get_xdata()) == 2}
    assert {500.0, 311.0} <= verticals  # the limit and the pipeline of the served back-end
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ours:onnxruntime-int8", "stock"]
    assert {t.get_text() for t in ax.texts} >= {"c1", "c16"}


def test_heap_ab_smoke():
    from scripts import bench_heap
    args = bench_heap.get_args_parser().parse_args([
        "--arch", "resnet18", "--batch-size", "1", "--crop-size", "32", "--threads", "1",
        "--rounds", "1", "--batches", "1"])
    rows = bench_heap.main(args)
    # the second process of the pair really ran with the setting (retain_heap returned True)
    assert [r["heap"] for r in rows] == ["default", "retained"]
    for r in rows:
        assert set(r) == {"arch", "heap", "ms_per_batch", "user_ms", "sys_ms", "minor_faults",
                          "peak_rss_mb"}
        assert r["arch"] == "resnet18" and r["peak_rss_mb"] > 0


def test_parallel_limit_runs_one_runner_per_process_and_sums_them(tmp_path):
    """The limit for W workers: W runner processes timed at once, their images/s summed."""
    import torch

    from serving.benchmark import parallel_limit
    from training.predict import load_classifier
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt", CLASSES)
    _, _, transform = load_classifier(checkpoint, torch.device("cpu"))
    batch = torch.stack([transform.load(encode(scene(seed=i))) for i in range(4)])
    limit = parallel_limit("eager", checkpoint, tmp_path, 1, batch, 0.3, workers=2,
                           retain_heap_mb=0)
    runs = limit.pop("runners")
    assert len(runs) == 2 and set(limit) == {1, 4}
    for bs in (1, 4):
        assert all(r[bs]["images_per_s"] > 0 for r in runs)
        assert limit[bs]["images_per_s"] == round(sum(r[bs]["images_per_s"] for r in runs), 2)
    with pytest.raises(RuntimeError, match="limit process failed"):  # no model.onnx there
        parallel_limit("onnxruntime", checkpoint, tmp_path, 1, batch, 0.3, workers=2,
                       retain_heap_mb=0)


def test_idle_gap_bench_times_the_archive_graph_in_every_setting(tmp_path):
    import zipfile

    import torch

    from scripts import bench_idle
    onnx = tmp_path / "model.onnx"
    torch.onnx.export(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval(),
                      torch.randn(1, 3, 8, 8), onnx, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    mar = tmp_path / "m.mar"
    with zipfile.ZipFile(mar, "w") as z:
        z.write(onnx, "model.onnx")
    rows = bench_idle.main([str(mar), "--backend", "onnxruntime", "--crop-size", "8", "--runs", "2",
                            "--gaps-ms", "0", "1", "--spin-us", "50"])
    assert [r["setting"] for r in rows] == ["1 thread", "2 threads, no spinning",
                                            "2 threads, default spinning", "2 threads, spin <= 50 us"]
    for r in rows:
        assert r["file"] == "model.onnx" and set(r["gap_ms"]) == {0, 1}
        assert all(ms > 0 and cpu > 0 for ms, cpu in r["gap_ms"].values())
        assert r["batch8_images_per_s"] > 0
