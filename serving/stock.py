"""TorchServe's stock ``image_classifier`` handler on our checkpoint's weights: the baseline
the benchmark compares our handler with.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

STOCK = "stock"
# The stock handler's model file: BaseHandler instantiates the one class defined in it with no
# arguments and loads the state_dict; __new__ hands back torchvision's own model, whose
# parameter names equal our checkpoint's when the head is a plain Linear.
STOCK_MODEL_FILE = '''import torchvision


class StockModel:
    def __new__(cls):
        return torchvision.models.get_model({arch!r}, num_classes={num_classes})
'''


def build_stock_archive(ckpt: dict, store: Path, tmp: Path) -> str:
    """``store/stock.mar``: the checkpoint's weights behind TorchServe's ``image_classifier``.

    Raises:
        RuntimeError: the weights don't load into torchvision's stock model (a custom head).
    """
    import torchvision
    try:
        torchvision.models.get_model(ckpt["arch"], num_classes=ckpt["num_classes"]).load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise RuntimeError(f"--stock needs a plain Linear head: {exc}") from None
    model_file, weights, labels = tmp / "stock_model.py", tmp / "stock_weights.pt", tmp / "index_to_name.json"
    model_file.write_text(STOCK_MODEL_FILE.format(arch=ckpt["arch"], num_classes=ckpt["num_classes"]))
    torch.save(ckpt["model"], weights)
    labels.write_text(json.dumps({str(i): n for i, n in enumerate(ckpt["class_names"])}))
    subprocess.run([sys.executable, "-m", "model_archiver.model_packaging", "--model-name", STOCK,
                    "--version", "1.0", "--model-file", str(model_file), "--serialized-file", str(weights),
                    "--handler", "image_classifier", "--extra-files", str(labels),
                    "--export-path", str(store), "--force"], check=True)
    return f"{STOCK}={STOCK}.mar"
