"""KServe: the manifests validate against the KServe SDK's models (in .venv-kserve), the
validator refuses what KServe would, and the storage layout `scripts.kserve storage` builds is
served by the image's entry point as the ServingRuntime starts it (its env, its probe, no key),
answering KServe v1 and v2 on the model's name."""

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from conftest import ROOT, build_archive, encode, image_entrypoint, make_checkpoint, scene
from scripts import kserve as kserve_cli
from serving.kserve import MOUNT
from serving.server import read_properties, server_overrides, write_config

KSERVE_PY = ROOT / ".venv-kserve" / "bin" / "python"
TEMPLATES = [ROOT / "deploy" / "kserve" / "servingruntime.yaml",
             ROOT / "deploy" / "kserve" / "inferenceservice.yaml"]
MODEL = "scenes-3"


def sdk_validate(*paths: Path) -> subprocess.CompletedProcess:
    """``python -m scripts.kserve validate`` in the SDK's venv."""
    return subprocess.run([str(KSERVE_PY), "-m", "scripts.kserve", "validate", *map(str, paths)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """``scripts.kserve storage --gpu`` for a three-class archive: returns ``<out>``."""
    tmp = tmp_path_factory.mktemp("kserve")
    build_archive(make_checkpoint(tmp / "c.pt", ["buildings", "forest", "sea"]), tmp / "store",
                  MODEL, "--num-threads", "1")
    args = kserve_cli.get_args_parser().parse_args([
        "storage", "--model", MODEL, "--model-store", str(tmp / "store"), "--out", str(tmp / "out"),
        "--storage-uri", "s3://models/scenes-3", "--image", "registry.local/ts-image-classifier:gpu",
        "--gpu"])
    assert kserve_cli.main(args) == 0
    return tmp / "out"


@pytest.mark.unit
def test_repository_manifests_validate_against_the_sdk():
    run = sdk_validate(*TEMPLATES)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 file(s): 0 error(s)" in run.stdout


@pytest.mark.unit
def test_storage_layout_and_rendered_manifests(storage):
    root = storage / MODEL
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "config/config.properties", "inferenceservice.yaml", f"model-store/{MODEL}.mar"]
    config = read_properties(root / "config" / "config.properties")
    assert config["model_store"] == f"{MOUNT}/model-store"
    assert config["load_models"] == f"{MODEL}={MODEL}.mar"
    image_config = read_properties(ROOT / "docker" / "config.properties")
    assert {k for k in config if config[k] != image_config.get(k)} == {"model_store", "load_models"}
    isvc = yaml.safe_load((root / "inferenceservice.yaml").read_text())
    model = isvc["spec"]["predictor"]["model"]
    assert isvc["metadata"]["name"] == MODEL and model["storageUri"] == "s3://models/scenes-3"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    runtime = yaml.safe_load((storage / "servingruntime.yaml").read_text())
    assert runtime["spec"]["containers"][0]["image"] == "registry.local/ts-image-classifier:gpu"
    run = sdk_validate(storage / "servingruntime.yaml", root / "inferenceservice.yaml")
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.unit
@pytest.mark.parametrize("kind, edit, message", [
    ("isvc", lambda d: d["spec"]["predictor"]["model"].update(storageURI="s3://x"),
     "model.storageURI: not a field of V1beta1ModelSpec (did you mean storageUri?)"),
    ("isvc", lambda d: d["spec"]["predictor"].update(minReplicas="one"),
     "predictor.minReplicas: expected int, got str"),
    ("isvc", lambda d: d["spec"]["predictor"]["model"].pop("modelFormat"),
     "`model_format`, must not be `None`"),
    ("isvc", lambda d: d["spec"]["predictor"]["model"].update(runtime="kserve-torchserve"),
     "runtime 'kserve-torchserve' is not the ServingRuntime 'ts-image-classifier'"),
    ("isvc", lambda d: d["spec"]["predictor"]["model"].update(protocolVersion="grpc-v2"),
     "protocolVersion grpc-v2 is not among the runtime's"),
    ("runtime", lambda d: d["spec"]["containers"][0].pop("name"), "V1Container"),
    ("runtime", lambda d: d["spec"]["containers"][0]["resources"]["limits"].update(memory="4 GB"),
     "'4 GB' is not a Kubernetes quantity"),
    ("runtime", lambda d: d["spec"]["containers"][0]["readinessProbe"]["httpGet"].pop("port"),
     "readinessProbe.httpGet: V1HTTPGetAction"),
    ("runtime", lambda d: d["spec"].update(protocolVersions="v2"), "expected a list"),
])
def test_validator_refuses_what_kserve_would(tmp_path, kind, edit, message):
    docs = {"runtime": yaml.safe_load(TEMPLATES[0].read_text()),
            "isvc": yaml.safe_load(TEMPLATES[1].read_text())}
    edit(docs[kind])
    paths = []
    for name, doc in docs.items():
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(doc))
    run = sdk_validate(*paths)
    assert run.returncode == 1 and message in run.stderr, run.stdout + run.stderr


@pytest.mark.e2e
def test_storage_is_served_as_the_serving_runtime_starts_it(storage, tmp_path):
    """The ServingRuntime's container env (paths under /mnt/models mapped to the storage
    folder), the image's entry point, the runtime's readiness probe, then KServe v1 and v2 on
    the model's name without a key (TS_DISABLE_TOKEN_AUTH from the manifest)."""
    mnt = tmp_path / "mnt-models"
    shutil.copytree(storage / MODEL, mnt)
    runtime = yaml.safe_load((storage / "servingruntime.yaml").read_text())
    container = runtime["spec"]["containers"][0]
    env = {e["name"]: e["value"].replace(MOUNT, str(mnt)) for e in container["env"]}
    # the pod's config, with its listeners moved to free loopback ports and the image's
    # metrics.yaml path to the repository's (the host has no /home/model-server)
    overrides = server_overrides(model_store=env["TS_MODEL_STORE"],
                                 metrics_config=str(ROOT / "monitoring" / "metrics.yaml"))
    pod_config = Path(env["TS_CONFIG_FILE"])
    write_config(pod_config, tmp_path / "config.properties", overrides)
    env["TS_CONFIG_FILE"] = str(tmp_path / "config.properties")
    base = overrides["inference_address"]
    probe = container["readinessProbe"]["httpGet"]["path"]
    with image_entrypoint(tmp_path, env, base, ready_path=probe, args=tuple(container["args"])):
        live = container["livenessProbe"]["httpGet"]["path"]
        assert requests.get(f"{base}{live}", timeout=5).json() == {"live": True}
        b64 = [base64.b64encode(encode(scene(seed=s))).decode() for s in (1, 2)]
        r = requests.post(f"{base}/v1/models/{MODEL}:predict", timeout=30,
                          json={"instances": [{"b64": b} for b in b64], "parameters": {"topk": 2}})
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        assert len(predictions) == 2 and all(len(p) == 2 for p in predictions)
        assert {rec["label"] for p in predictions for rec in p} <= {"buildings", "forest", "sea"}
        r = requests.post(f"{base}/v2/models/{MODEL}/infer", timeout=30, json={
            "id": "k1", "inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": b64}]})
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "k1" and r.json()["model_name"] == MODEL
        labels = next(o for o in r.json()["outputs"] if o["datatype"] == "BYTES")
        assert labels["shape"][0] == 2
        assert requests.get(f"{base}/v2/models/{MODEL}/ready", timeout=5).status_code == 200
        assert not (tmp_path / "key_file.json").exists()  # no token authorization in the pod
