"""Predict the top-k classes of one image with a training checkpoint (no server).

    python -m training.predict --checkpoint runs/NAME/checkpoint_best.pt photo.jpg --topk 3
    python -m training.predict --checkpoint ... a.jpg b.jpg --plot topk.png   # bars next to each photo

Uses the same decode, eval transform and top-k code as the TorchServe handler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from handler.postprocessing import format_topk, topk_records
from handler.preprocessing import ClientError, EvalTransform, decode_image
from handler.architectures import load_trained
from training.train import resolve_device


def load_classifier(checkpoint: Path, device: torch.device):
    """Rebuilds the trained model from a checkpoint.

    Returns:
        (model in eval mode on ``device``, class names in index order, EvalTransform).
    """
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = load_trained(ckpt["arch"], ckpt["num_classes"], ckpt.get("head"), ckpt["model"],
                         ckpt.get("tta")).to(
        device, memory_format=torch.channels_last)
    return model, ckpt["class_names"], EvalTransform.from_dict(ckpt["preprocessing"])


@torch.inference_mode()
def predict(model, classes, transform: EvalTransform, data: bytes, k: int,
            device: torch.device) -> list[dict]:
    """Top-k records for one encoded image (see ``handler.postprocessing.topk_records``)."""
    x = transform.load(data).unsqueeze(0).to(device).contiguous(memory_format=torch.channels_last)
    probs = model(x).float().softmax(1)
    return topk_records(probs, classes, [k])[0]


def main(args) -> int:
    device = resolve_device(args.device)
    model, classes, transform = load_classifier(args.checkpoint, device)
    status, plotted = 0, []
    for image in args.images:
        print(f"{image}:")
        try:
            data = image.read_bytes()
            records = predict(model, classes, transform, data, args.topk, device)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(format_topk(records))
        if args.plot:
            plotted.append((image.name, decode_image(data), records))
    if args.plot and plotted:
        from training.reports import plot_topk

        plot_topk(plotted, args.plot)
        print(f"plot: {args.plot}")
    return status


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Top-k prediction for images from a checkpoint",
                                add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", type=Path, nargs="+", help="image files")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint_best.pt")
    p.add_argument("--topk", type=int, default=5, help="records per image (clamped to classes)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG: each photo next to its top-k as a bar chart")
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
