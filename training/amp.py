"""Mixed-precision training (``--amp``): bf16 or fp16 autocast where it is faster, by measurement.

``torch.autocast`` runs the convolutions and matrix products of the forward pass (and so their
gradients) in a 16-bit type while the weights, the optimizer state and the loss stay float32.
Whether that is faster depends on the hardware and the model, so ``--amp auto`` times one
training step each way on this device and keeps autocast only when it wins by
``MIN_SPEEDUP``. Measured by it on 2 cores with AMX (Intel Xeon, ``amx_bf16``), a training step at
batch 8 (docs/training.md, "Mixed-precision training"):

* DenseNet121, 224 px: float32 0.95 s, bf16 autocast 0.49 s (1.93x): its convolutions are dense
  1x1 and 3x3 ones, the kind AMX's bf16 tiles compute. ``auto`` trains it in bf16.
* EfficientNet-Lite0, 160 px, ``--train-last 7``, frozen batch-norm statistics: float32 0.13 s,
  bf16 0.22 s (0.57x): its depthwise convolutions and the casts around them gain nothing.
  ``auto`` keeps float32.

Without bf16 instructions (no ``avx512_bf16``/``amx_bf16``) bf16 is emulated and the serving
back-end ran at 0.2x fp32 (``training/backend_choice.py``): ``auto`` does not try it there. On a
GPU ``auto`` times bf16 where the GPU supports it, else fp16 with a ``GradScaler`` (fp16's
narrow exponent needs the loss scaled so that small gradients do not flush to zero; torchvision's
references/classification/train.py ``--amp`` does the same).

The type chosen for the training step is also the one ``--head-from-features`` extracts its
features in (``training/features.py``; the cache keys them by it). Evaluation, WiSE-FT and
test-time augmentation stay in float32: the checkpoint is float32 and is served by the
archive's own back-end choice.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

import torch
from torch import nn

from handler.backends import cpu_flags

logger = logging.getLogger(__name__)

AMP_CHOICES = ("none", "bf16", "fp16", "auto")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
# CPU flags (/proc/cpuinfo) of native bf16 arithmetic: AVX-512 BF16 dot products, AMX tiles.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# Autocast changes the numerics; ``auto`` takes it only for a clear gain over the machine's noise.
MIN_SPEEDUP = 1.1


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """The context a training forward pass runs in: ``torch.autocast`` to ``dtype``, or nothing
    (``dtype`` None: float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: Optional[torch.dtype]):
    """A ``torch.amp.GradScaler`` for fp16 autocast, else None (bf16 has float32's exponent
    range and needs no loss scaling)."""
    return torch.amp.GradScaler(device.type) if dtype is torch.float16 else None


def candidate_dtypes(device: torch.device, flags: Optional[list[str]] = None) -> list[torch.dtype]:
    """The autocast types ``auto`` times next to float32 on ``device``.

    Args:
        device: the training device.
        flags: ``handler.backends.cpu_flags()`` (default: this CPU's); used on CPU only.

    Returns:
        ``[torch.bfloat16]`` on a CPU with ``BF16_CPU_FLAGS`` or a GPU that supports bf16,
        ``[torch.float16]`` on an older GPU, else ``[]``.
    """
    if device.type == "cuda":
        return [torch.bfloat16] if torch.cuda.is_bf16_supported() else [torch.float16]
    if device.type != "cpu":
        return []
    flags = cpu_flags() if flags is None else flags
    return [torch.bfloat16] if any(f in flags for f in BF16_CPU_FLAGS) else []


def step_seconds(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion,
                 dtypes: list[Optional[torch.dtype]], rounds: int = 3) -> list[float]:
    """Median seconds of one training step's forward and backward pass for each of ``dtypes``.

    Each type runs once untimed first (the first passes of a model pay for allocations and
    oneDNN's kernel set-up: 267 ms against 145 ms for Lite0 at batch 8), then the types take
    turns for ``rounds`` timed passes, so that a drift of the machine falls on all of them.

    The model is left as it was: no optimizer step, the gradients cleared, and every buffer
    (batch-norm running statistics, which a train-mode forward updates) restored.

    Args:
        model: in the mode training uses (``train()``, frozen norms as set).
        images: float32 [B, 3, H, W] on the model's device.
        targets: int64 [B].
        criterion: the training loss.
        dtypes: autocast types, None for float32.
        rounds: timed passes per type.

    Returns:
        seconds per pass, one per ``dtypes`` entry.
    """
    device = images.device
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}

    def once(dtype) -> float:
        start = time.perf_counter()
        with autocast(device, dtype):
            logits = model(images)
        criterion(logits.float(), targets).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    times = [[] for _ in dtypes]
    try:
        for dtype in dtypes:
            once(dtype)
        for _ in range(rounds):
            for i, dtype in enumerate(dtypes):
                times[i].append(once(dtype))
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])
    return [sorted(t)[len(t) // 2] for t in times]


def check_mode(mode: str, device: torch.device) -> None:
    """Raises ValueError for an unknown ``--amp`` mode, or ``fp16`` off CUDA (no fp16 autocast
    training kernels worth having on a CPU; use bf16)."""
    if mode not in AMP_CHOICES:
        raise ValueError(f"--amp {mode!r}: choose one of {', '.join(AMP_CHOICES)}")
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; on a CPU use --amp bf16")


def choose_amp(mode: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
               criterion, flags: Optional[list[str]] = None) -> tuple[Optional[torch.dtype], dict]:
    """The autocast type training uses for ``--amp mode``.

    Args:
        mode: one of ``AMP_CHOICES``; ``bf16``/``fp16`` are taken as given, ``auto`` is measured
            (``step_seconds`` for float32 and each of ``candidate_dtypes``; the fastest wins if
            it beats float32 by ``MIN_SPEEDUP``).
        model, images, targets, criterion: as ``step_seconds`` (only ``auto`` runs them).
        flags: as ``candidate_dtypes``.

    Returns:
        (the dtype or None for float32, a record for the checkpoint and the log: ``{"mode",
        "chosen": "none" | "bf16" | "fp16", "reason", "step_s": {name: seconds}}``; ``step_s``
        only with ``auto`` on hardware with a candidate).

    Raises:
        ValueError: see ``check_mode``.
    """
    device = images.device
    check_mode(mode, device)
    if mode == "none":
        return None, {"mode": mode, "chosen": "none", "reason": "--amp none"}
    if mode in DTYPES:
        return DTYPES[mode], {"mode": mode, "chosen": mode, "reason": f"--amp {mode}"}
    candidates = candidate_dtypes(device, flags)
    if not candidates:
        return None, {"mode": mode, "chosen": "none",
                      "reason": f"no native 16-bit arithmetic on {device.type} "
                                f"(CPU needs one of {', '.join(BF16_CPU_FLAGS)})"}
    timed = step_seconds(model, images, targets, criterion, [None, *candidates])
    seconds = dict(zip(["none", *(NAMES[dtype] for dtype in candidates)], timed))
    best = min(seconds, key=seconds.get)
    speedup = seconds["none"] / seconds[best]
    chosen = best if best != "none" and speedup >= MIN_SPEEDUP else "none"
    figures = ", ".join(f"{name} {s * 1000:.0f} ms" for name, s in seconds.items())
    reason = (f"{chosen} autocast is {speedup:.2f}x float32 per training step ({figures})"
              if chosen != "none" else
              f"float32: no autocast type is {MIN_SPEEDUP}x faster per training step ({figures})")
    record = {"mode": mode, "chosen": chosen, "reason": reason,
              "step_s": {name: round(s, 4) for name, s in seconds.items()}}
    return DTYPES.get(chosen), record
