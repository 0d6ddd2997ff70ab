"""From ``model_store/<name>.mar`` to what a KServe InferenceService needs.

KServe's storage initializer copies the ``storageUri``'s contents to ``/mnt/models`` in the pod;
our ServingRuntime (``deploy/kserve/servingruntime.yaml``) starts the image's entry point with
``TS_CONFIG_FILE=/mnt/models/config/config.properties`` and
``TS_MODEL_STORE=/mnt/models/model-store``, the layout of KServe's own TorchServe runtime:

    <out>/<name>/config/config.properties   the image's (docker/config.properties), model store
                                            /mnt/models/model-store, this one archive loaded
    <out>/<name>/model-store/<name>.mar
    <out>/<name>/inferenceservice.yaml      deploy/kserve/inferenceservice.yaml for this model
    <out>/servingruntime.yaml               deploy/kserve/servingruntime.yaml with the image

Upload ``<out>/<name>/`` (without the manifest) to the storage URI, then ``kubectl apply`` the
two manifests.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import yaml

from serving.server import PLAIN_MODEL_NAME, ROOT, write_config

DEPLOY = ROOT / "deploy" / "kserve"
MOUNT = "/mnt/models"  # where KServe's storage initializer puts the storageUri's contents


def storage_config(name: str) -> dict[str, str]:
    """config.properties overrides of the image's config for a KServe pod serving ``name``."""
    return {"model_store": f"{MOUNT}/model-store", "load_models": f"{name}={name}.mar"}


def render_inference_service(name: str, storage_uri: str, gpu: bool = False,
                             template: Path = DEPLOY / "inferenceservice.yaml") -> dict:
    """The InferenceService manifest for model ``name``.

    Args:
        name: the model's name: the service's, the archive's (``<name>.mar``) and the one
            KServe's v1/v2 paths carry.
        storage_uri: where the storage layout was uploaded (``pvc://...``, ``s3://...``, ``gs://...``).
        gpu: one ``nvidia.com/gpu`` for the predictor (TorchServe then starts its workers on
            CUDA: ``handler/backends.py`` picks the GPU back-end at load).
        template: the manifest to start from.

    Raises:
        ValueError: ``name`` is not a plain model name (letters, digits, ``_.-``).
    """
    if not PLAIN_MODEL_NAME.fullmatch(name):
        raise ValueError(f"model name {name!r} is not a plain name (letters, digits, _ . -)")
    doc = yaml.safe_load(Path(template).read_text())
    doc["metadata"]["name"] = name.lower().replace("_", "-").replace(".", "-")
    model = doc["spec"]["predictor"]["model"]
    model["storageUri"] = storage_uri
    if gpu:
        for part in ("requests", "limits"):
            model["resources"][part]["nvidia.com/gpu"] = "1"
    return doc


def render_serving_runtime(image: str, template: Path = DEPLOY / "servingruntime.yaml") -> dict:
    """The ServingRuntime manifest with ``image`` as its container image."""
    doc = yaml.safe_load(Path(template).read_text())
    doc["spec"]["containers"][0]["image"] = image
    return doc


def build_storage(model_store: Path, name: str, out: Path, storage_uri: Optional[str] = None,
                  image: str = "ts-image-classifier:cpu", gpu: bool = False) -> Path:
    """Writes the storage layout and the two manifests for ``model_store/<name>.mar``.

    Args:
        model_store: folder holding ``<name>.mar``.
        name: the model name.
        out: output folder; ``<out>/<name>/`` is replaced.
        storage_uri: the InferenceService's ``storageUri`` (default ``pvc://model-store/<name>``).
        image: the ServingRuntime's image (the Dockerfile's, built for CPU or GPU).
        gpu: request a GPU for the predictor.

    Returns:
        ``<out>/<name>``, the folder to upload.

    Raises:
        FileNotFoundError: there is no ``<name>.mar`` in ``model_store``.
        ValueError: ``name`` is not a plain model name.
    """
    archive = Path(model_store) / f"{name}.mar"
    if not archive.is_file():
        raise FileNotFoundError(f"no archive {archive} (python -m training.archive builds it)")
    isvc = render_inference_service(name, storage_uri or f"pvc://model-store/{name}", gpu)
    runtime = render_serving_runtime(image)
    root = Path(out) / name
    if root.exists():
        shutil.rmtree(root)
    (root / "config").mkdir(parents=True)
    (root / "model-store").mkdir()
    shutil.copy2(archive, root / "model-store" / archive.name)
    write_config(ROOT / "docker" / "config.properties", root / "config" / "config.properties",
                 storage_config(name))
    (root / "inferenceservice.yaml").write_text(yaml.safe_dump(isvc, sort_keys=False))
    (Path(out) / "servingruntime.yaml").write_text(yaml.safe_dump(runtime, sort_keys=False))
    return root

