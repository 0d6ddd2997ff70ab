"""A bounded, self-stopping stream of predictions on loopback that records every response."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import requests


@dataclass
class Response:
    sent_at: float          # time.monotonic() when the request was sent
    status: int             # HTTP status, or 0 for a connection error / timeout
    labels: tuple = ()      # labels of the answer (empty on failure)
    error: str = ""         # exception or non-200 body, for failure reports


@dataclass
class Traffic:
    """Sends ``body`` to ``url`` from ``threads`` threads until stopped (or ``max_s`` passes).

    Use as a context manager; ``responses`` holds one ``Response`` per request sent.
    """

    url: str
    body: bytes
    headers: dict
    threads: int = 2
    max_s: float = 180.0
    timeout_s: float = 20.0  # per request; a tiny model answers in tens of ms
    responses: list[Response] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]

    def _run(self):
        session = requests.Session()
        deadline = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            t = time.monotonic()
            try:
                r = session.put(self.url, data=self.body, headers=self.headers, timeout=self.timeout_s)
                labels = tuple(x["label"] for x in r.json()) if r.status_code == 200 else ()
                resp = Response(t, r.status_code, labels, "" if r.status_code == 200 else r.text[:300])
            except (requests.RequestException, ValueError) as exc:
                resp = Response(t, 0, error=f"{type(exc).__name__}: {exc}"[:300])
            with self._lock:
                self.responses.append(resp)

    def __enter__(self) -> "Traffic":
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for w in self._workers:
            w.join(timeout=90)

    def wait_for(self, n: int, timeout_s: float = 60.0) -> None:
        """Blocks until at least ``n`` more responses have arrived."""
        target = len(self.responses) + n
        deadline = time.monotonic() + timeout_s
        while len(self.responses) < target and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def failed(self) -> list[Response]:
        return [r for r in self.responses if r.status != 200]
