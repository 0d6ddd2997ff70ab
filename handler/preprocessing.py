"""Image decoding and the single evaluation transform, shared by training and serving.

This module is imported two ways: as ``handler.preprocessing`` by the training code and
flat (``from preprocessing import ...``) inside the TorchServe model archive, where the
archive's files sit side by side on ``sys.path``. It must therefore not import TorchServe.

Evaluation (``training/train.py``), the predict CLI and the handler all turn bytes into a
model input with ``decode_image`` followed by ``EvalTransform``; a test asserts that the
evaluation path and the handler produce identical tensors for the same file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

# ImageNet channel statistics, from the torchvision weights docs
# (https://pytorch.org/vision/stable/models.html); also the default for from-scratch runs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Formats PIL is allowed to try. Restricting ``Image.open`` keeps exotic decoders
# (EPS through Ghostscript, PSD, ICO, ...) out of the request path. MPO is the
# multi-picture JPEG variant many phone cameras write.
Image.init()  # registers every plugin, so MPO (a JPEG plugin sub-format) is in Image.OPEN
SUPPORTED_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")
                          if f in Image.OPEN)


class ClientError(ValueError):
    """A request the server cannot serve because of its content (an HTTP 4xx).

    Attributes:
        status: HTTP status code to answer with.
        reason: short machine-readable reason (``undecodable``, ``too_large``,
            ``bad_parameter``, ``bad_request``), used in the JSON error body and metrics.
    """

    status = 400
    reason = "bad_request"

    def to_json(self) -> dict:
        """Returns the JSON error body: ``{"code", "type", "message"}``."""
        return {"code": self.status, "type": self.reason, "message": str(self)}


class DecodeError(ClientError):
    """The bytes are not an image in a supported format, or the image is corrupt (400)."""

    reason = "undecodable"


class ImageTooLargeError(ClientError):
    """The image declares more pixels than PIL's decompression-bomb limit (413)."""

    status = 413
    reason = "too_large"


class BadParameterError(ClientError):
    """A request parameter (e.g. ``topk``) has an invalid value (422)."""

    status = 422
    reason = "bad_parameter"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB.

    Integer modes (``I``, ``I;16*``, from 16-bit PNG/TIFF) are scaled by 1/256 rather than
    clipped; float images are clipped to [0, 255]; images with an alpha channel or palette
    transparency are composited onto white.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):
        arr = np.asarray(img).astype(np.int64) >> 8
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, *, draft_size: Optional[int] = None) -> Image.Image:
    """Decodes encoded image bytes to an 8-bit RGB PIL image, upright.

    JPEG, PNG, WebP, BMP, GIF (first frame) and TIFF are accepted. EXIF orientation is
    applied. PIL's decompression-bomb guard stays on: an image declaring more than
    ``Image.MAX_IMAGE_PIXELS`` pixels is refused before its pixels are decoded.

    Args:
        data: the encoded file's bytes.
        draft_size: when set and the file is a JPEG, let libjpeg decode at a reduced
            scale (1/2, 1/4, 1/8) as long as both sides stay >= ``draft_size`` px. Pass
            the eval transform's resize size: large photos then decode several times
            faster, and every path that shares this function sees the same pixels.

    Returns:
        A PIL image in mode ``RGB``.

    Raises:
        DecodeError: empty input, unknown or unsupported format, corrupt or truncated data.
        ImageTooLargeError: more pixels than ``Image.MAX_IMAGE_PIXELS``.
    """
    if not data:
        raise DecodeError("empty image: the request carried no bytes")
    try:
        with warnings.catch_warnings():
            # Above MAX_IMAGE_PIXELS PIL only warns (it raises above twice that); refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
            if draft_size is not None and img.format in ("JPEG", "MPO"):
                img.draft("RGB" if img.mode == "RGB" else None, (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(
            f"image too large: {exc} (limit {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise DecodeError(
            "cannot identify image: expected one of " + ", ".join(SUPPORTED_FORMATS)
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from exc


@dataclass(frozen=True)
class EvalTransform:
    """The evaluation transform: resize shorter side, center crop, scale, normalize.

    Mirrors torchvision's ``ClassificationPresetEval`` (references/classification/presets.py):
    ``Resize(resize_size)`` of the shorter side with antialiasing (aspect ratio kept, no
    squashing), ``CenterCrop(crop_size)``, uint8 -> float32 in [0, 1], ``Normalize(mean, std)``.

    Attributes:
        crop_size: side of the square model input, px.
        resize_size: shorter side after resizing, px (>= crop_size).
        mean, std: per-channel normalization statistics, RGB order, for [0, 1] inputs.
        interpolation: ``bilinear`` or ``bicubic``.
    """

    crop_size: int = 224
    resize_size: int = 256
    mean: Sequence[float] = field(default=IMAGENET_MEAN)
    std: Sequence[float] = field(default=IMAGENET_STD)
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.resize_size < self.crop_size:
            raise ValueError(
                f"resize_size ({self.resize_size}) must be >= crop_size ({self.crop_size})"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need 3 values (RGB)")
        InterpolationMode(self.interpolation)  # raises ValueError on unknown names
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @classmethod
    def from_dict(cls, cfg: dict) -> "EvalTransform":
        """Builds the transform from a dict with the attribute names as keys.

        Raises:
            ValueError: unknown keys or invalid values.
        """
        unknown = set(cfg) - {"crop_size", "resize_size", "mean", "std", "interpolation"}
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        return cls(**cfg)

    def to_dict(self) -> dict:
        """Returns plain-Python settings (YAML/JSON/``torch.load(weights_only=True)`` safe)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Transforms an RGB PIL image.

        Returns:
            float32 tensor [3, crop_size, crop_size], normalized.
        """
        mode = InterpolationMode(self.interpolation)
        img = F.resize(img, [self.resize_size], interpolation=mode, antialias=True)
        img = F.center_crop(img, [self.crop_size, self.crop_size])
        x = F.to_dtype(F.pil_to_tensor(img), torch.float32, scale=True)
        return F.normalize(x, self.mean, self.std)

    def load(self, data: bytes) -> torch.Tensor:
        """Decodes bytes and transforms them: the one bytes -> model-input path.

        Returns:
            float32 tensor [3, crop_size, crop_size].

        Raises:
            DecodeError, ImageTooLargeError: see ``decode_image``.
        """
        return self(decode_image(data, draft_size=self.resize_size))
