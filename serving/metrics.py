"""Reading TorchServe's Prometheus metrics (``metrics_mode=prometheus``) for one model.

Parsed with ``prometheus_client``'s text parser; the handler's own metrics are declared in
``monitoring/metrics.yaml``.
"""

from __future__ import annotations

import time

import requests
from prometheus_client.parser import text_string_to_metric_families

# figure -> (sample name, label naming the model): TorchServe's frontend labels by model_name,
# the handler's metrics (monitoring/metrics.yaml) by ModelName
SERVER_TOTALS = {
    "queue_us": ("ts_queue_latency_microseconds", "model_name"),
    "requests": ("ts_inference_requests_total", "model_name"),
    "preprocess_s": ("classifier_preprocess_seconds_sum", "ModelName"),
    "preprocessed": ("classifier_preprocess_seconds_count", "ModelName"),
    "inference_s": ("classifier_inference_seconds_sum", "ModelName"),
    "batches": ("classifier_inference_seconds_count", "ModelName"),
    # observed last in each batch (after inference): equal to "batches" once a batch's lines are in
    "postprocessed": ("classifier_postprocess_seconds_count", "ModelName"),
}


def model_totals(text: str, model: str) -> dict[str, float]:
    """Sums of each ``SERVER_TOTALS`` sample labelled with ``model``, over all other labels.

    Args:
        text: a Prometheus text exposition (``GET <metrics_address>/metrics``).
        model: the model name.

    Returns:
        ``{figure: total}``; 0.0 for samples absent from ``text`` (the stock handler has none
        of the handler's own).
    """
    wanted = {name: (key, label) for key, (name, label) in SERVER_TOTALS.items()}
    out = {key: 0.0 for key in SERVER_TOTALS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                key, label = wanted[sample.name]
                if sample.labels.get(label) == model:
                    out[key] += sample.value
    return out


def server_totals(metrics_url: str, model: str, timeout_s: float = 10.0) -> dict[str, float]:
    """``model_totals`` of the live ``<metrics_url>/metrics``."""
    return model_totals(requests.get(f"{metrics_url}/metrics", timeout=timeout_s).text, model)


def settled_totals(metrics_url: str, model: str, before: dict[str, float], images: int,
                   timeout_s: float = 5.0) -> dict[str, float]:
    """``server_totals`` minus ``before``, read again until the handler's metrics for ``images``
    images have all arrived.

    The worker's metric lines reach the frontend on its stdout, which the frontend reads on
    its own thread: a scrape right after the last answer can miss the last batch's lines, or
    hold only its first ones (preprocessing counted, inference not yet). Settled means every
    image preprocessed and every batch postprocessed (the last metric a batch observes).

    Args:
        metrics_url: the metrics API's base URL.
        model: the model name.
        before: ``server_totals`` taken before the requests were sent.
        images: images the requests carried.
        timeout_s: seconds to wait at most (s); then the last reading is returned.

    Returns:
        ``{figure: total since before}``. For a handler without these metrics (the stock one,
        ``before`` without preprocessed images), the first reading.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        d = {k: v - before[k] for k, v in server_totals(metrics_url, model).items()}
        ours = before["preprocessed"] > 0 or d["preprocessed"] > 0
        if (not ours or time.monotonic() > deadline
                or (d["preprocessed"] >= images and d["postprocessed"] == d["batches"])):
            return d
        time.sleep(0.05)
