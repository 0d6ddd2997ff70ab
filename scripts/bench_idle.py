"""ONNX Runtime's forward after an idle gap, by thread count and spinning, A/B in one process.

    python -m scripts.bench_idle model_store/NAME.mar [--crop-size 160] [--runs 60] \\
        [--gaps-ms 0 2 20] [--spin-us 20 100]

A served request at concurrency 1 reaches a worker that has been idle since the last answer;
the in-process "batch-1 forward" is usually timed back to back. This prints, per setting, the
median wall ms of ``--runs`` batch-1 forward passes after each idle gap (``time.sleep``), the
process's CPU seconds per second spent in ``run`` (at most the thread count while the threads
sleep through the gaps; far more when one spins through them), and batch-8 images/s back to back.

Settings: 1 thread; 2 threads without spinning; 2 threads with ONNX Runtime's default spinning;
2 threads spinning at most each ``--spin-us`` (``session.intra_op.spin_duration_us``, ONNX
Runtime >= 1.17; the workers' bound, ``handler.backends.WORKER_SPIN_US``, is marked). The graph
is the archive's ONNX file this CPU serves (``handler.backends.onnx_file``); input random (speed
only). Figures only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from handler.backends import WORKER_SPIN_US, onnx_file, onnxruntime_session_options


def session(path: str, threads: int, spin_us: int | None):
    """An ONNX Runtime CPU session with the workers' options
    (``handler.backends.onnxruntime_session_options``) but for the spinning setting."""
    import onnxruntime as ort

    return ort.InferenceSession(path, onnxruntime_session_options(threads, spin_us),
                                providers=["CPUExecutionProvider"])


def measure(sess, crop: int, runs: int, gaps_ms: list[float]) -> dict:
    """``{"gap_ms": {gap: (median ms, CPU s per busy s)}, "batch8_images_per_s": float}``."""
    name = sess.get_inputs()[0].name
    one = np.random.rand(1, 3, crop, crop).astype(np.float32)
    eight = np.random.rand(8, 3, crop, crop).astype(np.float32)
    for _ in range(20):
        sess.run(None, {name: one})
    out = {"gap_ms": {}}
    for gap in gaps_ms:
        times, cpu0 = [], time.process_time()
        for _ in range(runs):
            if gap:
                time.sleep(gap / 1000)
            start = time.perf_counter()
            sess.run(None, {name: one})
            times.append(time.perf_counter() - start)
        cpu = time.process_time() - cpu0
        out["gap_ms"][gap] = (statistics.median(times) * 1000, cpu / sum(times))
    start = time.perf_counter()
    for _ in range(30):
        sess.run(None, {name: eight})
    out["batch8_images_per_s"] = 30 * 8 / (time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    """Prints one line per setting; returns ``[{"setting", "file", **measure(...)}]``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archive", type=Path, help="a .mar with an ONNX graph (onnxruntime back-ends)")
    p.add_argument("--backend", default="onnxruntime-int8", choices=["onnxruntime", "onnxruntime-int8"])
    p.add_argument("--crop-size", type=int, default=160, help="input px (the archive's crop)")
    p.add_argument("--runs", type=int, default=60)
    p.add_argument("--gaps-ms", type=float, nargs="+", default=[0, 2, 20])
    p.add_argument("--spin-us", type=int, nargs="*", default=[20, 100])
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.archive) as z:
            z.extractall(tmp)
        path = onnx_file(args.backend, tmp)
        settings = [("1 thread", 1, 0), ("2 threads, no spinning", 2, 0),
                    ("2 threads, default spinning", 2, None)]
        settings += [(f"2 threads, spin <= {us} us" + (" (workers')" if us == WORKER_SPIN_US else ""),
                      2, us) for us in args.spin_us if us > 0]
        print(f"{Path(path).name}, batch 1 at {args.crop_size} px: median ms (CPU s per busy s) "
              f"after each idle gap; batch 8 images/s back to back")
        for label, threads, spin_us in settings:
            r = measure(session(path, threads, spin_us), args.crop_size, args.runs, args.gaps_ms)
            rows.append({"setting": label, "file": Path(path).name, **r})
            gaps = ", ".join(f"{g:g} ms idle: {ms:.2f} ({cpu:.2f})" for g, (ms, cpu) in r["gap_ms"].items())
            print(f"{label:40s} {gaps}; batch 8: {r['batch8_images_per_s']:.0f} images/s")
    return rows


if __name__ == "__main__":
    main()
