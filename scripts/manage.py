"""Model lifecycle through TorchServe's management API: register, scale, version, unregister.

    python scripts/manage.py list
    python scripts/manage.py describe NAME [VERSION|all]
    python scripts/manage.py register NAME_V2.mar [--workers 1 --batch-size 8 --max-batch-delay 20]
    python scripts/manage.py scale NAME [--version V] --min-workers 3 [--max-workers 3]
    python scripts/manage.py set-default NAME VERSION
    python scripts/manage.py unregister NAME [VERSION]

Reads the management key from TorchServe's ``key_file.json`` (token authorization) and the
address from ``config.properties``. Exits 1, printing the server's message, when a call fails.
All changes are synchronous: the command returns once TorchServe has applied them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.ts_server import ROOT, read_properties  # noqa: E402


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
                print(f"warning: scale attempt {attempt} hit TorchServe's {exc}; retrying",
                      file=sys.stderr)
                time.sleep(1.0)

    def set_default(self, name: str, version: str) -> dict:
        return self._call("PUT", f"/models/{name}/{version}/set-default")

    def unregister(self, name: str, version: str | None = None) -> dict:
        return self._call("DELETE", f"/models/{name}" + (f"/{version}" if version else ""))


def management_key(key_file: Path) -> str | None:
    """The management key from ``key_file.json``, or None when there is no key file."""
    if not key_file.is_file():
        return None
    return json.loads(key_file.read_text())["management"]["key"]


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


def main(args) -> int:
    props = read_properties(args.config)
    api = Management(args.url or props["management_address"], management_key(args.key_file))
    try:
        if args.command == "list":
            models = api.list()
            for m in models:
                print(f"{m['modelName']:<24} {m['modelUrl']}")
            if not models:
                print("no models registered")
        elif args.command == "describe":
            default = api.describe(args.name)[0]["modelVersion"]
            versions = api.describe(args.name, args.version)
            print(format_description(versions, default))
        elif args.command == "register":
            print(api.register(args.mar, workers=args.workers, batch_size=args.batch_size,
                               max_batch_delay=args.max_batch_delay,
                               response_timeout=args.response_timeout)["status"])
        elif args.command == "scale":
            print(api.scale(args.name, args.min_workers, args.max_workers, args.version)["status"])
        elif args.command == "set-default":
            print(api.set_default(args.name, args.version)["status"])
        elif args.command == "unregister":
            print(api.unregister(args.name, args.version)["status"])
    except ManagementError as exc:
        print(f"error: {args.command} failed: {exc}", file=sys.stderr)
        return 1
    except requests.ConnectionError as exc:
        print(f"error: cannot reach the management API at {api.url}: {exc}", file=sys.stderr)
        return 1
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default=None, help="management API (default: from --config)")
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    p.add_argument("--key-file", type=Path, default=ROOT / "key_file.json")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered models")
    d = sub.add_parser("describe", help="versions, batching and workers of a model")
    d.add_argument("name")
    d.add_argument("version", nargs="?", default=None, help="a version, or 'all'")
    r = sub.add_parser("register", help="register an archive from the model store")
    r.add_argument("mar", help="file name in the model store, e.g. scenes_v2.mar")
    r.add_argument("--workers", type=int, default=1, help="initial workers")
    r.add_argument("--batch-size", type=int, default=None, help="default: model-config.yaml")
    r.add_argument("--max-batch-delay", type=int, default=None, help="ms; default: model-config.yaml")
    r.add_argument("--response-timeout", type=int, default=None, help="s; default: model-config.yaml")
    s = sub.add_parser("scale", help="set a version's worker count")
    s.add_argument("name")
    s.add_argument("--version", default=None, help="default: the default version")
    s.add_argument("--min-workers", type=int, required=True)
    s.add_argument("--max-workers", type=int, default=None, help="default: --min-workers")
    sd = sub.add_parser("set-default", help="route /predictions/NAME to VERSION")
    sd.add_argument("name")
    sd.add_argument("version")
    u = sub.add_parser("unregister", help="remove a model version (or the default one)")
    u.add_argument("name")
    u.add_argument("version", nargs="?", default=None)
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
