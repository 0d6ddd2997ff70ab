"""The back-end that fits this CPU, chosen by measurement (``training.archive --backend auto``).

Each candidate back-end (``handler/backends.py``) is first timed on one probe batch; one slower
than ``MIN_SPEED_OF_EAGER`` of eager's speed is rejected untried. The others are held to the
accuracy gate: top-1 accuracy on labelled photos the calibration never saw, against the fp32
model's, may drop by at most ``--max-accuracy-drop`` points. The survivors are then timed on
this machine at the served batch size and thread count, one after the other in this process,
and the fastest is served.
The figures, the CPU's instruction-set flags and the reason go into ``model-config.yaml``
(``handler.backend_selection``).

Why measure: the same model is fastest on different back-ends on different CPUs. DenseNet121,
224 px, batch 8, 2 threads: on an AMX CPU eager 36.7 images/s, bf16 77.6, ONNX Runtime int8
102.2; on an AVX2-only CPU bf16 ran at 0.2x eager (README "Benchmark").
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from handler.backends import (INT8_W8_FILE, ONNX_FILES, TORCH_BACKENDS, cpu_flags,
                              fastest, make_runner, measure_throughput, onnx_file)

logger = logging.getLogger(__name__)

# compile is left out by default: it compiles in every worker at load (minutes on 2 cores).
AUTO_CANDIDATES = ("eager", "bf16", "onnxruntime", "onnxruntime-int8")
# A candidate slower than this fraction of eager on a probe batch can never be the fastest here,
# and its gate would cost minutes: it is rejected untried. bf16 on an AVX2-only CPU (no
# avx512_bf16, no AMX) ran Lite0 at 160 px at 2.2 images/s against eager's 54.9: its gate on
# 386 photos alone took 3 minutes of the archive step.
MIN_SPEED_OF_EAGER = 0.25


def predictions(run, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Top-1 class index per image, int64 [N], from a ``make_runner`` function."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].contiguous()  # the handler's layout (NCHW)
            out.append(run(x).argmax(1).cpu().numpy())
    return np.concatenate(out)


def choose_backend(model: torch.nn.Module, crop_size: int, dest: Path, *,
                   labelled: Optional[tuple[torch.Tensor, torch.Tensor, np.ndarray]],
                   candidates: tuple[str, ...] = AUTO_CANDIDATES, batch_size: int = 8,
                   threads: int = 1, max_accuracy_drop: float = 1.0) -> dict:
    """Gates and times ``candidates``; writes the ONNX files they need into ``dest``.

    Args:
        model: the trained fp32 model, eval mode, CPU (not modified).
        crop_size: the model's input side, px.
        dest: folder for ``model.onnx`` and the int8 graphs (``model.int8.onnx``, 7-bit weights;
            ``model.int8-w8.onnx``, 8-bit: both gated, ``training/export.py``
            ``gate_int8_files``; timed and gated here: the one this CPU serves).
        labelled: (calibration images float32 [M, 3, H, W], check images float32 [N, 3, H, W],
            check labels int64 [N]); None when no labelled photos are at hand: then only the
            fp32 back-ends (eager, onnxruntime), which need no gate, are candidates.
        candidates: back-end names from ``handler.backends.BACKENDS``.
        batch_size: the served batch size, the batch timed.
        threads: intra-op threads of one worker (torch and ONNX Runtime).
        max_accuracy_drop: largest top-1 loss against fp32 eager, accuracy points.

    Returns:
        ``{"backend", "reason", "cpu_flags", "threads", "batch_size", "images_per_s": {name:
        images/s} (the survivors), "accuracy": {name: top-1 %} (the gated, with labelled
        photos), "rejected": {name: why}, "gpu_backends": [torch back-ends that passed the
        gate]}``, and with int8 gated ``"int8_weights"`` (``gate_int8_files``'s ``weights``) and
        ``"int8_served_here"`` (weight bits).
    """
    from training.export import (export_onnx, gate_int8_files, onnx_predictions,
                                 quantize_int8_files)

    if labelled is None:
        candidates = tuple(c for c in candidates if c in ("eager", "onnxruntime"))
        logger.info("backend auto: no labelled photos for the accuracy gate; fp32 candidates "
                    "only: %s", candidates)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runners, rejected, int8_gate = {}, {}, None
        onnx_fp32 = None
        if any(c in ONNX_FILES for c in candidates):
            onnx_fp32 = export_onnx(copy.deepcopy(model), crop_size, dest / ONNX_FILES["onnxruntime"])
        for name in candidates:
            if name == "onnxruntime-int8":
                # both weight widths, each gated; the runner reads the one this CPU serves
                files = quantize_int8_files(onnx_fp32, dest, labelled[0])
                try:
                    int8_gate = gate_int8_files(files, labelled[1], labelled[2],
                                                onnx_predictions(onnx_fp32, labelled[1]),
                                                max_accuracy_drop)
                except ValueError as exc:
                    rejected[name] = str(exc)
                    continue
            path = onnx_file(name, str(dest))
            # bf16 casts the module it is given: each torch back-end gets its own copy
            module = copy.deepcopy(model) if name not in ONNX_FILES else None
            example = torch.zeros(batch_size, 3, crop_size, crop_size)
            runners[name] = make_runner(name, module, onnx_path=path, num_threads=threads,
                                        example=example)
        accuracy = {}
        example = (labelled[1][:batch_size] if labelled is not None else
                   torch.randn(batch_size, 3, crop_size, crop_size))
        example = example.contiguous()  # as the handler passes batches: NCHW
        probe = {name: measure_throughput(run, example, min_runs=1, min_seconds=0.0)
                 for name, run in runners.items()}
        eager_probe = probe.get("eager") or measure_throughput(
            make_runner("eager", model), example, min_runs=1, min_seconds=0.0)
        for name, speed in probe.items():
            if name != "eager" and speed < MIN_SPEED_OF_EAGER * eager_probe:
                rejected[name] = (f"{speed:.1f} images/s on a probe batch against eager's "
                                  f"{eager_probe:.1f}: too slow on this CPU, not gated")
        # the reference: the fp32 model itself, never rejected
        if labelled is not None:
            _, check, labels = labelled
            for name, run in runners.items():
                if name in rejected:
                    continue
                if name == "onnxruntime-int8":  # scored by its own gate: the file the runner reads
                    accuracy[name] = int8_gate["weights"][int8_gate["served_here"]]["accuracy"]
                else:
                    accuracy[name] = round(100 * float((predictions(run, check) == labels).mean()), 2)
            reference = accuracy.get("eager")
            if reference is None:
                fp32 = predictions(make_runner("eager", model), check)
                reference = round(100 * float((fp32 == labels).mean()), 2)
            for name, acc in accuracy.items():
                if name != "eager" and reference - acc > max_accuracy_drop:
                    rejected[name] = (f"top-1 {acc} % vs fp32 {reference} %: more than "
                                      f"{max_accuracy_drop} points lost")
        passed = {name: run for name, run in runners.items() if name not in rejected}
        if not passed:  # eager was not a candidate and every other one lost accuracy
            passed = {"eager": make_runner("eager", copy.deepcopy(model))}
        chosen, speed = fastest(passed, example)
    finally:
        torch.set_num_threads(previous_threads)
    flags = cpu_flags()
    others = ", ".join(f"{n} {v}" for n, v in sorted(speed.items(), key=lambda kv: -kv[1])
                       if n != chosen)
    reason = (f"{chosen}, the fastest on this CPU ({' '.join(flags) or 'flags unknown'}): "
              f"{speed[chosen]} images/s at batch {batch_size} on {threads} threads "
              f"(others: {others or 'none'})")
    if labelled is not None:
        reason += f"; top-1 {accuracy[chosen]} % on {len(labelled[2])} held-out photos"
    selection = {"backend": chosen, "reason": reason, "cpu_flags": flags, "threads": threads,
                 "batch_size": batch_size, "images_per_s": speed, "accuracy": accuracy,
                 "rejected": rejected,
                 "gpu_backends": [n for n in TORCH_BACKENDS if n in runners and n not in rejected]
                 or ["eager"]}
    if int8_gate is not None:  # the int8 graphs' own gate: weight widths, arithmetic, kept
        selection["int8_weights"] = int8_gate["weights"]
        selection["int8_served_here"] = int8_gate["served_here"]
    logger.info("backend auto: %s (%s)", chosen, reason)
    for name, why in rejected.items():
        logger.info("backend auto: %s rejected: %s", name, why)
    reads = {name: [file] for name, file in ONNX_FILES.items()}
    reads["onnxruntime-int8"].append(INT8_W8_FILE)
    for name, files in reads.items():  # keep only the files the chosen back-end reads
        if name != chosen:
            for file in files:
                (dest / file).unlink(missing_ok=True)
    return selection
