"""Start a TorchServe (Java frontend + Python workers), wait for READY workers, stop it.

Used by ``python -m scripts.serve`` (the CLI), the demo and the e2e test fixture.

Each server runs in its own working directory (``key_file.json``, ``logs/``, and a private
``TMPDIR`` so that TorchServe's ``.model_server.pid`` of one server never stops another) and
in its own process session, so stopping it reaps the frontend and all its workers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import requests

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
# Java agent fixing TorchServe 0.12's frontend (graceful scale-down, 401 for bad tokens);
# built by `make setup` from scripts/ts_patches/.
PATCHES_JAR = ROOT / "build" / "ts-patches.jar"
LOG_FILES = ("ts_log.log", "model_log.log")
# the model names registration accepts (scripts/ts_patches/.../Connections.java MODEL_NAME)
PLAIN_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# what TorchServe 0.12's frontend logs when a model given at startup cannot be loaded
LOAD_FAILURE = re.compile(r"ModelNotFoundException|InvalidModelException|DownloadArchiveException|"
                          r"ModelException|Failed to (?:load|register|unpack) model")
WORKER_ERROR = re.compile(r"^\S+ \[\w+ *\] \S+ MODEL_LOG - \w+(?:\.\w+)*(?:Error|Exception)\b")
ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address",
                "metrics": "metrics_address"}


class ServerError(RuntimeError):
    """TorchServe failed to start, died, or its workers did not become READY in time."""


def read_key(key_file: Path, api: str, wait_s: float = 5.0) -> Optional[str]:
    """The bearer key of ``api`` (``inference`` or ``management``) from TorchServe's
    ``key_file.json``, or None when there is no key file (token authorization off).

    TorchServe writes the file while it starts and rewrites it when keys are renewed
    (``token_expiration_min``); an empty or partial file is read again every 0.1 s for up to
    ``wait_s`` s until it parses. The one reader of the key file: the server fixture, the
    management and inference clients all call it.

    Raises:
        ServerError: the file does not parse within ``wait_s`` s, or has no ``api`` key.
    """
    key_file = Path(key_file)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = key_file.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)[api]["key"]
        except json.JSONDecodeError as exc:
            if time.monotonic() > deadline:
                raise ServerError(f"{key_file} does not parse: {exc}") from None
            time.sleep(0.1)
        except (KeyError, TypeError):
            raise ServerError(f"{key_file} has no {api!r} key") from None


def bearer(key_file: Path, api: str) -> dict[str, str]:
    """``{"Authorization": "Bearer <key>"}`` for ``api``, or {} without a key file."""
    key = read_key(key_file, api)
    return {"Authorization": f"Bearer {key}"} if key else {}


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(value: str) -> str:
    """Undoes Java properties escaping (``\\:``, ``\\=``, ``\\n``, ``\\uXXXX``), as snapshots use."""
    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)",
                  lambda m: chr(int(m[1][1:], 16)) if len(m[1]) == 5 else _ESCAPES.get(m[1], m[1]),
                  value)


def read_properties(path: Path) -> dict[str, str]:
    """Parses a Java ``.properties`` file of single-line ``key=value`` entries (``#`` comments)."""
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = _unescape(value.strip())
    return props


PATH_KEYS = ("metrics_config", "model_store")


def write_config(base: Path, dest: Path, overrides: dict[str, str]) -> Path:
    """Copies ``base`` to ``dest`` with ``overrides`` replacing or adding keys.

    Relative paths of ``PATH_KEYS`` are made absolute against ``base``'s folder, so the copy
    works from any working directory.

    Raises:
        ValueError: ``dest`` is ``base`` (the project's config must never be rewritten).
    """
    if Path(dest).resolve() == Path(base).resolve():
        raise ValueError(f"refusing to overwrite {base} with its own server copy")
    lines, seen = [], set()
    for line in Path(base).read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition("="))
        if "=" in line and not line.lstrip().startswith("#") and key in overrides:
            lines.append(f"{key}={overrides[key]}")
            seen.add(key)
        elif key in PATH_KEYS and value and not Path(value).is_absolute():
            lines.append(f"{key}={(Path(base).resolve().parent / value).resolve()}")
        else:
            lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items() if k not in seen]
    dest.write_text("\n".join(lines) + "\n")
    return dest


