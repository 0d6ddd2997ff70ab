"""Image decoding and the single evaluation transform, shared by training and serving.

Imported as ``handler.preprocessing`` everywhere: by the training code and, inside the
TorchServe model archive (which ships ``handler/`` whole), by the worker. It must therefore not
import TorchServe.

Evaluation (``training/train.py``), the predict CLI and the handler all turn bytes into a
model input with ``decode_image`` followed by ``EvalTransform``; a test asserts that the
evaluation path and the handler produce identical tensors for the same file.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

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


@dataclass(frozen=True)
class DecodeBudget:
    """What one image may cost to decode, beyond PIL's pixel limit.

    A JPEG is decoded scan by scan, and a progressive one refines every coefficient of the
    image in each scan: its cost is scans x pixels x components, whatever the file size. A
    ~700 KB file that repeats its last refinement scan 3000 times (9000 x 9000 grayscale) kept a
    worker busy for 120 s until TorchServe killed it. Measured with Pillow 13's libjpeg-turbo on
    one core (AVX-512): about 0.37 ns per coefficient per scan, so 9000 x 9000 grayscale costs
    30 ms per scan, draft mode or not (the coefficient buffers stay full size).

    Attributes:
        max_jpeg_scans: most scans (SOS markers) a JPEG may have. libjpeg's progressive
            scripts write 10 (colour) or 6 (grey), mozjpeg's optimized ones up to about 20;
            32 leaves room and bounds the count, as libjpeg-turbo's ``-maxscans`` does.
        max_jpeg_scan_megapixels: most scans x pixels x components / 1e6 a JPEG may have:
            3000 is about 1.1 s of decoding; a 12 Mpx colour photo with 32 scans is 1152,
            a 9000 x 9000 colour progressive photo (10 scans) 2430.
    """

    max_jpeg_scans: int = 32
    max_jpeg_scan_megapixels: float = 3000.0

    def check_jpeg(self, data: bytes, img: Image.Image) -> None:
        """Raises ImageTooLargeError when the JPEG ``data`` (opened as ``img``, not yet
        decoded) is over budget; the message names the limit."""
        # the walk stops at the first scan over the limit: a bomb of thousands of scans costs
        # no more to refuse than a photo costs to check
        scans = jpeg_scan_count(data, stop_after=self.max_jpeg_scans + 1)
        if scans > self.max_jpeg_scans:
            raise ImageTooLargeError(
                f"JPEG with more than {self.max_jpeg_scans} scans: over the decode budget of "
                f"{self.max_jpeg_scans} scans (handler.max_jpeg_scans)")
        work = scans * img.width * img.height * len(img.getbands()) / 1e6
        if work > self.max_jpeg_scan_megapixels:
            raise ImageTooLargeError(
                f"JPEG of {img.width}x{img.height} px with {scans} scans: {work:.0f} megapixel "
                f"passes, over the decode budget of {self.max_jpeg_scan_megapixels:.0f} "
                "(handler.max_jpeg_scan_megapixels)")


DEFAULT_DECODE_BUDGET = DecodeBudget()


def jpeg_scan_count(data: bytes, stop_after: Optional[int] = None) -> int:
    """Number of scans (SOS segments) in a JPEG's main image, by walking its markers.

    Segments with a length (APPn, DQT, DHT, SOFn, ...) are skipped whole, so an embedded EXIF
    thumbnail is not counted; inside entropy-coded data only a marker other than a stuffed
    ``FF 00``, a fill ``FF FF`` or a restart ``FF D0..D7`` ends the scan (ITU T.81, B.1.1).
    Stops at EOI, at the end of the data, or once ``stop_after`` scans are counted (then the
    count is ``stop_after``). Linear in the file size.
    """
    scans, i, n = 0, 2, len(data)
    while i + 1 < n and (stop_after is None or scans < stop_after):
        if data[i] != 0xFF:
            i = data.find(b"\xff", i)
            if i < 0:
                break
            continue
        marker = data[i + 1]
        if marker == 0xFF or marker == 0x00 or 0xD0 <= marker <= 0xD7:
            i += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:
            break
        if marker == 0xDA:
            scans += 1
        if i + 3 >= n:
            break
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return scans


def decode_image(data: bytes, *, draft_size: Optional[int] = None,
                 budget: DecodeBudget = DEFAULT_DECODE_BUDGET) -> Image.Image:
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
        budget: the decode budget a JPEG is held to before its pixels are decoded.

    Returns:
        A PIL image in mode ``RGB``.

    Raises:
        DecodeError: empty input, unknown or unsupported format, corrupt or truncated data.
        ImageTooLargeError: more pixels than ``Image.MAX_IMAGE_PIXELS``, or a JPEG over
            ``budget``.
    """
    if not data:
        raise DecodeError("empty image: the request carried no bytes")
    try:
        with warnings.catch_warnings():
            # Above MAX_IMAGE_PIXELS PIL only warns (it raises above twice that); refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
            if img.format in ("JPEG", "MPO"):
                budget.check_jpeg(data, img)
            if draft_size is not None and img.format in ("JPEG", "MPO"):
                img.draft("RGB" if img.mode == "RGB" else None, (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ClientError:  # the decode budget's refusal (a ValueError too)
        raise
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


@contextmanager
def intra_op_threads(threads: int):
    """Runs the block on ``threads`` PyTorch intra-op threads, then restores the count. The
    count is process-wide state: do not run this beside another thread's forward pass.

    ``EvalTransform.pixels`` runs its per-image resize (0.25 ms) on one thread: split over two
    OpenMP threads it gains nothing on an idle machine (0.75 vs 0.78 ms per image, decode
    included), and where another process holds the second core, as TorchServe's frontend and
    clients do, the parallel region waits for its preempted half: 2.7 ms instead of 0.8 (2
    cores, AVX-512). An explanation runs its gradients on the worker's threads with it.
    """
    before = torch.get_num_threads()
    if before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# torch.nn.functional.interpolate modes with antialiasing (the PIL filters of the same names).
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class EvalTransform:
    """The evaluation transform: resize shorter side, center crop, scale, normalize.

    Computes torchvision's ``ClassificationPresetEval`` (references/classification/presets.py):
    ``Resize(resize_size)`` of the shorter side with antialiasing (aspect ratio kept, no
    squashing), ``CenterCrop(crop_size)``, uint8 -> float32 in [0, 1], ``Normalize(mean, std)``.

    It is computed in two steps so that the per-image part stays small:
      * ``pixels``: the decoded image as a uint8 tensor, resized by ``torch.nn.functional.
        interpolate(antialias=True)`` and cropped. On uint8 that is PyTorch's port of PIL's
        separable resampling (the kernel torchvision's ``resize`` uses for uint8 tensors),
        vectorized, 2-4x faster than PIL's own resize here (0.25 vs 0.70 ms for a 150 px
        photo to 224 px bicubic, one thread, AVX-512). The result is torchvision's PIL path up
        to 8-bit rounding (a level or two where the two round differently); a test bounds the
        difference. uint8 CHW, the layout the kernel writes.
      * ``normalize``: scale and normalize a whole uint8 batch in one fused multiply-add,
        producing the contiguous NCHW float32 batch ONNX Runtime reads as it is (the torch
        back-ends take channels_last themselves, ``handler/backends.py``).

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
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of "
                             f"{list(INTERPOLATIONS)}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        # (x / 255 - mean) / std = x * scale + shift, per RGB channel (axis 1 of NCHW).
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        object.__setattr__(self, "_scale", 1.0 / (255.0 * std))
        object.__setattr__(self, "_shift",
                           -torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1) / std)

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
        d = asdict(self)  # fields only: not the derived _scale / _shift
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height), px, after torchvision's ``Resize([resize_size])``: the shorter side
        becomes ``resize_size``, the longer ``int(resize_size * long / short)``."""
        s = self.resize_size
        return (s, int(s * height / width)) if width <= height else (int(s * width / height), s)

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """Resizes the shorter side and center-crops an RGB PIL image.

        Returns:
            uint8 tensor [3, crop_size, crop_size] (CHW, RGB), contiguous.
        """
        c = self.crop_size
        new_w, new_h = self.resized_size(*img.size)
        left, top = int(round((new_w - c) / 2.0)), int(round((new_h - c) / 2.0))
        with intra_op_threads(1):
            # HWC uint8 seen as NCHW is channels_last: the layout the vectorized uint8 kernel
            # reads fastest (0.44 against 0.58 ms from contiguous NCHW, 150 -> 256 px bicubic,
            # AVX2). It writes contiguous NCHW, so the crop below is a plain copy of rows: the
            # whole method takes 0.63 ms per image against 0.91 when it cropped to HWC with a
            # transposing copy (median of 7 alternating runs, 24 intel-scenes photos, AVX2).
            x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None]
            if (new_h, new_w) != tuple(x.shape[-2:]):
                x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode=self.interpolation,
                                                    antialias=True, align_corners=False)
            return x[0, :, top:top + c, left:left + c].contiguous()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scales a uint8 batch to [0, 1] and normalizes it.

        Args:
            pixels: uint8 [N, 3, H, W], as stacked from ``pixels``.

        Returns:
            float32 [N, 3, H, W], contiguous (NCHW). Broadcast over NCHW the multiply-add runs
            in long inner rows: 0.10 ms per 224 px image, against 0.24 over NHWC (3 values per
            row) plus 0.08 for the NCHW copy ONNX Runtime then needed (2 threads, AVX2; same
            runs as ``pixels``).
        """
        scale, shift = self._scale.to(pixels.device), self._shift.to(pixels.device)
        return torch.addcmul(shift, pixels.to(torch.float32), scale)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Transforms an RGB PIL image (the per-image form, for datasets and the predict CLI).

        Returns:
            float32 tensor [3, crop_size, crop_size], normalized, contiguous.
        """
        return self.normalize(self.pixels(img)[None])[0].contiguous()

    def load_pixels(self, data: bytes, budget: DecodeBudget = DEFAULT_DECODE_BUDGET) -> torch.Tensor:
        """Decodes bytes (held to ``budget``) and resizes/crops them: the per-request half of
        the handler's path.

        Returns:
            uint8 tensor [3, crop_size, crop_size]; ``normalize(torch.stack(...))`` finishes it.

        Raises:
            DecodeError, ImageTooLargeError: see ``decode_image``.
        """
        return self.pixels(decode_image(data, draft_size=self.resize_size, budget=budget))

    def load(self, data: bytes) -> torch.Tensor:
        """Decodes bytes and transforms them: the one bytes -> model-input path.

        Returns:
            float32 tensor [3, crop_size, crop_size].

        Raises:
            DecodeError, ImageTooLargeError: see ``decode_image``.
        """
        return self(decode_image(data, draft_size=self.resize_size))
