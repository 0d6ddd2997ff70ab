"""ONNX export and int8 post-training quantization for the ONNX Runtime back-ends.

Used by ``training/archive.py --backend onnxruntime[-int8]``; the handler runs the files with
``handler/backends.py``.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

OPSET = 17


def export_onnx(model: torch.nn.Module, crop_size: int, path: Path) -> Path:
    """Exports ``model`` (fp32, eval) to ONNX with a dynamic batch dimension.

    Input ``images`` float32 [N, 3, crop_size, crop_size]; output ``logits`` float32 [N, C].
    Uses the TorchScript-based exporter (``dynamo=False``): one trace, no extra packages.
    """
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, 3, crop_size, crop_size),), str(path),
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    return path


def quantize_int8(fp32_path: Path, path: Path, calibration: torch.Tensor) -> Path:
    """Static int8 quantization of an fp32 ONNX model with ONNX Runtime.

    QDQ format, per-channel symmetric int8 weights, uint8 activations whose ranges come from
    running ``calibration`` (float32 [N, 3, H, W], preprocessed training images) through the
    model (MinMax calibration: ``onnxruntime.quantization.quantize_static`` defaults).
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i:i + 8].numpy() for i in range(0, len(calibration), 8))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference + graph folding
        quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
    return path


def onnx_predictions(path: Path, images: torch.Tensor) -> np.ndarray:
    """Top-1 class index per image (int64 [N]) from an ONNX model, on CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"images": images[i:i + 32].numpy()})[0].argmax(1)
                           for i in range(0, len(images), 32)])
