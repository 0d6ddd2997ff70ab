"""Export a training checkpoint and build a TorchServe model archive (.mar).

    python -m training.archive --checkpoint runs/NAME/checkpoint_best.pt --model-name NAME

The archive holds:
  * ``model.pt``: ``{"arch", "num_classes", "head", "state_dict"}`` saved with ``torch.save``
    and read with ``torch.load(weights_only=True)`` (plain tensors, no pickled code, no
    TorchScript, which current torch deprecates);
  * ``index_to_name.json``: the label map, from the checkpoint's class names;
  * ``model.onnx`` (``--backend onnxruntime``) or, for ``--backend onnxruntime-int8``,
    ``model.int8.onnx`` (7-bit weights, exact on every CPU) and ``model.int8-w8.onnx`` (8-bit,
    for CPUs with VNNI; left out if it fails the gate): the ONNX Runtime graphs
    (``training/export.py``), when the back-end reads one; each worker picks the int8 file for
    its CPU (``handler.backends.onnx_file``);
  * ``model-config.yaml``: workers, batching, timeouts, device, and the handler settings
    (preprocessing from the checkpoint, default top-k, threads per worker, back-end);
  * the ``handler/`` package, whole (its ``*.py`` files, nothing else), and its entry module
    ``classifier_handler.py`` at the top level, where TorchServe's worker imports it.

The default ``--backend auto`` measures instead of assuming (``training/backend_choice.py``):
every candidate back-end is held to the accuracy gate (top-1 on ``--check-images`` labelled
photos that the ``--calibration-images`` int8 calibration photos do not include, at most
``--max-accuracy-drop`` points below fp32), the survivors are timed on this CPU at the served
batch size and threads, and the fastest is served; ``handler.backend_selection`` keeps the
figures and the reason, ``handler.gpu_backends`` the torch back-ends a CUDA worker chooses
among at load.

An explicit ``--backend onnxruntime-int8`` applies the same gate and refuses to build when int8
loses more than ``--max-accuracy-drop`` points (use ``--backend onnxruntime`` or ``eager`` for
that model); the figures go into ``handler.quantization``. The 8-bit graph is gated in reference
arithmetic on a CPU without VNNI (what a VNNI CPU computes; ``gate_int8_files``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from handler.architectures import load_trained
from handler.backends import BACKENDS, ONNX_FILES, default_threads, retain_heap
from handler.settings import DEFAULT_RETAIN_HEAP_MB, DEFAULT_TOPK, HandlerSettings
from training.backend_choice import AUTO_CANDIDATES, choose_backend

ROOT = Path(__file__).resolve().parent.parent
HANDLER_PACKAGE = ROOT / "handler"
HANDLER = HANDLER_PACKAGE / "classifier_handler.py"  # the worker's entry module

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build a TorchServe .mar from a checkpoint",
                                add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint_best.pt from training")
    p.add_argument("--model-name", required=True, help="name in URLs: /predictions/<model-name>")
    p.add_argument("--version", default="1.0", help="model version")
    p.add_argument("--archive-name", default=None,
                   help="file name without .mar (default: the model name); lets v2 sit beside v1")
    p.add_argument("--export-path", type=Path, default=ROOT / "model_store", help="where the .mar goes")
    p.add_argument("--topk", type=int, default=DEFAULT_TOPK, help="default k when a request names none")
    p.add_argument("--batch-size", type=int, default=8, help="largest batch a worker is given")
    p.add_argument("--max-batch-delay", type=int, default=5,
                   help="ms the frontend waits to fill a batch")
    p.add_argument("--min-workers", type=int, default=1)
    p.add_argument("--max-workers", type=int, default=1)
    p.add_argument("--response-timeout", type=int, default=120, help="s before a request times out")
    p.add_argument("--num-threads", type=int, default=0,
                   help="intra-op threads per worker, torch and ONNX Runtime "
                        "(0: the worker's CPUs / max-workers)")
    p.add_argument("--retain-heap-mb", type=int, default=DEFAULT_RETAIN_HEAP_MB,
                   help="free CPU heap (MiB) a worker keeps between batches instead of unmapping "
                        "it (handler/backends.retain_heap; 0: glibc's defaults)")
    p.add_argument("--device-type", choices=["cpu", "gpu"], default=None,
                   help="pin workers to cpu or gpu (default: TorchServe decides, GPU if present)")
    p.add_argument("--device-ids", type=int, nargs="*", default=None, help="GPU ids for gpu workers")
    p.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto",
                   help="inference back-end (handler/backends.py); auto: the fastest of "
                        "--auto-candidates on this CPU among those passing the accuracy gate")
    p.add_argument("--auto-candidates", nargs="+", choices=BACKENDS, default=list(AUTO_CANDIDATES),
                   help="back-ends --backend auto gates and times")
    p.add_argument("--calibration-dir", type=Path, default=None,
                   help="labelled ImageFolder for int8 calibration and the accuracy gate "
                        "(default: the checkpoint's data_dir/val, else data_dir/train)")
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--check-images", type=int, default=400,
                   help="other images of --calibration-dir scored with fp32 and int8")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="largest int8 top-1 loss accepted, in accuracy points")
    return p


def model_config(args, preprocessing: dict) -> dict:
    """The archive's ``model-config.yaml`` content (TorchServe model configuration)."""
    cfg = {"minWorkers": args.min_workers, "maxWorkers": args.max_workers,
           "batchSize": args.batch_size, "maxBatchDelay": args.max_batch_delay,
           "responseTimeout": args.response_timeout}
    if args.backend == "compile":  # compiling in initialize outlasts the default 120 s
        cfg["startupTimeout"] = 900
    if args.device_type:
        cfg["deviceType"] = args.device_type
    if args.device_ids:
        cfg["deviceIds"] = list(args.device_ids)
    cfg["handler"] = {"topk": args.topk, "num_threads": args.num_threads,
                      "retain_heap_mb": args.retain_heap_mb, "backend": args.backend,
                      "preprocessing": preprocessing}
    return cfg


