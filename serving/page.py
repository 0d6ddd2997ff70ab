"""A page for people: upload photos, see the top-k as bars and where the model looked.

A small Flask app on loopback, in front of a running TorchServe. It serves the page
(``serving/page_static/``) and a same-origin JSON API that forwards to TorchServe with the keys
from ``key_file.json`` added on the server side. A static page on another origin cannot call a
token-protected TorchServe: the browser's CORS preflight carries no ``Authorization`` header.
The keys never reach the browser.

    GET  /                      the page
    GET  /api/config            the page's limits and defaults
    GET  /api/models            models, versions and default version (management API)
    GET  /api/examples          example photos: [{"id", "name", "label"}]
    GET  /examples/<id>         one example photo (by index: no path from the client is opened)
    POST /api/predict           multipart: files ``image`` (1..max_files), fields model, version, topk
    POST /api/explain           multipart: one file ``image``, fields model, version

Safe by default: it binds to loopback; uploads are capped in count and bytes (413 before any
byte goes to TorchServe); it fetches no URL a client names (only its own TorchServe's); the
page renders every label as text (no HTML from answers); and it sends a content security
policy that allows only the page's own scripts and styles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import requests
from flask import Flask, abort, jsonify, request, send_file, send_from_directory
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from serving.inference import list_images
from serving.server import PLAIN_MODEL_NAME, bearer

STATIC = Path(__file__).with_name("page_static")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
# the page's status when TorchServe does not answer (Bad Gateway: the page's server is up)
UNREACHABLE = 502


@dataclass(frozen=True)
class PageConfig:
    """Where TorchServe is, and the page's limits.

    Attributes:
        inference_url: TorchServe's inference API (``http://127.0.0.1:8080``).
        management_url: its management API (model and version pickers).
        key_file: TorchServe's ``key_file.json`` (read at each call: renewed keys are picked
            up); a missing file means token authorization is off.
        examples: folder of example photos (an ImageFolder split gives each its label).
        max_examples: most example photos shown, spread evenly over the sorted files (so
            over the classes of an ImageFolder split).
        max_files: most photos one upload may carry.
        max_file_bytes: largest photo, bytes (TorchServe's ``max_request_size`` is 20 MiB).
        default_topk: k the page starts with.
        timeout_s: seconds to wait for TorchServe (s).
    """

    inference_url: str
    management_url: str
    key_file: Path
    examples: Optional[Path] = None
    max_examples: int = 12
    max_files: int = 8
    max_file_bytes: int = 10 * 1024 * 1024
    default_topk: int = 3
    timeout_s: float = 60.0


def _error(status: int, message: str):
    return jsonify({"error": message}), status


def create_app(config: PageConfig) -> Flask:
    """The page's Flask app for ``config`` (``app.run`` or any WSGI server serves it)."""
    app = Flask(__name__, static_folder=None)
    # the whole multipart body: max_files photos plus the form fields
    app.config["MAX_CONTENT_LENGTH"] = config.max_files * config.max_file_bytes + 64 * 1024
    found = list_images(Path(config.examples).resolve()) if config.examples else []  # send_file: absolute
    n = min(len(found), config.max_examples)
    examples = [found[round(i * (len(found) - 1) / max(n - 1, 1))] for i in range(n)]

    @app.after_request
    def security_headers(response):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_exc):
        return _error(413, f"upload over {config.max_file_bytes // (1024 * 1024)} MiB per photo, "
                           f"{config.max_files} photos at most")

    @app.errorhandler(HTTPException)
    def http_error(exc):
        return _error(exc.code or 500, exc.description or exc.name)

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/static/<path:name>")
    def static_file(name):
        return send_from_directory(STATIC, name)  # safe_join: nothing outside STATIC

    @app.get("/api/config")
    def page_config():
        return jsonify({"max_files": config.max_files, "max_file_bytes": config.max_file_bytes,
                        "default_topk": config.default_topk})

    @app.get("/api/examples")
    def example_list():
        return jsonify([{"id": i, "name": p.name, "label": label}
                        for i, (p, label) in enumerate(examples)])

    @app.get("/examples/<int:index>")
    def example(index: int):
        if not 0 <= index < len(examples):
            abort(404, "no such example")
        return send_file(examples[index][0])

    def management(path: str):
        headers = bearer(config.key_file, "management")
        return requests.get(f"{config.management_url}{path}", headers=headers, timeout=config.timeout_s)

    @app.get("/api/models")
    def models():
        try:
            names = [m["modelName"] for m in management("/models?limit=1000").json()["models"]]
            out = []
            for name in names:
                default = management(f"/models/{name}").json()[0]["modelVersion"]
                versions = [v["modelVersion"] for v in management(f"/models/{name}/all").json()]
                out.append({"name": name, "default": default, "versions": versions})
        except requests.RequestException as exc:
            return _error(UNREACHABLE, f"TorchServe's management API is not reachable: {type(exc).__name__}")
        return jsonify(out)

    def forward(route: str, files: list, limit: int):
        """Sends ``files`` to TorchServe's ``route`` (predictions or explanations) for the
        form's model and version; answers with TorchServe's status and JSON."""
        model, version = request.form.get("model", ""), request.form.get("version", "")
        if not PLAIN_MODEL_NAME.fullmatch(model):
            return _error(400, "model must be a model name from /api/models")
        if version and not PLAIN_MODEL_NAME.fullmatch(version):
            return _error(400, "version must be a version from /api/models")
        if not files:
            return _error(400, "no photo in the upload (field image)")
        if len(files) > limit:
            return _error(413, f"{len(files)} photos: at most {limit} per upload")
        parts = []
        for i, f in enumerate(files):
            data = f.read(config.max_file_bytes + 1)
            if len(data) > config.max_file_bytes:
                return _error(413, f"{f.filename or f'photo {i}'} is over {config.max_file_bytes} bytes")
            parts.append((f"image{i}", (f"{i}", data, "application/octet-stream")))
        if "topk" in request.form:
            parts.append(("topk", (None, request.form["topk"])))
        url = f"{config.inference_url}/{route}/{model}" + (f"/{version}" if version else "")
        try:
            r = requests.post(url, files=parts, headers=bearer(config.key_file, "inference"),
                              timeout=config.timeout_s)
        except requests.RequestException as exc:
            return _error(UNREACHABLE, f"TorchServe is not reachable: {type(exc).__name__}")
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text[:500] or r.reason}
        if not r.ok:
            message = body.get("message") or body.get("error") if isinstance(body, dict) else body
            return _error(r.status_code, str(message))
        return jsonify(body if len(files) > 1 else [body])

    @app.post("/api/predict")
    def predict():
        return forward("predictions", request.files.getlist("image"), config.max_files)

    @app.post("/api/explain")
    def explain():
        return forward("explanations", request.files.getlist("image"), 1)

    return app
