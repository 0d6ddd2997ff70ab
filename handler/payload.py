"""Request parsing for the handler: what TorchServe's worker delivers -> (image bytes, k).

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
    """A batch in flight between ``preprocess``, ``inference`` and ``postprocess``.

    Attributes:
        size: number of requests in the batch.
        images: float32 [N, 3, H, W] for the N requests that decoded, on the worker's device.
        ks: top-k per decoded request (N ints).
        rows: request index of each decoded image (N ints).
        errors: request index -> the client error it gets.
        probs: float32 [N, C] softmax probabilities, set by ``inference``.
    """

    size: int
    images: Optional[torch.Tensor] = None
    ks: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    errors: dict[int, ClientError] = field(default_factory=dict)
    probs: Optional[torch.Tensor] = None


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


def parse_request(row: dict, headers: dict, default_topk: int) -> tuple[bytes, int]:
    """Extracts the encoded image and k from one request as the TorchServe worker delivers it.

    Args:
        row: the worker's input dict: parameter name -> value (bytes; str for text/*;
            a parsed object for application/json).
        headers: the request's headers (any case).
        default_topk: k when the request names none.

    Returns:
        (encoded image bytes, k).

    Raises:
        ClientError: no image, a JSON body that is not an object or has no ``data``, invalid
            JSON or base64, a form-urlencoded body, or an invalid ``topk``.
    """
    content_type = _header(headers, "content-type").lower()
    media_type = content_type.split(";", 1)[0].strip()
    if content_type.startswith("application/x-www-form-urlencoded"):
        raise UnsupportedMediaTypeError(
            "the body was sent as application/x-www-form-urlencoded (curl --data-binary sets "
            "that by default) and was parsed as form fields, not an image: " + HOW_TO_SEND)
    payload = next((row[f] for f in IMAGE_FIELDS if row.get(f) is not None), None)
    topk = row.get("topk")
    if media_type == "application/json" and isinstance(payload, (bytes, bytearray)):
        # the worker parses only the exact "application/json" (not "Application/JSON" or
        # "application/json; charset=utf-8"), and forwards invalid JSON as bytes
        try:
            payload = json.loads(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ClientError(f"the body is not valid JSON (Content-Type {content_type}): {exc}") from None
    if media_type == "application/json" and not isinstance(payload, (dict, type(None))):
        raise ClientError('a JSON body must be an object {"data": "<base64>", "topk": k}, not '
                          f"{type(payload).__name__} {str(payload)[:40]!r}")
    if isinstance(payload, dict):  # application/json body
        topk = payload.get("topk", topk)
        if payload.get("data") is None:
            raise ClientError('JSON body needs a "data" field holding the base64-encoded image')
        payload = payload["data"]
        if not isinstance(payload, str):
            raise ClientError('JSON "data" must be a base64 string')
        try:
            payload = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ClientError(f'JSON "data" is not valid base64: {exc}') from None
    elif isinstance(payload, str):
        raise UnsupportedMediaTypeError(
            f"got text (Content-Type {content_type or 'text/*'}), not image bytes: " + HOW_TO_SEND)
    elif payload is None:
        raise ClientError("no image in the request: " + HOW_TO_SEND)
    elif not isinstance(payload, (bytes, bytearray)):  # a multipart field TorchServe decoded
        raise ClientError(f"the image field holds {type(payload).__name__}, not bytes: " + HOW_TO_SEND)
    k = parse_topk(topk, default_topk)
    if not payload:
        raise DecodeError("empty image: the request carried no bytes")
    return bytes(payload), k


class InternalError(ClientError):
    """An unexpected failure while preparing one request (500 for that request only)."""

    status = 500
    reason = "internal"
