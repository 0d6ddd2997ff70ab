"""Request parsing for the handler: what TorchServe's worker delivers -> ``Parsed`` (the
encoded images, k, and the protocol form to answer in).

No TorchServe import: unit-tested without a server.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from handler.preprocessing import BadParameterError, ClientError, DecodeError

# Field names that may carry the image: "data" (multipart / JSON, TorchServe's convention)
# and "body" (what the worker calls a raw request body).
IMAGE_FIELDS = ("data", "body")
HOW_TO_SEND = ("send the image as the raw body (curl -T img.jpg URL, or --data-binary @img.jpg "
               "-H 'Content-Type: application/octet-stream'), as multipart (curl -F data=@img.jpg "
               "URL) or as JSON {\"data\": \"<base64>\"}")


class UnsupportedMediaTypeError(ClientError):
    """The request's Content-Type cannot carry an image the way it was sent (415)."""

    status = 415
    reason = "bad_request"


@dataclass
class Batch:
    """A batch of requests in flight between ``preprocess``, ``inference`` and ``postprocess``.

    TorchServe batches requests; a request may carry several images. ``inference`` runs the
    model on at most ``handler.max_images_per_forward`` images at a time, whatever the batch
    carries.

    Attributes:
        size: number of requests in the batch.
        pixels: uint8 [M, 3, H, W], the M decoded images of the good requests, in order.
        requests: request index -> its ``Parsed`` form (good requests only).
        spans: request index -> (first, end) rows of its images in ``pixels``.
        errors: request index -> the client error it gets, and the form to answer it in.
        probs: float32 [M, C] softmax probabilities, set by ``inference``.
        explain: indices of the requests that asked for an explanation (the frontend's
            ``explain: True`` header: ``/explanations``, ``:explain``, ``/explain`` routes).
    """

    size: int
    pixels: Optional[torch.Tensor] = None
    requests: dict[int, "Parsed"] = field(default_factory=dict)
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)
    errors: dict[int, tuple[ClientError, str]] = field(default_factory=dict)
    probs: Optional[torch.Tensor] = None
    explain: set[int] = field(default_factory=set)

    def subset(self, indices: set[int]) -> "Batch":
        """The requests ``indices`` alone, as a batch of the same ``size`` (request indices
        keep their meaning; ``pixels`` holds only their images, ``spans`` re-based)."""
        out = Batch(size=self.size, errors={i: e for i, e in self.errors.items() if i in indices},
                    explain=self.explain & set(indices))
        rows: list[int] = []
        for idx in sorted(i for i in self.requests if i in indices):
            first, end = self.spans[idx]
            out.requests[idx] = self.requests[idx]
            out.spans[idx] = (len(rows), len(rows) + end - first)
            rows.extend(range(first, end))
        if rows:
            out.pixels = self.pixels[rows]
        return out


def _header(headers: dict, name: str) -> str:
    name = name.lower()
    return next((str(v) for k, v in headers.items() if str(k).lower() == name), "")


def parse_topk(value: Any, default: int) -> int:
    """Parses a request's ``topk`` (multipart field, JSON field or query parameter).

    Args:
        value: None (use ``default``), an int, or its text as str / bytes.
        default: the model's default k.

    Returns:
        k >= 1. Values above the number of classes are allowed here and clamped later.

    Raises:
        BadParameterError: not an integer, or < 1.
    """
    if value is None:
        return default
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadParameterError(f"topk must be a positive integer, got {value!r}")
    try:
        k = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise BadParameterError(f"topk must be a positive integer, got {value!r}") from None
    if k < 1:
        raise BadParameterError(f"topk must be >= 1, got {k}")
    return k


# Request forms (``Parsed.form``) and how each is answered:
#   "single": one image on /predictions (raw body, one multipart file, JSON {"data": "<b64>"})
#             -> the image's top-k records;
#   "list":   several images on /predictions (JSON {"data": ["<b64>", ...]}, or several
#             multipart file fields) -> a list with one top-k list per image;
#   "v1":     KServe v1, {"instances": [{"b64"|"data": "<b64>"} | "<b64>", ...]}
#             -> {"predictions": [top-k list per image]};
#   "v2":     the Open Inference Protocol, one BYTES input tensor of shape [N]
#             -> {"model_name", "model_version", "id", "outputs": [labels, probabilities, indices]}.
FORMS = ("single", "list", "v1", "v2")
# most images one request may carry, unless handler.max_images_per_request says otherwise
DEFAULT_MAX_IMAGES_PER_REQUEST = 64
# multipart / query fields that are parameters, not images
PARAMETER_FIELDS = ("topk", "model_name")
# Open Inference Protocol's binary tensor data extension: the JSON header's length, when the
# body is the JSON header followed by the raw tensor bytes
BINARY_HEADER = "inference-header-content-length"


