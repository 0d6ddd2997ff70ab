"""Where the model looked: integrated gradients of the top-1 class, pooled to a small grid.

Served by TorchServe's explanations API (``POST /explanations/<m>``, ``/v1/models/<m>:explain``,
``/v2/models/<m>/explain``): the frontend marks such a request with the header ``explain:
True`` and the handler answers it with ``explain`` below instead of top-k alone.

Method: Captum's ``IntegratedGradients`` (Sundararajan et al., 2017, "Axiomatic Attribution
for Deep Networks"), from a baseline of zeros in the normalized input space (the
normalization's mean colour, a flat grey), ``steps`` points on the path. The attribution's
absolute value summed over the colour channels is average-pooled to ``grid`` x ``grid`` cells
(so the answer stays small: 32 x 32 floats per image) and divided by its 99th percentile, clipped
to 1: integrated gradients are spiky, and scaling by the single largest cell would leave all but a
few cells near 0 (Captum's own visualization clips the top 2 % the same way).
It needs gradients, so it runs on the eager torch model whatever back-end serves predictions.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from handler.postprocessing import wrapped

METHOD = "integrated_gradients"
CLIP_QUANTILE = 0.99  # cells at or above it show as 1


def saliency(model: torch.nn.Module, x: torch.Tensor, steps: int = 16, grid: int = 32,
             target: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 probabilities and saliency maps of a batch.

    Args:
        model: the eager classifier (logits out), in eval mode.
        x: float32 [N, 3, H, W], normalized as the model expects (``EvalTransform.normalize``).
        steps: integration steps (the cost is ``steps`` forward and backward passes per image).
        grid: side of the pooled map, cells (at most H and W).
        target: int64 [N] class per image to explain; default each image's top-1.

    Returns:
        ``(probs, maps)``: softmax probabilities float32 [N, C] and saliency float32
        [N, grid, grid] in [0, 1] (1 at and above each image's 99th percentile; all 0 when the
        attribution is 0 everywhere).
    """
    from captum.attr import IntegratedGradients

    with torch.inference_mode():
        probs = model(x).float().softmax(dim=1)
    if target is None:
        target = probs.argmax(dim=1)
    x = x.detach().clone().contiguous()  # a leaf outside inference mode: captum needs grads
    with torch.enable_grad():
        attributions = IntegratedGradients(model).attribute(
            x, baselines=torch.zeros_like(x), target=target, n_steps=steps,
            internal_batch_size=max(steps, 1))
    heat = attributions.detach().abs().sum(dim=1, keepdim=True)
    pooled = F.adaptive_avg_pool2d(heat, min(grid, heat.shape[-2], heat.shape[-1]))[:, 0]
    top = pooled.flatten(1).quantile(CLIP_QUANTILE, dim=1)
    top = torch.where(top > 0, top, pooled.flatten(1).amax(dim=1)).clamp_min(torch.finfo(pooled.dtype).tiny)
    return probs, (pooled / top[:, None, None]).clamp(max=1.0).float()


def explanation_records(probs: torch.Tensor, maps: torch.Tensor, labels: list[str],
                        crop_fraction: float = 1.0, decimals: int = 3) -> list[dict]:
    """One record per image: the explained (top-1) class and its map.

    Args:
        probs: float32 [N, C] softmax probabilities.
        maps: float32 [N, g, g] from ``saliency``.
        labels: class names, index order.
        crop_fraction: ``crop_size / resize_size`` of the model's ``EvalTransform``: the map
            covers the photo's central square of this fraction of its shorter side.
        decimals: rounding of the map's values (the answer's size).

    Returns:
        ``[{"label", "index", "probability", "method", "crop_fraction",
        "saliency": [[g floats] x g]}, ...]``, the map's rows top to bottom.
    """
    top_p, top_i = probs.max(dim=1)
    return [{"label": labels[int(i)], "index": int(i), "probability": round(float(p), 4),
             "method": METHOD, "crop_fraction": round(crop_fraction, 4),
             "saliency": [[round(float(v), decimals) for v in row] for row in m]}
            for p, i, m in zip(top_p, top_i, maps)]


def explanation_answer(form: str, records: list[dict], *, model_name: str = "",
                       model_version: str = "", request_id: Optional[str] = None) -> object:
    """One explanation request's JSON answer in its form (``payload.FORMS``).

    Returns:
        ``single``: the record; ``list``: the records; ``v1``: ``{"explanations": [...]}``;
        ``v2``: ``{"model_name", "model_version", "id"?, "outputs": [saliency FP32 [N, g, g],
        labels BYTES [N], probabilities FP32 [N], indices INT64 [N]]}``, row-major ``data``.

    Raises:
        ValueError: unknown form, or a ``single`` answer for other than one image.
    """
    if form != "v2":
        return wrapped(form, records, "explanations")
    n = len(records)
    g = len(records[0]["saliency"]) if records else 0
    out = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        out["id"] = request_id
    out["outputs"] = [
        {"name": "saliency", "datatype": "FP32", "shape": [n, g, g],
         "parameters": {"crop_fraction": records[0]["crop_fraction"] if records else 1.0},
         "data": [v for r in records for row in r["saliency"] for v in row]},
        {"name": "labels", "datatype": "BYTES", "shape": [n], "data": [r["label"] for r in records]},
        {"name": "probabilities", "datatype": "FP32", "shape": [n],
         "data": [r["probability"] for r in records]},
        {"name": "indices", "datatype": "INT64", "shape": [n], "data": [r["index"] for r in records]},
    ]
    return out
