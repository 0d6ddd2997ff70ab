"""A tiny smoke run of scripts/benchmark.py: structure and error-free figures, no timing asserts."""

import json

import pytest

from conftest import encode, scene
from scripts import benchmark

pytestmark = pytest.mark.e2e


def test_benchmark_smoke(tmp_path, three_class_checkpoint):
    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    for i in range(4):
        (images / f"{i}.jpg").write_bytes(encode(scene(seed=i)))
    args = benchmark.get_args_parser().parse_args([
        "--checkpoint", str(three_class_checkpoint), "--images", str(tmp_path / "images"),
        "--concurrency", "1", "4", "--requests", "12", "--batch-size", "4", "--threads", "1",
        "--limit-seconds", "0.3", "--output-dir", str(tmp_path / "out")])
    result = benchmark.main(args)
    saved = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["in_process_limit"]) == {"1", "4"}
    assert [p["concurrency"] for p in saved["sweep"]] == [1, 4]
    for p in saved["sweep"]:
        assert p["errors"] == 0 and p["requests"] == 12
        assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] and p["images_per_s"] > 0
        assert p["queue_ms_mean"] >= 0
    assert saved["ratio_peak_to_limit"] > 0
    assert "| concurrency |" in (tmp_path / "out" / "benchmark.md").read_text()
