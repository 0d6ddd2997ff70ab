"""Reading TorchServe's Prometheus metrics (``metrics_mode=prometheus``) for one model.

Parsed with ``prometheus_client``'s text parser; the handler's own metrics are declared in
``monitoring/metrics.yaml``.
"""

from __future__ import annotations

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
