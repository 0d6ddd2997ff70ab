"""Inference back-ends: one callable, float32 images [N, 3, H, W] in, float32 logits [N, C] out.

The handler passes contiguous NCHW batches (``EvalTransform.normalize``), the layout ONNX
Runtime reads without a copy; the torch modules hold channels_last weights, and their first
convolution takes the input to channels_last (``compile`` converts it before the call).

Selected by ``handler.backend`` in the archive's ``model-config.yaml`` (``training/archive.py
--backend``). Figures for DenseNet121 on a 2-core AVX2 CPU are in the README's "Benchmark".

  * ``eager``: the fp32 ``nn.Module``, channels_last (the reference).
  * ``bf16``: the module cast to bfloat16; logits cast back to float32. Fast where the CPU
    has AVX-512 BF16/AMX or on a GPU; on an AVX2-only CPU it is slower than fp32.
  * ``compile``: ``torch.compile`` (inductor, weight freezing), compiled in ``initialize``
    for two static shapes, batch 1 and the largest batch; batches in between are padded
    to the largest (a dynamic batch dimension took over 10 minutes to compile DenseNet121
    on 2 cores, two static shapes about 2 minutes).
  * ``onnxruntime``: ``model.onnx`` (fp32, exported by the archive step) in ONNX Runtime.
  * ``onnxruntime-int8``: ``model.int8.onnx`` (7-bit weights) or, on a CPU with VNNI,
    ``model.int8-w8.onnx`` (8-bit; ``onnx_file``), the same graph after ONNX Runtime static
    post-training quantization (QDQ, per-channel int8 weights, uint8 activations calibrated
    on training images; pre-activation batch norms as depthwise convs and one range per
    concat chain, so that the whole network runs in ONNX Runtime's integer NHWC kernels;
    ``training/export.py``).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("eager", "bf16", "compile", "onnxruntime", "onnxruntime-int8")
# Archive file each ONNX Runtime back-end reads (written by training/export.py).
ONNX_FILES = {"onnxruntime": "model.onnx", "onnxruntime-int8": "model.int8.onnx"}
# The int8 graph with full-range (8-bit) weights, next to the 7-bit ``model.int8.onnx``: a
# worker whose CPU has VNNI reads it (``int8_weight_bits``; ``training/export.py``
# ``quantize_int8`` says why there are two).
INT8_W8_FILE = "model.int8-w8.onnx"
# /proc/cpuinfo flags that decide which back-end is fast (and which int8 weights are exact).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
             "amx_bf16", "amx_int8")
# x86 int8 dot-product instructions that accumulate u8 x s8 products in 32 bits (Intel's
# "Vector Neural Network Instructions": VPDPBUSD in AVX-512 and in AVX, and AMX's TDPBUSD).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

Runner = Callable[[torch.Tensor], torch.Tensor]


def make_runner(backend: str, model: Optional[torch.nn.Module], *, onnx_path: Optional[str] = None,
                device: torch.device = torch.device("cpu"), num_threads: int = 0,
                example: Optional[torch.Tensor] = None) -> Runner:
    """Builds the forward function of ``backend``.

    Args:
        backend: one of ``BACKENDS``.
        model: the fp32 model in eval mode on ``device`` (unused by the ONNX Runtime back-ends).
        onnx_path: the ``.onnx`` file for the ONNX Runtime back-ends.
        device: where inputs arrive and where logits are returned.
        num_threads: intra-op threads for ONNX Runtime (0: its default, one per core).
        example: float32 [B, 3, H, W], the largest batch served; ``compile`` compiles for
            its shape and for its first row's. Required for ``compile``.

    Returns:
        ``run(images float32 [N, 3, H, W] on device) -> logits float32 [N, C] on device``;
        callers wrap it in ``torch.inference_mode()``.

    Raises:
        ValueError: unknown back-end or missing argument.
        ImportError: ``onnxruntime`` not installed (ONNX Runtime back-ends only).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ONNX_FILES:
        if not onnx_path:
            raise ValueError(f"backend {backend} needs the archive's {ONNX_FILES[backend]}")
        return _onnxruntime_runner(onnx_path, device, num_threads)
    if model is None:
        raise ValueError(f"backend {backend} needs the torch model")
    if backend == "eager":
        return model
    if backend == "bf16":
        bf16 = model.to(torch.bfloat16)
        return lambda x: bf16(x.to(torch.bfloat16)).float()
    if example is None:
        raise ValueError("backend compile needs an example batch")
    return _compiled_runner(model, example)