@dataclass
class Parsed:
    """One request, parsed: its encoded images in order, its k, and the form to answer in.

    Attributes:
        images: the encoded image files (bytes), in request order; at least one.
        k: requested top-k (>= 1; clamped to the number of classes later).
        form: one of ``FORMS``.
        request_id: the v2 request's ``id``, echoed in the answer.
    """

    images: list[bytes]
    k: int
    form: str = "single"
    request_id: Optional[str] = None


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise ClientError(f"{where} must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ClientError(f"{where} is not valid base64: {exc}") from None


def _json_body(payload: Any, content_type: str, media_type: str) -> Any:
    """The JSON body as the worker delivers it: parsed (exact ``application/json``) or bytes."""
    if media_type == "application/json" and isinstance(payload, (bytes, bytearray)):
        # the worker parses only the exact "application/json" (not "Application/JSON" or
        # "application/json; charset=utf-8"), and forwards invalid JSON as bytes
        try:
            payload = json.loads(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ClientError(f"the body is not valid JSON (Content-Type {content_type}): {exc}") from None
    if media_type == "application/json" and not isinstance(payload, (dict, type(None))):
        raise ClientError('a JSON body must be an object ({"data": "<base64>", "topk": k}, '
                          '{"instances": [...]} or {"inputs": [...]}), not '
                          f"{type(payload).__name__} {str(payload)[:40]!r}")
    return payload


def _v2_binary(payload: bytes, header_length: str) -> dict:
    """Splits a binary-extension body: JSON header, then each input's raw bytes in order
    (``parameters.binary_data_size``); a BYTES tensor's elements are each a 4-byte
    little-endian length and the bytes (the Open Inference Protocol's binary data extension)."""
    try:
        n = int(header_length)
        body = json.loads(payload[:n].decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(f"{BINARY_HEADER} {header_length!r} does not frame a JSON header: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise ClientError('the binary request\'s JSON header needs "inputs"')
    offset = n
    for tensor in body["inputs"]:
        size = ((tensor.get("parameters") or {}) if isinstance(tensor, dict) else {}).get("binary_data_size")
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(payload):
            raise ClientError(f"input binary_data_size {size!r} does not fit the {len(payload) - n} "
                              "bytes after the JSON header")
        raw, offset, elements = payload[offset:offset + size], offset + size, []
        i = 0
        while i < len(raw):
            if i + 4 > len(raw):
                raise ClientError("a BYTES element's 4-byte length is cut off")
            length = int.from_bytes(raw[i:i + 4], "little")
            if i + 4 + length > len(raw):
                raise ClientError(f"a BYTES element of {length} bytes overruns its tensor")
            elements.append(raw[i + 4:i + 4 + length])
            i += 4 + length
        tensor["data"] = elements
    return body


def _v1(body: dict, topk: Any, default_topk: int, max_images: int) -> Parsed:
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise ClientError('"instances" must be a non-empty list of images')
    _check_count(len(instances), max_images)
    images = []
    for i, instance in enumerate(instances):
        where = f"instance {i}"
        if isinstance(instance, dict):
            key = next((f for f in ("b64", "data") if f in instance), None)
            if key is None:
                raise ClientError(f'{where} needs a "b64" (or "data") field with the base64-encoded image')
            instance = instance[key]
        images.append(_b64(instance, where))
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    return Parsed(images, parse_topk(params.get("topk", body.get("topk", topk)), default_topk), "v1")


def _v2(body: dict, topk: Any, default_topk: int, max_images: int) -> Parsed:
    inputs = body["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ClientError('"inputs" must hold exactly one tensor: the images, datatype BYTES, shape [N]')
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise ClientError(f'input "{tensor.get("name")}" must have datatype BYTES (encoded images), '
                          f'got {tensor.get("datatype")!r}')
    data, shape = tensor.get("data"), tensor.get("shape")
    if not isinstance(data, list) or not data:
        raise ClientError(f'input "{tensor.get("name")}" needs "data": a non-empty list of images')
    if shape is not None and shape != [len(data)]:
        raise ClientError(f'input "{tensor.get("name")}" has shape {shape!r} but {len(data)} elements: '
                          f"expected [{len(data)}]")
    _check_count(len(data), max_images)
    images = [element if isinstance(element, (bytes, bytearray))
              else _b64(element, f'input "{tensor.get("name")}" element {i}')
              for i, element in enumerate(data)]
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    request_id = body.get("id")
    return Parsed([bytes(b) for b in images], parse_topk(params.get("topk", topk), default_topk), "v2",
                  request_id if isinstance(request_id, str) else None)


def _check_count(n: int, max_images: int) -> None:
    if n > max_images:
        raise TooManyImagesError(f"{n} images in one request: at most {max_images} "
                                 "(handler.max_images_per_request); split the request")


class TooManyImagesError(ClientError):
    """More images in one request than ``handler.max_images_per_request`` (413)."""

    status = 413
    reason = "too_large"


def protocol_of(row: dict, headers: dict) -> str:
    """The answer form a request asks for, from its body alone (never raises): ``v1`` for a
    body with ``instances``, ``v2`` for ``inputs`` (or the binary extension header), else
    ``single``. Used to render an error in the request's own protocol."""
    payload = next((row[f] for f in IMAGE_FIELDS if row.get(f) is not None), None)
    if _header(headers, BINARY_HEADER):
        return "v2"
    if isinstance(payload, (bytes, bytearray)) and payload[:1] == b"{" and \
            _header(headers, "content-type").split(";")[0].strip().lower() == "application/json":
        try:
            payload = json.loads(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return "single"
    if isinstance(payload, dict):
        return "v1" if "instances" in payload else "v2" if "inputs" in payload else "single"
    return "single"


def parse_request(row: dict, headers: dict, default_topk: int,
                  max_images: int = DEFAULT_MAX_IMAGES_PER_REQUEST) -> Parsed:
    """Parses one request, as the TorchServe worker delivers it, in any accepted form.

    Args:
        row: the worker's input dict: parameter name -> value (bytes; str for text/*;
            a parsed object for application/json).
        headers: the request's headers (any case).
        default_topk: k when the request names none.
        max_images: most images one request may carry.

    Returns:
        The ``Parsed`` request (encoded images not yet decoded).

    Raises:
        ClientError: no image, a JSON body that is not an object or lacks its images, invalid
            JSON or base64, a malformed v1/v2 body, a form-urlencoded body, an invalid
            ``topk`` (422), or more than ``max_images`` images (413).
    """
    content_type = _header(headers, "content-type").lower()
    media_type = content_type.split(";", 1)[0].strip()
    if media_type.startswith("application/x-www-form-urlencoded"):
        raise UnsupportedMediaTypeError(
            "the body was sent as application/x-www-form-urlencoded (curl --data-binary sets "
            "that by default) and was parsed as form fields, not an image: " + HOW_TO_SEND)
    payload = next((row[f] for f in IMAGE_FIELDS if row.get(f) is not None), None)
    topk = row.get("topk")
    if _header(headers, BINARY_HEADER) and isinstance(payload, (bytes, bytearray)):
        return _v2(_v2_binary(bytes(payload), _header(headers, BINARY_HEADER)), topk, default_topk, max_images)
    payload = _json_body(payload, content_type, media_type)
    if isinstance(payload, dict):  # a JSON body
        if "instances" in payload:
            return _v1(payload, topk, default_topk, max_images)
        if "inputs" in payload:
            return _v2(payload, topk, default_topk, max_images)
        topk = payload.get("topk", topk)
        data = payload.get("data")
        if data is None:
            raise ClientError('JSON body needs a "data" field holding the base64-encoded image '
                              '(or a list of them), or "instances" (KServe v1) or "inputs" (v2)')
        if isinstance(data, list):
            if not data:
                raise ClientError('JSON "data" is an empty list')
            _check_count(len(data), max_images)
            return Parsed([_b64(d, f'JSON "data" element {i}') for i, d in enumerate(data)],
                          parse_topk(topk, default_topk), "list")
        image = _b64(data, 'JSON "data"')
        if not image:
            raise DecodeError("empty image: the request carried no bytes")
        return Parsed([image], parse_topk(topk, default_topk))
    if isinstance(payload, str):
        raise UnsupportedMediaTypeError(
            f"got text (Content-Type {content_type or 'text/*'}), not image bytes: " + HOW_TO_SEND)
    files = [(name, value) for name, value in row.items()
             if name not in PARAMETER_FIELDS and value is not None]
    if len(files) > 1:  # several multipart file fields: one image each, in form order
        _check_count(len(files), max_images)
        images = []
        for name, value in files:
            if not isinstance(value, (bytes, bytearray)):
                raise ClientError(f'multipart field "{name}" holds text, not an image file: send '
                                  f"every image as a file (curl -F {name}=@photo.jpg)")
            images.append(bytes(value))
        return Parsed(images, parse_topk(topk, default_topk), "list")
    if payload is None and files:  # one multipart file under another name than "data"
        payload = files[0][1]
    if payload is None:
        raise ClientError("no image in the request: " + HOW_TO_SEND)
    if not isinstance(payload, (bytes, bytearray)):  # a multipart field TorchServe decoded
        raise ClientError(f"the image field holds {type(payload).__name__}, not bytes: " + HOW_TO_SEND)
    k = parse_topk(topk, default_topk)
    if not payload:
        raise DecodeError("empty image: the request carried no bytes")
    return Parsed([bytes(payload)], k)


class InternalError(ClientError):
    """An unexpected failure while preparing one request (500 for that request only)."""

    status = 500
    reason = "internal"
