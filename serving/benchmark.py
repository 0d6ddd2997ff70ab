"""Throughput and latency of the served model against its in-process limit and the stock handler.

    python -m scripts.benchmark --checkpoint runs/intel-scenes/checkpoint_best.pt \\
        [--images ../shared/data/intel-scenes/test] [--concurrency 1 2 4 8 16 32] [--requests 400] \\
        [--backends eager onnxruntime onnxruntime-int8 bf16] [--serve eager onnxruntime-int8] \\
        [--crop-size 224 --resize-size 256] [--stock]

For each back-end in ``--backends`` (``handler/backends.py``) the archive step builds a model
archive (``training/archive.py --backend``; ONNX export and int8 calibration happen there), and:
  1. in-process limit: the archive's runner on already preprocessed tensors at batch 1 and at
     ``--batch-size``, ``--threads`` intra-op threads, no server, with the worker's heap setting
     (``--retain-heap-mb``, applied to this process too); with ``--workers`` N > 1, N such
     runners in N processes at once, their images/s summed (the layout the server runs, so
     served / limit compares serving with the same cores' work); plus its warm-up cost (runner
     construction + first calls) and its top-1 accuracy on ``--accuracy-dir`` (skipped when
     ``--crop-size`` serves at another resolution than the model was trained at);
  2. next to each served back-end's sweep, the limit again and, with one worker, the in-process
     pipeline: the handler's decode, resize, crop and normalize before the same forward
     (``pipeline_limit``), so that served / pipeline isolates what the server itself costs.
Then one real TorchServe serves the ``--serve`` archives (our handler, batchSize
``--batch-size``, maxBatchDelay ``--max-batch-delay``, ``--workers`` x ``--threads``) and, with
``--stock``, TorchServe's stock ``image_classifier`` handler on the same weights with default
settings (batchSize 1, one worker per core, Resize 256 / CenterCrop 224). Each is swept over
``--concurrency``: real photos sent as raw bodies over loopback HTTP; per point throughput
(images/s), p50/p90/p99 latency (ms), errors and mean queue time (ms, TorchServe's
``ts_queue_latency_microseconds``).

Writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` (``latency_throughput_figure``:
p50 and p99 against throughput, one curve per sweep, each served back-end's in-process limit and
pipeline marked) to ``--output-dir`` and prints the ratios:
served eager peak / eager in-process limit, default back-end / stock at concurrency 8 (with both
p99s), best back-end limit / eager limit, and p50 at concurrency 1 against the batch-1 forward
time. Bounded (a fixed request count per point), loopback only. Figures only: nothing is asserted.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from handler.backends import ONNX_FILES, make_runner, onnx_file, retain_heap, torch_threads
from serving.inference import list_images
from serving.load import sweep_point
from serving.server import TorchServe, server_overrides
from serving.stock import STOCK, build_stock_archive
from training import archive
from training.data import image_folder
from training.predict import load_classifier

DEFAULT_BACKEND = "onnxruntime-int8"  # the back-end the archive's auto choice picks on these CPUs


def timed_runner(backend: str, checkpoint: Path, model_dir: Path, threads: int, batch: torch.Tensor):
    """(runner, warm-up seconds): the handler's runner built from the archive's files, and
    torch's threads set as the worker sets them (``handler.backends.torch_threads``)."""
    torch.set_num_threads(torch_threads(backend, threads))
    start = time.perf_counter()
    model = None
    if backend not in ONNX_FILES:
        model, _, _ = load_classifier(checkpoint, torch.device("cpu"))
    runner = make_runner(backend, model, onnx_path=onnx_file(backend, str(model_dir)),
                         num_threads=threads, example=batch)
    with torch.inference_mode():
        runner(batch[:1])
        runner(batch)
    return runner, round(time.perf_counter() - start, 2)


def in_process_limit(runner, batch: torch.Tensor, seconds: float) -> dict:
    """Forward-pass throughput (images/s) and ms per batch at batch 1 and ``len(batch)``."""
    out = {}
    for bs in sorted({1, len(batch)}):
        x = batch[:bs]
        with torch.inference_mode():
            runner(x)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                runner(x)
                n += 1
            elapsed = time.perf_counter() - start
        out[bs] = {"images_per_s": round(n * bs / elapsed, 2), "ms_per_batch": round(1000 * elapsed / n, 2)}
    return out


