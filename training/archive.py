"""Export a training checkpoint and build a TorchServe model archive (.mar).

    python -m training.archive --checkpoint runs/NAME/checkpoint_best.pt --model-name NAME

The archive holds:
  * ``model.pt``: ``{"arch", "num_classes", "head", "state_dict"}`` saved with ``torch.save``
    and read with ``torch.load(weights_only=True)`` (plain tensors, no pickled code, no
    TorchScript, which current torch deprecates);
  * ``index_to_name.json``: the label map, from the checkpoint's class names;
  * ``model-config.yaml``: workers, batching, timeouts, device, and the handler settings
    (preprocessing from the checkpoint, default top-k, threads per worker);
  * the handler and the modules it imports (``preprocessing.py``, ``postprocessing.py``,
    ``payload.py``,
    ``models.py``).
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

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "handler" / "classifier_handler.py"
EXTRA_FILES = [ROOT / "handler" / "preprocessing.py", ROOT / "handler" / "postprocessing.py",
               ROOT / "handler" / "payload.py",
               ROOT / "training" / "models.py"]

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
    p.add_argument("--topk", type=int, default=5, help="default k when a request names none")
    p.add_argument("--batch-size", type=int, default=8, help="largest batch a worker is given")
    p.add_argument("--max-batch-delay", type=int, default=20,
                   help="ms the frontend waits to fill a batch")
    p.add_argument("--min-workers", type=int, default=1)
    p.add_argument("--max-workers", type=int, default=1)
    p.add_argument("--response-timeout", type=int, default=120, help="s before a request times out")
    p.add_argument("--num-threads", type=int, default=0,
                   help="torch intra-op threads per worker (0: torch default)")
    p.add_argument("--device-type", choices=["cpu", "gpu"], default=None,
                   help="pin workers to cpu or gpu (default: TorchServe decides, GPU if present)")
    p.add_argument("--device-ids", type=int, nargs="*", default=None, help="GPU ids for gpu workers")
    return p


def model_config(args, preprocessing: dict) -> dict:
    """The archive's ``model-config.yaml`` content (TorchServe model configuration)."""
    cfg = {"minWorkers": args.min_workers, "maxWorkers": args.max_workers,
           "batchSize": args.batch_size, "maxBatchDelay": args.max_batch_delay,
           "responseTimeout": args.response_timeout}
    if args.device_type:
        cfg["deviceType"] = args.device_type
    if args.device_ids:
        cfg["deviceIds"] = list(args.device_ids)
    cfg["handler"] = {"topk": args.topk, "num_threads": args.num_threads,
                      "preprocessing": preprocessing}
    return cfg


def export_files(checkpoint: dict, dest: Path, args) -> dict[str, Path]:
    """Writes ``model.pt``, ``index_to_name.json`` and ``model-config.yaml`` into ``dest``.

    Raises:
        KeyError: the checkpoint lacks a field training writes.
    """
    files = {"model": dest / "model.pt", "labels": dest / "index_to_name.json",
             "config": dest / "model-config.yaml"}
    torch.save({"arch": checkpoint["arch"], "num_classes": checkpoint["num_classes"],
                "head": checkpoint.get("head") or {}, "state_dict": checkpoint["model"]},
               files["model"])
    files["labels"].write_text(json.dumps(
        {str(i): name for i, name in enumerate(checkpoint["class_names"])}, indent=2))
    with open(files["config"], "w") as f:
        yaml.safe_dump(model_config(args, checkpoint["preprocessing"]), f, sort_keys=False)
    return files


def main(args) -> Path:
    """Builds ``<export-path>/<archive-name or model-name>.mar`` (overwriting). Returns its path.

    Raises:
        subprocess.CalledProcessError: torch-model-archiver failed.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.topk < 1:
        raise ValueError("--topk must be >= 1")
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    args.export_path.mkdir(parents=True, exist_ok=True)
    mar = args.export_path / f"{args.archive_name or args.model_name}.mar"
    with tempfile.TemporaryDirectory() as tmp:
        files = export_files(checkpoint, Path(tmp), args)
        extra = [str(p) for p in EXTRA_FILES] + [str(files["labels"])]
        subprocess.run([sys.executable, "-m", "model_archiver.model_packaging",
                        "--model-name", args.model_name, "--version", args.version,
                        "--handler", str(HANDLER), "--serialized-file", str(files["model"]),
                        "--extra-files", ",".join(extra), "--config-file", str(files["config"]),
                        "--export-path", tmp, "--force"], check=True)
        shutil.move(Path(tmp) / f"{args.model_name}.mar", mar)
    logger.info("wrote %s (version %s, %s, %d classes, val accuracy %s)", mar, args.version,
                checkpoint["arch"], checkpoint["num_classes"],
                checkpoint.get("metrics", {}).get("best_val_accuracy"))
    return mar


if __name__ == "__main__":
    main(get_args_parser().parse_args())
