"""Shared fixtures: image factories, a tiny fixed-weight model, an archive, a server."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import requests
import torch
from PIL import Image

from serving.server import PATCHES_JAR, ROOT, TorchServe, model_names, server_overrides
from training.models import build_model

TINY_ARCH = "mobilenet_v3_small"  # 1.5 M parameters: fast enough for every test
TINY_PREPROCESSING = {"crop_size": 64, "resize_size": 72, "mean": [0.485, 0.456, 0.406],
                      "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    """Encodes a PIL image to bytes in ``fmt``."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def scan_bomb(size: tuple[int, int] = (9000, 9000), repeats: int = 3000, mode: str = "L") -> bytes:
    """A progressive JPEG whose last Huffman table and refinement scan are repeated ``repeats``
    times: small on the wire (~720 KB at the defaults), ``repeats`` x the decoding work."""
    data = encode(Image.new(mode, size), "JPEG", progressive=True)
    start, end = data.rfind(b"\xff\xc4"), data.rfind(b"\xff\xd9")
    return data[:end] + data[start:end] * repeats + data[end:]


def scene(width: int = 160, height: int = 120, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic structured test image (gradients and a rectangle), not noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, generator=g) * 200
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    chans = [(base[c] + 55 * (xs if c % 2 else ys)).expand(height, width) for c in range(3)]
    arr = torch.stack(chans, -1).clamp(0, 255).to(torch.uint8).numpy().copy()
    x0, y0 = int(torch.randint(0, width // 2, (1,), generator=g)), int(torch.randint(0, height // 2, (1,), generator=g))
    arr[y0:y0 + height // 3, x0:x0 + width // 3] = (torch.rand(3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB").convert(mode)


def make_checkpoint(path: Path, classes: list[str], *, seed: int = 0, arch: str = TINY_ARCH,
                    preprocessing: dict | None = None) -> Path:
    """Writes a training-format checkpoint of a seeded, randomly initialized model."""
    torch.manual_seed(seed)
    model = build_model(arch, len(classes)).eval()
    torch.save({"model": model.state_dict(), "arch": arch, "num_classes": len(classes),
                "head": {"hidden_units": None, "dropout": 0.0}, "class_names": classes,
                "preprocessing": preprocessing or TINY_PREPROCESSING, "args": {}, "epoch": 0,
                "metrics": {}}, path)
    return path


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Every test starts with the process's torch intra-op thread count: a handler initialized
    in-process sets it for its back-end (one thread beside ONNX Runtime), and training's
    timings (``--amp auto``) must not depend on which test ran before."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def jpeg_bytes() -> bytes:
    return encode(scene(seed=1), "JPEG", quality=90)


@pytest.fixture(scope="session")
def three_class_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_best.pt",
                           ["cat", "dog", "bird"])


@contextlib.contextmanager
def running_server(workdir: Path, store: Path, models: list[str], env: Optional[dict] = None,
                   **overrides: str):
    """A real TorchServe on free loopback ports, READY on entry, stopped on exit."""
    ts = TorchServe(workdir=workdir, model_store=store, models=models, env=env or {},
                    overrides=server_overrides(**overrides)).start()
    try:
        ts.wait_ready(model_names(models), timeout_s=180)
        yield ts
    finally:
        ts.stop()


def build_archive(checkpoint: Path, store: Path, name: str, *extra: str) -> Path:
    """Builds ``store/<name or --archive-name>.mar`` with ``training.archive``.

    The back-end is ``eager`` unless ``extra`` names one: the tiny test models are compared
    with in-process eager predictions, and have no labelled folder for int8 calibration.
    """
    from training import archive
    backend = [] if "--backend" in extra else ["--backend", "eager"]
    return archive.main(archive.get_args_parser().parse_args([
        "--checkpoint", str(checkpoint), "--model-name", name, "--export-path", str(store),
        *backend, *extra]))


@contextlib.contextmanager
def image_entrypoint(workdir: Path, env: dict, base_url: str, ready_path: str = "/v2/health/ready",
                     args: tuple[str, ...] = ()):
    """``docker/entrypoint.sh`` run on the host as the container image runs it (``env`` holds
    ``TS_CONFIG_FILE``, ``TS_MODEL_STORE``, ...; the image's ``JAVA_TOOL_OPTIONS`` agent), in
    its own session; yields the process once ``base_url + ready_path`` answers 200, and stops
    the session on exit."""
    proc = subprocess.Popen(
        [str(ROOT / "docker" / "entrypoint.sh"), *args], cwd=workdir, start_new_session=True,
        stdout=open(workdir / "console.log", "ab"), stderr=subprocess.STDOUT,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
             "TEMP": str(workdir / "tmp"), "TMPDIR": str(workdir), "LOG_LOCATION": str(workdir / "logs"),
             "METRICS_LOCATION": str(workdir / "logs"), "JAVA_TOOL_OPTIONS": f"-javaagent:{PATCHES_JAR}",
             **env})
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (workdir / "console.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the entry point's server never became ready"
            try:
                if requests.get(f"{base_url}{ready_path}", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