def check_handler_settings(config: dict) -> None:
    """Parses ``config["handler"]`` as the worker will (``handler.settings``), so that an
    archive the handler would refuse is never built.

    Raises:
        ValueError: the worker would refuse the section.
    """
    HandlerSettings.from_config(config["handler"])


def calibration_dir(args, checkpoint: dict) -> Path:
    """``--calibration-dir``, else the checkpoint's ``data_dir``/val (or /train).

    Raises:
        FileNotFoundError: no folder given and none found from the checkpoint.
    """
    if args.calibration_dir is not None:
        return args.calibration_dir
    data_dir = (checkpoint.get("args") or {}).get("data_dir")
    for base in ([Path(data_dir), ROOT / data_dir] if data_dir else []):
        for split in ("val", "train"):
            if (base / split).is_dir():
                return base / split
    raise FileNotFoundError(
        f"--backend {args.backend} needs labelled images for calibration: pass --calibration-dir "
        f"(an ImageFolder such as data/val), or choose --backend onnxruntime or eager")


def labelled_images(checkpoint: dict, args) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, Path]:
    """Calibration and check images from ``calibration_dir``, preprocessed as served.

    A seeded shuffle: the first ``--calibration-images`` calibrate, the next
    ``--check-images`` (never the same photos) are scored by the accuracy gate.

    Returns:
        (calibration float32 [M, 3, H, W], check float32 [N, 3, H, W], check labels int64 [N],
        the folder).

    Raises:
        FileNotFoundError: no labelled folder (see ``calibration_dir``).
        ValueError: too few images, or class folders differing from the model's.
    """
    from training.data import image_folder
    from handler.preprocessing import EvalTransform

    transform = EvalTransform.from_dict(checkpoint["preprocessing"])
    folder = image_folder(calibration_dir(args, checkpoint), transform, transform.resize_size)
    if folder.classes != checkpoint["class_names"]:
        raise ValueError(f"{folder.root} classes {folder.classes} differ from the model's "
                         f"{checkpoint['class_names']}")
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(0)).tolist()
    n_cal = min(args.calibration_images, len(order) // 2)
    cal_idx, check_idx = order[:n_cal], order[n_cal:n_cal + args.check_images]
    if n_cal < 1 or not check_idx:
        raise ValueError(f"{folder.root} has too few images for calibration and a check")
    calibration = torch.stack([folder[i][0] for i in cal_idx])
    check = torch.stack([folder[i][0] for i in check_idx])
    labels = np.array([folder.targets[i] for i in check_idx])
    return calibration, check, labels, Path(folder.root)


def export_int8(checkpoint: dict, onnx_fp32: Path, dest: Path, args) -> dict:
    """Quantizes ``onnx_fp32`` into both int8 graphs in folder ``dest`` (7- and 8-bit weights,
    ``training/export.py`` ``quantize_int8_files``) and applies the accuracy gate to each.

    Returns:
        The gate's figures (written to ``handler.quantization``): accuracies in percent;
        ``int8_accuracy`` and ``top1_agreement`` are those of the graph this CPU serves,
        ``weights`` has both.

    Raises:
        ValueError: too few images, class folders differing from the model's, or an int8
            accuracy drop above ``--max-accuracy-drop`` for the 7-bit graph.
    """
    from training.export import gate_int8_files, onnx_predictions, quantize_int8_files

    calibration, check, labels, root = labelled_images(checkpoint, args)
    files = quantize_int8_files(onnx_fp32, dest, calibration)
    try:
        figures = gate_int8_files(files, check, labels, onnx_predictions(onnx_fp32, check),
                                  args.max_accuracy_drop)
    except ValueError as exc:
        raise ValueError(f"{exc}: use --backend onnxruntime or eager") from exc
    served = figures["weights"][figures["served_here"]]
    return {"calibration_dir": str(root), "calibration_images": len(calibration),
            "check_images": len(labels), "fp32_accuracy": figures["fp32_accuracy"],
            "int8_accuracy": served["accuracy"], "top1_agreement": served["top1_agreement"],
            "served_here": figures["served_here"], "weights": figures["weights"]}


def export_files(checkpoint: dict, dest: Path, args) -> dict:
    """Writes ``model.pt``, ``index_to_name.json``, ``model-config.yaml`` and the ONNX files the
    back-end reads (if any: int8 has two, ``export_int8``) into ``dest``.

    Returns:
        ``{"model", "labels", "config"}``: paths, ``"onnx"``: a list of paths (absent for a
        torch back-end); ``"backend"``: the served back-end.

    Raises:
        KeyError: the checkpoint lacks a field training writes.
    """
    files = {"model": dest / "model.pt", "labels": dest / "index_to_name.json",
             "config": dest / "model-config.yaml"}
    torch.save({"arch": checkpoint["arch"], "num_classes": checkpoint["num_classes"],
                "head": checkpoint.get("head") or {}, "state_dict": checkpoint["model"],
                "tta": checkpoint.get("tta")}, files["model"])
    files["labels"].write_text(json.dumps(
        {str(i): name for i, name in enumerate(checkpoint["class_names"])}, indent=2))
    config = model_config(args, checkpoint["preprocessing"])
    if args.backend == "auto":
        model = load_trained(checkpoint["arch"], checkpoint["num_classes"], checkpoint.get("head"),
                             checkpoint["model"], checkpoint.get("tta"))
        try:
            calibration, check, labels, root = labelled_images(checkpoint, args)
            labelled = (calibration, check, labels)
        except FileNotFoundError as exc:
            logger.warning("backend auto without an accuracy gate: %s", exc)
            labelled, root = None, None
        selection = choose_backend(
            model, checkpoint["preprocessing"]["crop_size"], dest, labelled=labelled,
            candidates=tuple(args.auto_candidates), batch_size=args.batch_size,
            threads=default_threads(args.num_threads, args.max_workers),
            max_accuracy_drop=args.max_accuracy_drop)
        if root is not None:
            selection["check_dir"] = str(root)
        config["handler"]["backend"] = backend = selection.pop("backend")
        config["handler"]["gpu_backends"] = selection.pop("gpu_backends")
        config["handler"]["backend_selection"] = selection
        if backend in ONNX_FILES:
            files["onnx"] = sorted(p for p in dest.glob("*.onnx"))
    elif args.backend in ONNX_FILES:
        from training.export import export_onnx

        model = load_trained(checkpoint["arch"], checkpoint["num_classes"], checkpoint.get("head"),
                             checkpoint["model"], checkpoint.get("tta"))
        crop = checkpoint["preprocessing"]["crop_size"]
        if args.backend == "onnxruntime":
            files["onnx"] = [export_onnx(model, crop, dest / ONNX_FILES[args.backend])]
        else:
            fp32 = export_onnx(model, crop, dest / "fp32.onnx.tmp")
            config["handler"]["quantization"] = export_int8(checkpoint, fp32, dest, args)
            fp32.unlink()
            files["onnx"] = sorted(p for p in dest.glob("*.onnx"))
    check_handler_settings(config)
    with open(files["config"], "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    files["backend"] = config["handler"]["backend"]
    return files


def main(args) -> Path:
    """Builds ``<export-path>/<archive-name or model-name>.mar`` (overwriting). Returns its path.

    Raises:
        subprocess.CalledProcessError: torch-model-archiver failed.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.topk < 1:
        raise ValueError("--topk must be >= 1")
    # The back-end timing below runs with the heap setting the workers will have.
    retain_heap(args.retain_heap_mb)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    args.export_path.mkdir(parents=True, exist_ok=True)
    mar = args.export_path / f"{args.archive_name or args.model_name}.mar"
    with tempfile.TemporaryDirectory() as tmp:
        files = export_files(checkpoint, Path(tmp), args)
        # torch-model-archiver copies a folder's contents, so the package goes in a folder of
        # its own: <tmp>/code/handler -> <archive>/handler
        code = Path(tmp) / "code"
        shutil.copytree(HANDLER_PACKAGE, code / HANDLER_PACKAGE.name,
                        ignore=lambda _, names: [n for n in names if not n.endswith(".py")])
        extra = [str(code), str(files["labels"])]
        extra += [str(path) for path in files.get("onnx", [])]
        subprocess.run([sys.executable, "-m", "model_archiver.model_packaging",
                        "--model-name", args.model_name, "--version", args.version,
                        "--handler", str(HANDLER), "--serialized-file", str(files["model"]),
                        "--extra-files", ",".join(extra), "--config-file", str(files["config"]),
                        "--export-path", tmp, "--force"], check=True)
        shutil.move(Path(tmp) / f"{args.model_name}.mar", mar)
    logger.info("wrote %s (version %s, %s, %s, %d classes, val accuracy %s)", mar, args.version,
                checkpoint["arch"], files["backend"], checkpoint["num_classes"],
                checkpoint.get("metrics", {}).get("best_val_accuracy"))
    return mar


if __name__ == "__main__":
    main(get_args_parser().parse_args())
