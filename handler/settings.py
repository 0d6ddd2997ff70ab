"""The handler's settings: the ``handler:`` section of the archive's ``model-config.yaml``,
parsed once into a typed object; every default is named here (the decode budget's come from
``preprocessing.DecodeBudget``, the image count's from ``payload``).

A misspelt key is an error at load time that names the key and the accepted ones, not a
setting silently left at its default. ``training/archive.py`` writes the section from these
defaults, so the two sides cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from handler.backends import BACKENDS, TORCH_BACKENDS
from handler.payload import DEFAULT_MAX_IMAGES_PER_REQUEST
from handler.preprocessing import DEFAULT_DECODE_BUDGET, DecodeBudget, EvalTransform

DEFAULT_TOPK = 5
# Free CPU heap (MiB) a worker keeps between batches (handler/backends.retain_heap): the
# figures behind 1024 are in docs/performance.md ("worker heap").
DEFAULT_RETAIN_HEAP_MB = 1024


@dataclass(frozen=True)
class HandlerSettings:
    """The ``handler:`` section of ``model-config.yaml``.

    Attributes:
        preprocessing: the one ``EvalTransform`` (crop_size, resize_size, mean, std,
            interpolation), written by the archive step from the checkpoint. Required.
        topk: default k (int >= 1) when a request names none.
        num_threads: intra-op threads per worker, torch and ONNX Runtime. 0: the worker's CPUs
            divided by ``maxWorkers`` (at least 1; ``backends.default_threads``).
        backend: one of ``backends.BACKENDS``; ONNX Runtime back-ends read the archive's
            ``model.onnx`` / ``model.int8.onnx`` (or ``model.int8-w8.onnx`` on a VNNI CPU:
            ``backends.onnx_file``).
        gpu_backends: torch back-ends that passed the archive's accuracy gate (``--backend
            auto``); a CUDA worker times these at load and serves the fastest. None: the CPU
            choice (``backend``) applies everywhere.
        retain_heap_mb: free CPU heap (MiB) kept for the next batch instead of being unmapped
            (``backends.retain_heap``); 0 leaves glibc's defaults.
        max_images_per_request: most images one request may carry (more: 413).
        max_images_per_forward: most images one forward pass takes, however many images the
            batch's requests carry (8 requests of 20 images run as chunks of this size).
        max_jpeg_scans, max_jpeg_scan_megapixels: the decode budget of a JPEG
            (``preprocessing.DecodeBudget``); over it a request gets 413 before decoding.
        explain_steps: integration steps of an explanation (``explanations.saliency``; each
            costs a forward and a backward pass per image).
        explain_grid: side of an explanation's saliency map, cells.
        max_images_per_explanation: most images one explanation request may carry (more: 413).
        backend_selection, quantization: the archive step's record of why this back-end (its
            timings and accuracy gate). Read by people, not by the handler.
    """

    preprocessing: EvalTransform
    topk: int = DEFAULT_TOPK
    num_threads: int = 0
    backend: str = "eager"
    gpu_backends: Optional[tuple[str, ...]] = None
    retain_heap_mb: int = DEFAULT_RETAIN_HEAP_MB
    max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST
    max_images_per_forward: int = 32
    max_jpeg_scans: int = DEFAULT_DECODE_BUDGET.max_jpeg_scans
    max_jpeg_scan_megapixels: float = DEFAULT_DECODE_BUDGET.max_jpeg_scan_megapixels
    explain_steps: int = 16
    explain_grid: int = 32
    max_images_per_explanation: int = 4
    backend_selection: Optional[dict] = None
    quantization: Optional[dict] = None

    @classmethod
    def from_config(cls, section: Any) -> "HandlerSettings":
        """Parses and validates the ``handler:`` section.

        Raises:
            ValueError: not a mapping, an unknown key (the message names it and the accepted
                keys), ``preprocessing`` missing, or a value of the wrong type or range.
        """
        if not isinstance(section, dict):
            raise ValueError("model-config.yaml needs a handler: section (a mapping) with at "
                             "least preprocessing (see training/archive.py)")
        accepted = [f.name for f in fields(cls)]
        unknown = sorted(set(section) - set(accepted))
        if unknown:
            raise ValueError(f"model-config.yaml handler: unknown key(s) {unknown}; accepted: "
                             f"{accepted}")
        if "preprocessing" not in section:
            raise ValueError("model-config.yaml needs handler.preprocessing (see training/archive.py)")
        values = dict(section)
        values["preprocessing"] = EvalTransform.from_dict(section["preprocessing"])
        for name, low in (("topk", 1), ("num_threads", 0), ("retain_heap_mb", 0),
                          ("max_jpeg_scans", 1), ("max_images_per_request", 1),
                          ("max_images_per_forward", 1), ("explain_steps", 1),
                          ("explain_grid", 1), ("max_images_per_explanation", 1)):
            if name in values:
                value = values[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise ValueError(f"handler.{name} must be an integer >= {low}, got {value!r}")
        mpx = values.get("max_jpeg_scan_megapixels", cls.max_jpeg_scan_megapixels)
        if isinstance(mpx, bool) or not isinstance(mpx, (int, float)) or mpx <= 0:
            raise ValueError(f"handler.max_jpeg_scan_megapixels must be a number > 0, got {mpx!r}")
        if values.get("backend", cls.backend) not in BACKENDS:
            raise ValueError(f"handler.backend {values['backend']!r} is not one of {BACKENDS}")
        gpu = values.get("gpu_backends")
        if gpu is not None:
            if not isinstance(gpu, (list, tuple)) or not set(gpu) <= set(TORCH_BACKENDS):
                raise ValueError(f"handler.gpu_backends {gpu!r} must be a list among {TORCH_BACKENDS}")
            values["gpu_backends"] = tuple(gpu)
        return cls(**values)

    @property
    def decode_budget(self) -> DecodeBudget:
        """The JPEG decode budget these settings give."""
        return DecodeBudget(self.max_jpeg_scans, float(self.max_jpeg_scan_megapixels))