def pipeline_limit(runner, transform, images: list[bytes], batch_size: int, seconds: float) -> dict:
    """The worker's work per batch without the server: each image decoded, resized and cropped
    (``EvalTransform.load_pixels``, as the handler's ``preprocess`` does), the batch stacked,
    normalized, run and softmaxed, ``batch_size`` images at a time cycling through ``images``
    (encoded bytes). Served / this figure is the share the frontend, the worker protocol and the
    load generator leave; served / ``in_process_limit`` also charges the preprocessing.

    Returns:
        ``{"images_per_s", "ms_per_batch"}`` (wall time, this process's intra-op threads).
    """
    def one(i: int) -> None:
        pixels = torch.stack([transform.load_pixels(images[(i * batch_size + j) % len(images)])
                              for j in range(batch_size)])
        runner(transform.normalize(pixels)).float().softmax(dim=1)
    with torch.inference_mode():
        one(0)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            n += 1
            one(n)
        elapsed = time.perf_counter() - start
    return {"images_per_s": round(n * batch_size / elapsed, 2),
            "ms_per_batch": round(1000 * elapsed / n, 2)}


def _limit_process(backend: str, checkpoint: str, model_dir: str, threads: int, batch_path: str,
                   seconds: float, retain_heap_mb: int, start, results) -> None:
    """One of ``parallel_limit``'s runners (a spawned process): build, wait for the others, time."""
    retain_heap(retain_heap_mb)
    batch = torch.load(batch_path, weights_only=True).contiguous()
    runner, _ = timed_runner(backend, Path(checkpoint), Path(model_dir), threads, batch)
    start.wait()
    results.put(in_process_limit(runner, batch, seconds))


def parallel_limit(backend: str, checkpoint: Path, model_dir: Path, threads: int,
                   batch: torch.Tensor, seconds: float, workers: int, retain_heap_mb: int,
                   timeout_s: float = 300.0) -> dict:
    """The in-process limit of ``workers`` runners at once, one process each (as TorchServe
    runs its workers), each with ``threads`` intra-op threads.

    The processes build their runners, start together (a barrier) and time as
    ``in_process_limit`` does. Returns its dict with images/s summed over the runners and
    ms per batch averaged, plus ``"runners"``: each runner's own dict.

    Raises:
        RuntimeError: a runner process exited with an error, or all had not reported within
            ``timeout_s``.
    """
    ctx = multiprocessing.get_context("spawn")  # fresh processes: thread pools do not survive fork
    start, results = ctx.Barrier(workers), ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        batch_path = str(Path(tmp) / "batch.pt")
        torch.save(batch.contiguous(), batch_path)
        procs = [ctx.Process(target=_limit_process, daemon=True,
                             args=(backend, str(checkpoint), str(model_dir), threads, batch_path,
                                   seconds, retain_heap_mb, start, results))
                 for _ in range(workers)]
        for proc in procs:
            proc.start()
        runs, deadline = [], time.monotonic() + timeout_s
        try:
            while len(runs) < workers:
                try:
                    runs.append(results.get(timeout=1.0))
                except queue.Empty:
                    codes = [proc.exitcode for proc in procs]
                    if any(code not in (None, 0) for code in codes) or time.monotonic() > deadline:
                        raise RuntimeError(f"a {backend} limit process failed or timed out "
                                           f"(exit codes {codes})") from None
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
    out = {bs: {"images_per_s": round(sum(r[bs]["images_per_s"] for r in runs), 2),
                "ms_per_batch": round(sum(r[bs]["ms_per_batch"] for r in runs) / len(runs), 2)}
           for bs in runs[0]}
    out["runners"] = runs
    return out


