"""The container image's files: the Dockerfile lints clean (hadolint), the image's TorchServe
config is the project's with only the container-specific keys changed, and its entry point
serves a model store the way the image runs it (open health probe, token on or off)."""

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import ROOT, build_archive, encode, image_entrypoint, make_checkpoint, scene
from serving.server import WORKER_ENV, read_properties, server_overrides, write_config

CONTAINER_KEYS = {"inference_address", "management_address", "metrics_address",
                  "grpc_inference_address", "grpc_management_address", "model_store",
                  "metrics_config", "load_models"}


@pytest.mark.unit
def test_dockerfile_lints_clean():
    hadolint = Path(sys.executable).with_name("hadolint")
    run = subprocess.run([str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), "Dockerfile"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.unit
def test_container_config_is_the_project_config_with_container_paths():
    project = read_properties(ROOT / "config.properties")
    image = read_properties(ROOT / "docker" / "config.properties")
    changed = {k for k in project.keys() | image.keys() if project.get(k) != image.get(k)}
    assert changed == CONTAINER_KEYS  # limits, token expiry, allowed_urls, vmargs: the same
    assert image["inference_address"] == "http://0.0.0.0:8080" and image["load_models"] == "all"
    assert image["model_store"] == "/home/model-server/model-store"


@pytest.mark.e2e
@pytest.mark.parametrize("disable_token", [False, True])
def test_entrypoint_serves_the_model_store(tmp_path, disable_token):
    """As the image runs it: every archive of the store served; the HEALTHCHECK route answers
    without a key; predictions need the key unless TS_DISABLE_TOKEN_AUTH=true."""
    store = tmp_path / "store"
    build_archive(make_checkpoint(tmp_path / "c.pt", ["a", "b", "c"]), store, "m3", "--num-threads", "1")
    overrides = server_overrides(model_store=str(store), load_models="all",
                                 metrics_config=str(ROOT / "monitoring" / "metrics.yaml"))
    config = write_config(ROOT / "docker" / "config.properties", tmp_path / "config.properties", overrides)
    base = overrides["inference_address"]
    env = {"TS_CONFIG_FILE": str(config), "TS_MODEL_STORE": str(store),
           "TS_DISABLE_TOKEN_AUTH": str(disable_token).lower()}
    with image_entrypoint(tmp_path, env, base):
        assert requests.get(f"{base}/v2/health/live", timeout=5).json() == {"live": True}
        r = requests.put(f"{base}/predictions/m3", data=encode(scene()), timeout=30)
        assert r.status_code == (200 if disable_token else 401), r.text
        assert (tmp_path / "key_file.json").exists() != disable_token
        if disable_token:  # the workers get the entry point's OpenMP spin (serving.server.WORKER_ENV)
            import psutil
            [model] = requests.get(f"{overrides['management_address']}/models/m3", timeout=10).json()
            [worker] = model["workers"]
            assert psutil.Process(worker["pid"]).environ()["GOMP_SPINCOUNT"] == \
                WORKER_ENV["GOMP_SPINCOUNT"]