def _compiled_runner(model: torch.nn.Module, example: torch.Tensor) -> Runner:
    import torch._inductor.config as inductor_config

    # Freezing folds the (inference-only) weights into the graph: conv+bn fusion, prepacked
    # oneDNN weights. PyTorch's recommended CPU inference setting.
    inductor_config.freezing = True
    compiled = torch.compile(model, dynamic=False)
    full = example.shape[0]
    # Always channels_last (the weights' layout): the compiled graph is guarded on the input's
    # strides, and a batch in another layout would compile again, in a request.
    example = example.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        compiled(example[:1])
        compiled(example)

    def run(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n > full:
            raise ValueError(f"batch of {n} > the compiled batch {full}")
        if n not in (1, full):
            x = torch.cat([x, x[-1:].expand(full - n, *x.shape[1:])])
        return compiled(x.contiguous(memory_format=torch.channels_last))[:n]
    return run


# Back-ends a worker on a CUDA device may use: the ONNX Runtime graphs here are CPU graphs
# (int8 QDQ, ORT's CPU kernels), so on a GPU the choice is among the torch ones.
TORCH_BACKENDS = ("eager", "bf16")


def cpu_flags() -> list[str]:
    """The ``CPU_FLAGS`` this machine has (from ``/proc/cpuinfo``; [] where it is unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in CPU_FLAGS if flag in have]
    except OSError:
        pass
    return []


def int8_weight_bits(flags: Optional[list[str]] = None) -> int:
    """The int8 weights whose integer arithmetic is exact on this CPU: 8 with VNNI, else 7.

    ONNX Runtime's x86 u8 x s8 kernels without VNNI add pairs of products in int16
    (``vpmaddubsw``), which saturates with 8-bit weights (255 * 127 * 2 > 32767); VNNI
    accumulates in int32. Other CPUs (no x86 flags readable, e.g. ARM) get the 7-bit weights,
    which are exact everywhere.

    Args:
        flags: ``cpu_flags()`` of the CPU in question (default: this one).
    """
    flags = cpu_flags() if flags is None else flags
    return 8 if any(f in flags for f in VNNI_FLAGS) else 7


def onnx_file(backend: str, model_dir: str, flags: Optional[list[str]] = None) -> Optional[str]:
    """The ONNX file ``backend`` reads from an archive's ``model_dir``; None for torch ones.

    ``onnxruntime-int8`` reads ``INT8_W8_FILE`` where the archive has it and the CPU has VNNI
    (``int8_weight_bits``), else ``model.int8.onnx``.
    """
    import os

    if backend not in ONNX_FILES:
        return None
    if backend == "onnxruntime-int8" and int8_weight_bits(flags) == 8:
        full = os.path.join(model_dir, INT8_W8_FILE)
        if os.path.exists(full):
            return full
    return os.path.join(model_dir, ONNX_FILES[backend])


def default_threads(num_threads: int, max_workers: int) -> int:
    """Intra-op threads of one worker: ``num_threads`` when > 0, else this process's CPUs
    divided by ``max_workers`` (at least 1), so that the workers don't oversubscribe the cores.
    The handler and the archive's back-end timing (``training/backend_choice.py``) both use it."""
    import os

    if num_threads > 0:
        return num_threads
    return max(1, len(os.sched_getaffinity(0)) // max(max_workers, 1))


def torch_threads(backend: str, threads: int, device: torch.device = torch.device("cpu")) -> int:
    """PyTorch's intra-op threads in a worker that runs ``backend`` with ``threads`` threads:
    ``threads`` for a torch back-end, 1 for an ONNX Runtime one on the CPU.

    Why: with ONNX Runtime torch only preprocesses (stack, normalize, softmax), and after each
    parallel region its OpenMP (libgomp) threads spin-wait before sleeping, on the cores ONNX
    Runtime's own threads are about to use. Measured normalize + forward, 5 ms idle before each
    run as between served requests (2 cores, Intel Xeon with AMX; alternating rounds, medians):
    int8 DenseNet121 at 224 px, batch 1, 14.81 ms with torch on 2 threads against 13.55 on 1;
    int8 Lite0 at 160 px, batch 8, 11.90 against 10.59 ms (normalize alone costs 0.25 ms more on
    one thread there). Batch 8 of DenseNet121 and batch 1 of Lite0 tie. docs/performance.md
    "torch's threads beside ONNX Runtime".
    """
    return 1 if backend in ONNX_FILES and device.type == "cpu" else threads


def measure_throughput(run: Runner, example: torch.Tensor, *, min_runs: int = 5,
                       min_seconds: float = 1.0) -> float:
    """Images per second of ``run`` on ``example``: the median of timed runs.

    Two untimed runs first (first-call allocations, oneDNN/cuDNN kernel choice), then at least
    ``min_runs`` runs and ``min_seconds`` of them. CUDA work is synchronized per run.

    Args:
        run: a ``make_runner`` function.
        example: float32 [B, 3, H, W] on the runner's device, in the layout the handler passes
            (contiguous NCHW); B is the served batch size.

    Returns:
        ``B / median seconds per run``, images/s.
    """
    import time

    def once() -> float:
        start = time.perf_counter()
        run(example)
        if example.is_cuda:
            torch.cuda.synchronize(example.device)
        return time.perf_counter() - start

    with torch.inference_mode():
        once(), once()
        times, begin = [], time.perf_counter()
        while len(times) < min_runs or time.perf_counter() - begin < min_seconds:
            times.append(once())
    times.sort()
    return example.shape[0] / times[len(times) // 2]


def fastest(runners: dict[str, Runner], example: torch.Tensor, **kwargs
            ) -> tuple[str, dict[str, float]]:
    """Times each runner with ``measure_throughput`` (one after the other, same input).

    Returns:
        (the name with the most images/s, ``{name: images/s}`` rounded to 0.1).
    """
    figures = {name: round(measure_throughput(run, example, **kwargs), 1)
               for name, run in runners.items()}
    return max(figures, key=figures.get), figures


# glibc mallopt(3) parameters, from <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def retain_heap(megabytes: int) -> bool:
    """Makes glibc keep freed CPU memory for the next forward pass instead of returning it.

    By default glibc serves each large block (a batch's activations: up to 26 MB per tensor
    for DenseNet121 at batch 8 and 224 px, 103 MB for VGG16) with fresh ``mmap`` pages and
    unmaps it when freed, so every forward pass faults in and zeroes its working set again.
    Measured per batch of 8 at 224 px on 2 threads (``ru_minflt``, ``ru_stime``;
    ``scripts/bench_heap.py``): DenseNet121 20-35k minor page faults and 46-86 ms of system
    time, VGG16 88-120k and 210-373 ms.
    This sets ``M_MMAP_MAX`` to 0 (blocks come from the heap, whatever their size) and
    ``M_TRIM_THRESHOLD`` to ``megabytes`` (free heap kept before glibc trims it): both
    models then run at 0 faults once the heap has settled (a few batches). The price: the
    worker keeps its peak heap resident (it reaches that peak anyway on every batch). The same
    problem is why PyTorch's CPU performance guide suggests preloading jemalloc or tcmalloc;
    this needs no extra library.

    Only main-thread allocations are affected (glibc's other arenas fall back to ``mmap`` for
    blocks larger than their 64 MiB heaps); PyTorch allocates operator outputs in the calling
    thread.

    Args:
        megabytes: free heap (MiB, at most 2047) kept before trimming; 0 or less changes
            nothing.

    Returns:
        True when applied; False when ``megabytes`` <= 0 or the C library is not glibc.
    """
    if megabytes <= 0:
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)
                    and libc.mallopt(_M_TRIM_THRESHOLD, min(megabytes, 2047) << 20))
    except (OSError, AttributeError):
        return False


# The workers' bound on ONNX Runtime's spin-wait, microseconds. Measured on 2 cores (AMX Xeon),
# one worker x 2 threads, alternating served runs (docs/performance.md "A 20 us spin"): int8
# DenseNet121 at 224 px answered a lone client in 13.1-14.2 ms at p50 against 17.0-17.9 without
# spinning and peaked at 90.2-92.5 images/s against 85.5-87.5; int8 Lite0 at 160 px 4.8-5.0
# against 5.5-5.6 ms, peak 372-400 against 350-373. 10-50 us did as well; 5 us less well.
WORKER_SPIN_US = 20


def onnxruntime_session_options(num_threads: int, spin_us: Optional[int] = WORKER_SPIN_US):
    """The workers' ``onnxruntime.SessionOptions``: ``num_threads`` intra-op threads (0: ONNX
    Runtime's default), one inter-op thread, every graph optimization, and a bounded spin.

    Args:
        num_threads: intra-op threads.
        spin_us: how long an intra-op thread busy-waits for its next parallel section before it
            sleeps, microseconds (``session.intra_op.spin_duration_us``, ONNX Runtime >= 1.17).
            ``WORKER_SPIN_US`` (the workers'); 0 sets ``session.intra_op.allow_spinning`` 0
            (never spin); None leaves ONNX Runtime's default spin (``scripts/bench_idle.py``
            compares them).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(num_threads, 0)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Why bounded: between the graph's parallel sections a sleeping thread is woken through the
    # kernel (int8 DenseNet121 at batch 1: 12.83 ms back to back without spinning, 10.16 with a
    # 20 us spin), and after the run a short spin gives the cores back to the worker's decoding
    # and to the frontend. ONNX Runtime's default spin kept a core busy between runs: served peak
    # 118.0 and 117.6 images/s against 137.8 and 162.1 without spinning (AVX2 VM, Lite0 int8, 8
    # images per request). Bounded spins of 50 and 100 us served no better while torch's own
    # threads still spun on both cores (before torch_threads); since then 20 us pays.
    if spin_us == 0:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spin_us is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
    return options


def _onnxruntime_runner(path: str, device: torch.device, num_threads: int) -> Runner:
    import onnxruntime as ort

    options = onnxruntime_session_options(num_threads)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        else:
            logger.warning("onnxruntime has no CUDA provider here: running on CPU")
    session = ort.InferenceSession(path, options, providers=providers)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        logits = session.run(None, {name: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(logits).to(device)
    run.session = session  # for inspection (its options, providers)
    return run