def restartable(snapshot: Path, dest: Path) -> Path:
    """``snapshot`` as a config file ``torchserve`` can start from (a copy at ``dest`` if needed).

    The frontend writes snapshots with Java properties escaping (``vmargs=-XX\\:Flag\\=1``),
    but the ``torchserve`` launcher (``ts/model_server.py``, 0.12) hands ``vmargs`` to the JVM
    as written, and the JVM refuses ``-XX\\:...`` ("Unrecognized option"). The copy carries
    ``vmargs`` unescaped; every other line is unchanged (the frontend parses them as Java does).
    """
    vmargs = read_properties(snapshot).get("vmargs")
    if not vmargs:
        return snapshot
    return write_config(snapshot, dest, {"vmargs": vmargs})


# Environment for the workers (the frontend passes its own on). libgomp, PyTorch's OpenMP on
# Linux, spin-waits GOMP_SPINCOUNT rounds after each parallel region before its threads sleep:
# 300000 by default, which kept a core busy for 5.4-6.0 ms after each eager Lite0 forward pass
# (2 threads, 224 px, batch 1: CPU time in the 20 ms after it), while the worker answers and
# the frontend and the client need that core. 10000 rounds end within 0.1 ms, and the forward
# pass's own regions, microseconds apart, still find their threads awake. Measured served (2
# cores, AMX Xeon, alternating benchmark runs): p50 at concurrency 1 minus the forward, bf16
# Lite0 3.9 and 4.6 ms against 5.4 and 5.3; eager 5.0 and 5.0 against 8.2 and 4.9; peaks within
# the runs' spread (docs/performance.md "libgomp's spin after a forward pass"). The container
# entry point sets the same. A value in the caller's environment wins.
WORKER_ENV = {"GOMP_SPINCOUNT": "10000"}


