"""A client of TorchServe's management API: register, scale, version, set-default, unregister.

https://pytorch.org/serve/management_api.html. The CLI is ``python -m scripts.manage``.
"""

from __future__ import annotations

import logging
import time

import requests

log = logging.getLogger(__name__)


class ManagementError(RuntimeError):
    """A management call answered with a non-2xx status."""


class Management:
    """A thin client of the management API (https://pytorch.org/serve/management_api.html)."""

    def __init__(self, url: str, key: str | None, timeout_s: float = 300.0):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, **params):
        params = {k: v for k, v in params.items() if v is not None}
        r = requests.request(method, f"{self.url}{path}", params=params, headers=self.headers,
                             timeout=self.timeout_s)
        try:
            body = r.json()
        except ValueError:
            body = {"message": r.text}
        if not r.ok:
            message = body.get("message", body) if isinstance(body, dict) else body
            raise ManagementError(f"HTTP {r.status_code}: {message}")
        return body

    def list(self) -> list[dict]:
        return self._call("GET", "/models", limit=1000)["models"]

    def describe(self, name: str, version: str | None = None) -> list[dict]:
        return self._call("GET", f"/models/{name}" + (f"/{version}" if version else ""))

    def register(self, url: str, *, workers: int = 1, batch_size: int | None = None,
                 max_batch_delay: int | None = None, response_timeout: int | None = None,
                 model_name: str | None = None) -> dict:
        return self._call("POST", "/models", url=url, initial_workers=workers,
                          batch_size=batch_size, max_batch_delay=max_batch_delay,
                          response_timeout=response_timeout, model_name=model_name,
                          synchronous="true")

    def scale(self, name: str, min_workers: int, max_workers: int | None = None,
                version: str | None = None, attempts: int = 3) -> dict:
        """Sets the worker count. Retries TorchServe 0.12's transient 500
        ConcurrentModificationException: scaling down under load races in
        WorkerThread.shutdown() -> BatchAggregator.sendError(); the call is idempotent."""
        for attempt in range(1, attempts + 1):
            try:
                return self._call("PUT", f"/models/{name}" + (f"/{version}" if version else ""),
                                  min_worker=min_workers, max_worker=max_workers or min_workers,
                                  synchronous="true")
            except ManagementError as exc:
                if "ConcurrentModificationException" not in str(exc) or attempt == attempts:
                    raise
                log.warning("scale attempt %d hit TorchServe's %s; retrying", attempt, exc)
                time.sleep(1.0)

    def set_default(self, name: str, version: str) -> dict:
        return self._call("PUT", f"/models/{name}/{version}/set-default")

    def renew_key(self, api: str) -> None:
        """Replaces the ``inference`` or ``management`` key (``POST /token?type=...``).

        Must be called with the API key (``key_file.json`` ``"API"``, which never expires) as
        this client's key. TorchServe writes the new key, with a fresh expiry
        (``token_expiration_min``), to ``key_file.json``; the old key is refused from then on.

        Raises:
            ValueError: ``api`` is neither ``inference`` nor ``management``.
            ManagementError: the server refused (401: not the API key).
        """
        if api not in ("inference", "management"):
            raise ValueError(f"renew-key: api must be inference or management, not {api!r}")
        r = requests.post(f"{self.url}/token", params={"type": api}, headers=self.headers,
                          timeout=self.timeout_s)
        if not r.ok:
            raise ManagementError(f"HTTP {r.status_code}: {r.text.strip()}")

    def unregister(self, name: str, version: str | None = None) -> dict:
        return self._call("DELETE", f"/models/{name}" + (f"/{version}" if version else ""))


def format_description(versions: list[dict], default_version: str | None) -> str:
    """Readable lines for a describe answer (one block per version)."""
    lines = []
    for v in versions:
        mark = " (default)" if v["modelVersion"] == default_version else ""
        lines.append(f"{v['modelName']} {v['modelVersion']}{mark}  url={v['modelUrl']}  "
                     f"batchSize={v['batchSize']}  maxBatchDelay={v['maxBatchDelay']} ms  "
                     f"workers {v['minWorkers']}..{v['maxWorkers']}")
        for w in v.get("workers", []):
            device = f"gpu {w['gpu']}" if w.get("gpu") else "cpu"
            lines.append(f"    worker {w['id']}: {w['status']}  pid {w['pid']}  {device}  "
                         f"memory {w['memoryUsage'] / 2**20:.0f} MiB")
    return "\n".join(lines)