def accuracy(runner, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy in percent of ``runner`` on preprocessed ``images``."""
    with torch.inference_mode():
        preds = torch.cat([runner(images[i:i + batch_size].contiguous())
                           .argmax(1) for i in range(0, len(images), batch_size)])
    return round(100 * (preds == labels).float().mean().item(), 2)


def to_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"Model `{cfg['arch']}` {cfg['crop_size']} px ({cfg['images']} photos cycled), "
             f"batchSize {cfg['batch_size']}, maxBatchDelay {cfg['max_batch_delay']} ms, "
             f"{cfg['workers']} worker(s) x {cfg['threads']} threads, "
             f"{cfg.get('images_per_request', 1)} image(s) per request to ours. Stock: image_classifier, "
             "TorchServe defaults.", "",
             f"| back-end | batch 1 images/s (ms) | batch {cfg['batch_size']} images/s (ms) "
             "| vs eager | warm-up s | archive s | top-1 % |", "|---|---|---|---|---|---|---|"]
    if cfg["workers"] > 1:
        lines[1:1] = [f"In-process limits: {cfg['workers']} runners at once, one process each, "
                      "images/s summed.", ""]
    eager = result["backends"].get("eager", {}).get("limit", {}).get(str(cfg["batch_size"]))
    for name, b in result["backends"].items():
        one, full = b["limit"]["1"], b["limit"][str(cfg["batch_size"])]
        vs = f"{full['images_per_s'] / eager['images_per_s']:.2f}x" if eager else "-"
        lines.append(f"| {name} | {one['images_per_s']} ({one['ms_per_batch']}) | {full['images_per_s']} "
                     f"({full['ms_per_batch']}) | {vs} | {b['warmup_s']} | {b['archive_s']} "
                     f"| {b.get('accuracy', 'n/a')} |")
    for label, sweep in result["sweeps"].items():
        lines += ["", f"Served: `{label}`"]
        again = result["backends"].get(label.removeprefix("ours:"), {}).get("limit_at_sweep")
        if again:
            lines.append(f"(in-process next to this sweep, {cfg['workers']} runner(s) x "
                         f"{cfg['threads']} threads: batch 1 {again['1']['images_per_s']} images/s "
                         f"({again['1']['ms_per_batch']} ms), batch {cfg['batch_size']} "
                         f"{again[str(cfg['batch_size'])]['images_per_s']} images/s"
                         + (f"; with decode and preprocessing (pipeline) {again['pipeline']['images_per_s']}"
                            " images/s" if "pipeline" in again else "") + ")")
        lines += ["", "| concurrency | images/s | p50 ms | p90 ms | p99 ms | queue ms | errors "
                  "| preprocess ms/image | inference ms/batch | images/batch | model busy % "
                  "| client CPU ms/request |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {p['concurrency']} | {p['images_per_s']} | {p['p50_ms']} | {p['p90_ms']} | {p['p99_ms']} "
                  f"| {p['queue_ms_mean']} | {p['errors']} | {p.get('preprocess_ms_mean', '-')} "
                  f"| {p.get('inference_ms_per_batch', '-')} | {p.get('images_per_batch', '-')} "
                  f"| {round(100 * p['model_busy'], 1) if 'model_busy' in p else '-'} "
                  f"| {p['client_cpu_ms_per_request']} |" for p in sweep]
    lines += ["", "Ratios:"] + [f"- {k}: {v}" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"


def ratios(result: dict, batch_size: int) -> dict:
    """The goals' figures, computed from one run's numbers."""
    out, bs = {}, str(batch_size)
    limits, sweeps = result["backends"], result["sweeps"]

    def at(label, c):
        return next((p for p in sweeps.get(label, []) if p["concurrency"] == c), None)
    for label, sweep in sweeps.items():
        backend = label.split(":", 1)[-1]
        if backend in limits:
            limit = limits[backend].get("limit_at_sweep", limits[backend]["limit"])
            peak = max(p["images_per_s"] for p in sweep)
            out[f"{label} peak / in-process limit"] = round(peak / limit[bs]["images_per_s"], 2)
            if "pipeline" in limit:
                out[f"{label} peak / in-process pipeline (decode, preprocess, forward)"] = round(
                    peak / limit["pipeline"]["images_per_s"], 2)
            c1 = at(label, 1)
            if c1:
                out[f"{label} p50 at concurrency 1 - batch-1 forward (ms)"] = round(
                    c1["p50_ms"] - limit["1"]["ms_per_batch"], 1)
    for label in sweeps:
        ours, stock = at(label, 8), at(STOCK, 8)
        if label != STOCK and ours and stock:
            out[f"{label} / stock at concurrency 8"] = round(ours["images_per_s"] / stock["images_per_s"], 2)
            out[f"{label} p99 / stock p99 at concurrency 8"] = round(ours["p99_ms"] / stock["p99_ms"], 2)
    if "eager" in limits:
        base = limits["eager"]["limit"][bs]["images_per_s"]
        for name, b in limits.items():
            if name != "eager":
                out[f"{name} in-process / eager in-process (batch {bs})"] = round(b["limit"][bs]["images_per_s"] / base, 2)
    return out


def latency_throughput_figure(result: dict):
    """Latency against throughput, the serving trade-off in one picture (a matplotlib Figure).

    One colour per sweep (``result["sweeps"]``): p50 latency (solid, markers labelled with the
    concurrency) and p99 (dashed) against images/s, latency on a log axis in ms. For a served
    back-end with a limit measured next to its sweep, vertical lines mark the in-process limit at
    the served batch size (dotted) and the in-process pipeline (dash-dot, decode and preprocessing
    included): how far the curve's right end is from them is served / limit and served / pipeline.

    Args:
        result: ``run``'s result (or ``benchmark.json`` loaded).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = result.get("config", {})
    batch = str(config.get("batch_size", ""))
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, (label, sweep) in enumerate(result["sweeps"].items()):
        colour = f"C{i}"
        x = [p["images_per_s"] for p in sweep]
        ax.plot(x, [p["p50_ms"] for p in sweep], marker="o", color=colour, label=label)
        ax.plot(x, [p["p99_ms"] for p in sweep], linestyle="--", color=colour, alpha=0.6)
        for p in sweep:
            ax.annotate(f"c{p['concurrency']}", (p["images_per_s"], p["p50_ms"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7, color=colour)
        limit = result["backends"].get(label.removeprefix("ours:"), {}).get("limit_at_sweep")
        if label.startswith("ours:") and limit:
            if batch in limit:
                ax.axvline(limit[batch]["images_per_s"], linestyle=":", color=colour)
            if "pipeline" in limit:
                ax.axvline(limit["pipeline"]["images_per_s"], linestyle="-.", color=colour,
                           alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlim(left=0)
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(f"{config.get('arch', '')} {config.get('crop_size', '')} px, batchSize {batch}, "
                 f"{config.get('workers', '')} worker(s) x {config.get('threads', '')} threads, "
                 f"{config.get('images_per_request', 1)} image(s) per request", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.text(1.01, 0.0, f"solid: p50 (cN: N clients)\ndashed: p99\ndotted: in-process limit,\n"
            f"  batch {batch}\ndash-dot: in-process pipeline\n  (decode + preprocess)",
            transform=ax.transAxes, fontsize=8, va="bottom")
    fig.tight_layout()
    return fig


def plot_benchmark(result: dict, path: Path) -> None:
    """``latency_throughput_figure`` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = latency_throughput_figure(result)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> dict:
    """Runs the benchmark ``scripts/benchmark.py``'s arguments describe.

    Returns:
        ``{"backends": {name: {"archive_s", "warmup_s", "limit", "accuracy"?,
        "limit_at_sweep"?}}, "sweeps": {label: [point, ...]}, "config", "ratios"}``, also
        written to ``benchmark.json`` and ``benchmark.md`` in ``args.output_dir``.
    """
    paths = [p for p, _ in list_images(args.images)][: args.max_images]
    if not paths:
        raise SystemExit(f"no images under {args.images}")
    images = [p.read_bytes() for p in paths]
    # the limit runs with the allocator setting the workers get, so that the ratio compares
    # serving, not allocators
    retain_heap(args.retain_heap_mb)
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    trained_at = ckpt["preprocessing"]
    result = {"backends": {}, "sweeps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint
        if args.crop_size:  # serve at another resolution: speed only, accuracy not comparable
            ckpt["preprocessing"] = {**trained_at, "crop_size": args.crop_size,
                                     "resize_size": args.resize_size or args.crop_size}
            checkpoint = tmp / "checkpoint.pt"
            torch.save(ckpt, checkpoint)
        _, _, transform = load_classifier(checkpoint, torch.device("cpu"))
        # the batch as the handler hands it to the runner (EvalTransform.normalize's layout)
        batch = transform.normalize(torch.stack([transform.load_pixels(images[i % len(images)])
                                                 for i in range(args.batch_size)]))
        scored = None
        if args.accuracy_dir and args.accuracy_dir.is_dir() and not args.crop_size:
            folder = image_folder(args.accuracy_dir, transform, transform.resize_size)
            scored = (torch.stack([img for img, _ in folder]), torch.tensor(folder.targets))
        store = tmp / "store"
        models, limit_again = [], {}  # served back-end -> its limit, to measure next to the sweep
        for backend in args.backends:
            name = f"bench-{backend}"
            start = time.perf_counter()
            extra = ["--calibration-dir", str(args.calibration_dir)] if args.calibration_dir else []
            mar = archive.main(archive.get_args_parser().parse_args([
                "--checkpoint", str(checkpoint), "--model-name", name, "--export-path", str(store),
                "--backend", backend, "--batch-size", str(args.batch_size),
                "--max-batch-delay", str(args.max_batch_delay), "--min-workers", str(args.workers),
                "--max-workers", str(args.workers), "--num-threads", str(args.threads),
                "--retain-heap-mb", str(args.retain_heap_mb), *extra]))
            archive_s = round(time.perf_counter() - start, 2)
            model_dir = tmp / "unpacked" / backend
            zipfile.ZipFile(mar).extractall(model_dir)
            runner, warmup_s = timed_runner(backend, checkpoint, model_dir, args.threads, batch)

            def limit(runner=runner, backend=backend, model_dir=model_dir, pipeline=False):
                if args.workers == 1:
                    torch.set_num_threads(torch_threads(backend, args.threads))
                    out = in_process_limit(runner, batch, args.limit_seconds)
                    if pipeline:
                        out["pipeline"] = pipeline_limit(runner, transform, images,
                                                         args.batch_size, args.limit_seconds)
                    return out
                return parallel_limit(backend, checkpoint, model_dir, args.threads, batch,
                                      args.limit_seconds, args.workers, args.retain_heap_mb)
            entry = {"archive_s": archive_s, "warmup_s": warmup_s, "limit": limit()}
            if scored is not None:
                entry["accuracy"] = accuracy(runner, *scored, args.batch_size)
            print(f"{backend}: {json.dumps(entry)}", flush=True)
            result["backends"][backend] = json.loads(json.dumps(entry))
            if backend in args.serve:
                models.append(f"{name}={name}.mar")
                limit_again[backend] = limit
            del runner
        if args.stock:
            models.append(build_stock_archive(ckpt, store, tmp))
        if models:
            # Stock runs on TorchServe's defaults: workers = cores (default_workers_per_model 0).
            ts = TorchServe(workdir=tmp / "ts", model_store=store, models=models,
                            overrides=server_overrides(default_workers_per_model="0")).start()
            try:
                names = [m.split("=")[0] for m in models]
                ts.wait_ready(names, timeout_s=600)
                for model in names:
                    label = STOCK if model == STOCK else f"ours:{model.removeprefix('bench-')}"
                    images_per = 1 if model == STOCK else args.images_per_request
                    sweep_point(ts, model, images, max(args.concurrency), min(50, args.requests), images_per)  # warm-up
                    backend = label.removeprefix("ours:")
                    if backend in limit_again:
                        # again, next to the sweep: on a shared machine the speed drifts by
                        # 10-20 % over minutes; the ratios use this figure
                        limit = limit_again.pop(backend)(pipeline=True)
                        result["backends"][backend]["limit_at_sweep"] = json.loads(json.dumps(limit))
                        print(f"{backend} in-process, next to the sweep: {json.dumps(limit)}", flush=True)
                    result["sweeps"][label] = []
                    for c in args.concurrency:
                        point = sweep_point(ts, model, images, c, args.requests, images_per)
                        print(f"{label}: {json.dumps(point)}", flush=True)
                        result["sweeps"][label].append(point)
            finally:
                ts.stop()
    result["config"] = {"arch": ckpt["arch"], "crop_size": ckpt["preprocessing"]["crop_size"],
                        "trained_crop_size": trained_at["crop_size"], "batch_size": args.batch_size,
                        "max_batch_delay": args.max_batch_delay, "workers": args.workers,
                        "threads": args.threads, "retain_heap_mb": args.retain_heap_mb,
                        "images_per_request": args.images_per_request,
                        "images": len(images),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    result["ratios"] = ratios(result, args.batch_size)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "benchmark.json").write_text(json.dumps(result, indent=2))
    (args.output_dir / "benchmark.md").write_text(to_markdown(result))
    if result["sweeps"]:
        plot_benchmark(result, args.output_dir / "benchmark.png")
    print(to_markdown(result))
    return result