@dataclass
class TorchServe:
    """One TorchServe process tree.

    Attributes:
        workdir: working directory (keys, logs, snapshots, config copy).
        config: base ``config.properties``.
        model_store: folder of ``.mar`` files.
        models: ``--models`` arguments, e.g. ``["scenes=scenes.mar"]``.
        overrides: config keys to override (e.g. addresses with free ports).
        env: extra environment variables for the server (e.g. ``TS_IDLE_DISPATCH=0``).
        restore: start from the newest snapshot in ``logs/config/`` (models, versions, default
            version, worker counts and the server settings of the first start) instead of
            ``config``; TorchServe writes a snapshot at startup, after every management change
            and at shutdown.
    """

    workdir: Path
    config: Path = ROOT / "config.properties"
    model_store: Path = ROOT / "model_store"
    models: list[str] = field(default_factory=list)
    overrides: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    restore: bool = False
    proc: Optional[subprocess.Popen] = None

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        self._log_start: dict[str, int] = {}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # the copy lives under logs/ (git-ignored): workdir may be the repository root
        self.config_path = write_config(self.config, self.log_dir / "ts.config.properties",
                                        self.overrides)
        self.props = read_properties(self.config_path)

    def url(self, api: str) -> str:
        """Base URL of ``inference``, ``management`` or ``metrics``, e.g. http://127.0.0.1:8080."""
        return self.props[ADDRESS_KEYS[api]].rstrip("/")

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def last_snapshot(self) -> Optional[Path]:
        """The newest TorchServe config snapshot of this working directory, if any."""
        snapshots = sorted((self.log_dir / "config").glob("*.cfg"))  # names start with a timestamp
        return snapshots[-1] if snapshots else None

    def start(self) -> "TorchServe":
        """Launches ``torchserve --start --foreground`` in a new session, detached from us.

        Raises:
            ServerError: ``restore`` is set but there is no snapshot to restore, or a
                ``--models`` archive is not in the model store (checked here, in
                milliseconds, rather than left to the frontend, which logs the failure and
                keeps running without the model).
        """
        self.check_models()
        self._log_start = {name: path.stat().st_size for name in LOG_FILES
                           if (path := self.log_dir / name).is_file()}
        env = {**WORKER_ENV, **os.environ, "TMPDIR": str(self.workdir), "TEMP": str(self.workdir),
               "LOG_LOCATION": str(self.log_dir), "METRICS_LOCATION": str(self.log_dir), **self.env}
        if PATCHES_JAR.is_file():  # read by the JVM at startup, whichever config it is given
            env["JAVA_TOOL_OPTIONS"] = " ".join(
                filter(None, [env.get("JAVA_TOOL_OPTIONS"), f"-javaagent:{PATCHES_JAR}"]))
        else:
            log.warning("%s missing (make setup builds it): TorchServe runs unpatched", PATCHES_JAR)
        config = self.config_path
        if self.restore:
            config = self.last_snapshot()
            if config is None:
                raise ServerError(f"nothing to restore: no snapshot in {self.log_dir / 'config'}")
            config = restartable(config, self.workdir / "restore.properties")
        cmd = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground",
               "--ts-config", str(config), "--model-store", str(Path(self.model_store).resolve())]
        if self.models and not self.restore:
            cmd += ["--models", *self.models]
        with open(self.log_dir / "console.log", "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        (self.workdir / "torchserve.pid").write_text(str(self.proc.pid))
        return self

    def check_models(self) -> None:
        """Raises ServerError when a ``models`` entry names an archive the store lacks, or
        when a snapshot to restore holds a model name the REST API could not reach or remove
        (not a ``PLAIN_MODEL_NAME``: the frontend patch refuses such names at registration)."""
        store = Path(self.model_store)
        snapshot = self.last_snapshot() if self.restore else None
        bad = [name for name in (restored_models(snapshot) if snapshot else [])
               if not PLAIN_MODEL_NAME.fullmatch(name) or ".." in name]
        if bad:
            raise ServerError(f"refusing to restore {snapshot}: model names {bad} are not plain "
                              "names (letters, digits, '_', '-', '.'); the API could not remove them")
        for entry in [] if self.restore else self.models:
            archive = entry.split("=", 1)[-1]
            if "://" in archive or (store / archive).exists():
                continue
            present = sorted(p.name for p in store.glob("*.mar")) if store.is_dir() else []
            raise ServerError(f"no archive {archive!r} in the model store {store} (for "
                              f"--models {entry}); it has: {', '.join(present) or 'no .mar files'}"
                              ". Build one with .venv/bin/python -m training.archive, or make demo.")

    def token(self, api: str = "management") -> str:
        """The bearer key for ``inference`` or ``management`` from ``key_file.json``.

        TorchServe writes the file while it starts; an empty or partial file is read again
        (every 0.1 s, for up to 5 s) until it parses.

        Raises:
            ServerError: no key file (token authorization disabled, or not started yet), or
                one that does not parse within 5 s.
        """
        key = read_key(self.workdir / "key_file.json", api)
        if key is None:
            raise ServerError(f"no {self.workdir / 'key_file.json'}: is TorchServe running "
                              "with token authorization?")
        return key

    def headers(self, api: str = "management") -> dict[str, str]:
        """``Authorization`` header for the API, or {} when token authorization is off."""
        return bearer(self.workdir / "key_file.json", api)

    def new_log_lines(self, name: str) -> list[str]:
        """Lines ``name`` (``ts_log.log``, ``model_log.log``) gained since ``start()``."""
        path = self.log_dir / name
        if not path.is_file():
            return []
        with open(path, "rb") as f:
            f.seek(self._log_start.get(name, 0) if path.stat().st_size >= self._log_start.get(name, 0) else 0)
            return f.read().decode(errors="replace").splitlines()

    def log_tail(self, lines: int = 60) -> str:
        """The last lines this run added to the frontend and worker logs (no access log)."""
        parts = []
        for name in LOG_FILES:
            text = [line for line in self.new_log_lines(name) if "ACCESS_LOG" not in line][-lines:]
            if text:
                parts.append(f"--- {self.log_dir / name} (last {len(text)} lines of this run)\n"
                             + "\n".join(text))
        return "\n".join(parts) or f"(nothing logged in {self.log_dir} by this run)"

    def load_failure(self, model: str) -> Optional[str]:
        """Why ``model`` cannot load in this run, from the frontend's log, or None (yet).

        Either the frontend refused the archive (``LOAD_FAILURE``), or its workers died while
        loading it twice (the first start and TorchServe's first retry): then the answer is the
        last error line the worker printed (its traceback's last line).
        """
        lines = self.new_log_lines("ts_log.log")
        refused = next((line for line in lines if LOAD_FAILURE.search(line)), None)
        if refused:
            return refused.strip()
        # each failure is logged twice (two appenders), with one timestamp
        died = {line.split(" [", 1)[0] for line in lines if f"Load model failed: {model}," in line}
        if len(died) < 2:
            return None
        errors = [line.split("MODEL_LOG - ", 1)[1] for line in lines
                  if "MODEL_LOG - " in line and WORKER_ERROR.search(line)]
        return (f"its workers died while loading it ({len(died)} times); last worker error: "
                f"{errors[-1] if errors else 'none logged'}")

    def workers(self, model: str) -> list[dict]:
        """Workers of a model's default version, from the management API ([] if unknown)."""
        r = requests.get(f"{self.url('management')}/models/{model}",
                         headers=self.headers("management"), timeout=5)
        if r.status_code != 200:
            return []
        return r.json()[0].get("workers", [])

    def wait_ready(self, models: list[str], timeout_s: float = 180.0) -> None:
        """Blocks until every named model has >= 1 worker and all its workers are READY.

        Raises:
            ServerError: the process exited or the timeout passed; carries the log tail.
        """
        deadline = time.monotonic() + timeout_s
        pending = list(models)
        while pending:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"TorchServe exited with code {self.proc.returncode}\n"
                                  + self.log_tail())
            try:
                workers = self.workers(pending[0])
                if workers and all(w["status"] == "READY" for w in workers):
                    pending.pop(0)
                    continue
            except (requests.ConnectionError, requests.Timeout):
                pass
            failure = self.load_failure(pending[0])
            if failure:
                raise ServerError(f"TorchServe could not load {pending}: {failure.strip()}\n"
                                  + self.log_tail())
            if time.monotonic() > deadline:
                raise ServerError(f"workers of {pending} not READY after {timeout_s:.0f} s\n"
                                  + self.log_tail())
            time.sleep(0.5)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the frontend and its workers (SIGTERM to the session, SIGKILL after timeout)."""
        stop_pid_file(self.workdir / "torchserve.pid", timeout_s, leader=self.proc)
        if self.proc is not None:
            self.proc.wait(timeout=5)
            self.proc = None
        remove_empty_model_dirs(self.workdir)


def remove_empty_model_dirs(workdir: Path) -> None:
    """Removes the empty ``models/<id>/`` folders (and ``models/`` itself when empty) that
    TorchServe leaves in its ``TMPDIR`` after an archive failed to load."""
    models = Path(workdir) / "models"
    if models.is_dir():
        for folder in models.iterdir():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if not any(models.iterdir()):
            models.rmdir()


def stop_pid_file(pid_file: Path, timeout_s: float = 30.0,
                  leader: Optional[subprocess.Popen] = None) -> bool:
    """Stops the process session whose leader's pid is in ``pid_file``: SIGTERM, then SIGKILL
    after ``timeout_s`` s if any process of the session is still there. False if none ran.

    Args:
        leader: the session leader's ``Popen`` when this process started it. It is reaped while
            waiting: an exited child stays a zombie until its parent waits for it, and a zombie
            still counts as a member of its process group, so without reaping the wait would
            always last the whole ``timeout_s``.
    """
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    pid_file.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)
    return True


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def server_overrides(**extra: str) -> dict:
    """config.properties overrides putting every TorchServe listener on a free loopback port."""
    inf, mgmt, met, grpc_inf, grpc_mgmt = free_ports(5)
    return {"inference_address": f"http://127.0.0.1:{inf}",
            "management_address": f"http://127.0.0.1:{mgmt}",
            "metrics_address": f"http://127.0.0.1:{met}",
            "grpc_inference_port": str(grpc_inf), "grpc_management_port": str(grpc_mgmt), **extra}


def model_names(models: list[str]) -> list[str]:
    """Model names from ``--models`` arguments (``name=file.mar`` or ``file.mar``)."""
    return [m.split("=", 1)[0] if "=" in m else re.sub(r"\.mar$", "", Path(m).name)
            for m in models]


def restored_models(snapshot: Path) -> list[str]:
    """Model names recorded in a TorchServe config snapshot (``model_snapshot``)."""
    snapshot_json = json.loads(read_properties(snapshot).get("model_snapshot") or "{}")
    return list(snapshot_json.get("models", {}))
