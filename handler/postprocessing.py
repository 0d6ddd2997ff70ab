"""Top-k records from class probabilities. Pure functions, no TorchServe import."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def topk_records(
    probs: torch.Tensor, labels: Sequence[str], ks: Sequence[int]
) -> list[list[dict]]:
    """Turns class probabilities into per-image top-k records.

    ``k`` is clamped to the number of classes (``k = min(k, C)``, as timm's ``inference.py``
    does), so a 3-class model asked for 5 answers 3 records.

    Args:
        probs: float tensor [B, C], softmax over classes (any device).
        labels: C class names in index order (the model's ``class_to_idx`` inverted).
        ks: B requested k values, each >= 1.

    Returns:
        B lists, each of ``min(k_i, C)`` dicts ``{"label": str, "index": int,
        "probability": float}`` sorted by probability, highest first.

    Raises:
        ValueError: shape mismatch between ``probs``, ``labels`` and ``ks``, or a k < 1.
    """
    if probs.dim() != 2 or probs.shape[1] != len(labels) or probs.shape[0] != len(ks):
        raise ValueError(
            f"probs {tuple(probs.shape)} does not match {len(ks)} ks x {len(labels)} labels"
        )
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {list(ks)}")
    if probs.shape[0] == 0:
        return []
    kmax = min(max(ks), len(labels))
    values, indices = probs.detach().float().cpu().topk(kmax, dim=1)
    values, indices = values.tolist(), indices.tolist()
    return [
        [
            {"label": labels[i], "index": i, "probability": p}
            for p, i in zip(values[row][:k], indices[row][:k])
        ]
        for row, k in enumerate(ks)
    ]


def answer(form: str, records: list[list[dict]], *, model_name: str = "", model_version: str = "",
           request_id: Optional[str] = None) -> object:
    """One request's JSON answer in the form it was asked in (``payload.FORMS``).

    Args:
        form: ``single`` (the one image's records), ``list`` (a list per image), ``v1``
            (``{"predictions": [...]}``) or ``v2`` (Open Inference Protocol outputs).
        records: the top-k records of each of the request's N images (``topk_records``), all
            with the same k.
        model_name, model_version, request_id: echoed by ``v2`` (``id`` only when given).

    Returns:
        ``v2``: ``{"model_name", "model_version", "id"?, "outputs": [labels BYTES [N, k],
        probabilities FP32 [N, k], indices INT64 [N, k]]}`` with row-major ``data``.

    Raises:
        ValueError: unknown form, or a ``single`` answer for other than one image.
    """
    if form != "v2":
        return wrapped(form, records, "predictions")
    shape = [len(records), len(records[0]) if records else 0]
    out = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        out["id"] = request_id
    out["outputs"] = [
        {"name": "labels", "datatype": "BYTES", "shape": shape,
         "data": [r["label"] for image in records for r in image]},
        {"name": "probabilities", "datatype": "FP32", "shape": shape,
         "data": [r["probability"] for image in records for r in image]},
        {"name": "indices", "datatype": "INT64", "shape": shape,
         "data": [r["index"] for image in records for r in image]},
    ]
    return out


def wrapped(form: str, records: list, v1_key: str) -> object:
    """The answer of a request in a form other than ``v2``: ``single`` (the one image's),
    ``list`` (one per image) or ``v1`` (``{v1_key: [...]}``).

    Raises:
        ValueError: ``v2`` or an unknown form, or a ``single`` answer for other than one image.
    """
    if form == "single":
        if len(records) != 1:
            raise ValueError(f"a single-image answer for {len(records)} images")
        return records[0]
    if form == "list":
        return records
    if form == "v1":
        return {v1_key: records}
    raise ValueError(f"unknown answer form {form!r}")


def error_answer(form: str, body: dict) -> dict:
    """A client error's JSON in the request's protocol: KServe v1 and v2 answer
    ``{"error": "<message>"}``; TorchServe's forms keep ``{"code", "type", "message"}``."""
    return {"error": body["message"]} if form in ("v1", "v2") else body


def format_topk(records: list[dict]) -> str:
    """Renders top-k records as an aligned text table (rank, label, index, probability)."""
    width = max([len("label")] + [len(r["label"]) for r in records])
    lines = [f"{'rank':>4}  {'label':<{width}}  {'index':>5}  {'probability':>11}"]
    lines += [f"{rank:>4}  {r['label']:<{width}}  {r['index']:>5}  {r['probability']:>11.4f}"
              for rank, r in enumerate(records, 1)]
    return "\n".join(lines)
