import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_PREPROCESSING, encode, scan_bomb, scene
from handler.preprocessing import (DecodeError, EvalTransform, ImageTooLargeError,
                                   decode_image)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("fmt,kw", [("JPEG", {}), ("PNG", {}), ("WEBP", {"lossless": True}),
                                    ("BMP", {}), ("GIF", {}), ("TIFF", {})])
def test_decodes_supported_formats_to_rgb(fmt, kw):
    src = scene(64, 48, seed=3)
    img = decode_image(encode(src, fmt, **kw))
    assert img.mode == "RGB" and img.size == (64, 48)
    if fmt in ("PNG", "WEBP", "BMP", "TIFF"):  # lossless: pixels survive exactly
        assert np.array_equal(np.asarray(img), np.asarray(src))


def test_gif_first_frame_is_used():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    px = decode_image(data).getpixel((4, 4))
    assert px[0] > 200 and px[2] < 50


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "1"])
def test_modes_convert_to_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert decode_image(encode(scene(32, 32).convert(mode), fmt)).mode == "RGB"


def test_transparent_pixels_composite_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(encode(img, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_16bit_grayscale_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    assert decode_image(encode(img, "PNG")).getpixel((0, 0)) == (128, 128, 128)


def _png_header_only(width, height):
    """A PNG whose IHDR declares width x height (no pixel data needed to trip the guard)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_with_413():
    assert Image.MAX_IMAGE_PIXELS is not None  # the guard stays on
    with pytest.raises(ImageTooLargeError) as err:
        decode_image(_png_header_only(50000, 50000))
    assert err.value.status == 413
    # Between MAX_IMAGE_PIXELS and twice that PIL only warns; we refuse those too.
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    with pytest.raises(ImageTooLargeError):
        decode_image(_png_header_only(side, side))


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"hello, this is text named photo.jpg", "cannot identify"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "cannot identify"),
    (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "cannot identify"),
])
def test_non_images_raise_decode_error(data, match):
    with pytest.raises(DecodeError, match=match) as err:
        decode_image(data)
    assert err.value.status == 400
    assert err.value.to_json()["type"] == "undecodable"


def test_truncated_jpeg_raises_decode_error(jpeg_bytes):
    with pytest.raises(DecodeError, match="truncated|corrupt"):
        decode_image(jpeg_bytes[: len(jpeg_bytes) // 2])


def test_jpeg_draft_decodes_large_photos_at_reduced_scale():
    data = encode(scene(1600, 1200), "JPEG")
    assert decode_image(data).size == (1600, 1200)
    small = decode_image(data, draft_size=256)
    assert small.size == (400, 300)  # 1/4 scale keeps the shorter side >= 256


def test_eval_transform_shape_dtype_and_normalization():
    tf = EvalTransform.from_dict(TINY_PREPROCESSING)
    x = tf(Image.new("RGB", (100, 80), (124, 116, 104)))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    expected = (torch.tensor([124, 116, 104]) / 255 - torch.tensor(tf.mean)) / torch.tensor(tf.std)
    assert torch.allclose(x[:, 32, 32], expected, atol=1e-5)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_transform_pixels_match_torchvision_resize_then_crop(interpolation):
    """One resample of the crop box == torchvision's Resize + CenterCrop, up to 8-bit rounding."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F
    tf = EvalTransform(crop_size=224, resize_size=256, interpolation=interpolation)
    for w, h in [(150, 150), (640, 480), (480, 640), (286, 1010), (99, 536), (1200, 300),
                 (256, 256), (300, 256), (257, 1000)]:
        img = scene(w, h, seed=w + h)
        ref = F.center_crop(F.resize(img, [256], interpolation=InterpolationMode(interpolation),
                                     antialias=True), [224, 224])
        ours = tf.pixels(img)
        assert ours.shape == (3, 224, 224) and ours.dtype == torch.uint8 and ours.is_contiguous()
        diff = (ours.permute(1, 2, 0).int() - torch.from_numpy(np.array(ref)).int()).abs()
        assert diff.float().mean() < 0.01 and diff.max() <= 4, (w, h, diff.max())


def test_normalize_is_contiguous_nchw_and_per_image_equals_batched():
    tf = EvalTransform.from_dict(TINY_PREPROCESSING)
    pixels = torch.stack([tf.pixels(scene(100 + 10 * s, 80, seed=s)) for s in range(3)])
    batch = tf.normalize(pixels)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.float32
    assert batch.is_contiguous()  # what ONNX Runtime reads without a copy
    expected = (pixels.float() / 255 - torch.tensor(tf.mean).view(1, 3, 1, 1)) \
        / torch.tensor(tf.std).view(1, 3, 1, 1)
    assert torch.allclose(batch, expected, atol=1e-5)
    assert torch.equal(tf(scene(110, 80, seed=1)), batch[1])


def test_eval_transform_keeps_aspect_ratio():
    tf = EvalTransform(crop_size=8, resize_size=8)
    img = Image.new("RGB", (32, 8))
    img.paste((255, 0, 0), (0, 0, 12, 8))  # red left part is outside the center crop
    x = tf(img)
    assert x.shape == (3, 8, 8)
    assert torch.all(x[0] < 0)  # no red left: shorter-side resize + crop, not a squash


@pytest.mark.parametrize("cfg", [{"crop_size": 224, "resize_size": 200}, {"bogus": 1},
                                 {"interpolation": "cubic-ish"}, {"mean": [0.5, 0.5]}])
def test_eval_transform_rejects_bad_config(cfg):
    with pytest.raises(ValueError):
        EvalTransform.from_dict(cfg)


def test_transform_settings_round_trip():
    tf = EvalTransform.from_dict(TINY_PREPROCESSING)
    assert EvalTransform.from_dict(tf.to_dict()) == tf


def test_jpeg_scans_are_counted_by_walking_the_markers():
    from handler.preprocessing import jpeg_scan_count
    assert jpeg_scan_count(encode(scene())) == 1  # baseline
    assert jpeg_scan_count(encode(scene(), "JPEG", progressive=True)) == 10  # libjpeg's script
    assert jpeg_scan_count(encode(scene(mode="L"), "JPEG", progressive=True)) == 6
    assert jpeg_scan_count(scan_bomb((64, 64), 100)) == 106
    assert jpeg_scan_count(scan_bomb((64, 64), 100), stop_after=33) == 33  # the budget's early stop
    # SOS bytes inside an APP segment (an EXIF thumbnail's) are not scans of the image
    plain = encode(scene())
    app15 = b"\xff\xef" + (2 + 20).to_bytes(2, "big") + b"\xff\xda" * 10
    assert jpeg_scan_count(plain[:2] + app15 + plain[2:]) == 1
    assert jpeg_scan_count(plain[:100]) <= 1  # truncated: no crash


def test_a_progressive_scan_bomb_is_refused_before_decoding():
    """~720 KB, 3006 scans over 9000 x 9000 px: it kept a worker busy 120 s; now a 413 naming
    the limit, after a marker walk of a few ms. Normal progressive photos still decode."""
    import time

    from handler.preprocessing import DecodeBudget, decode_image
    bomb = scan_bomb()
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match=r"more than 32 scans: over the decode budget of 32 scans") as err:
        decode_image(bomb, draft_size=256)
    print(f"\n[scan bomb] {len(bomb)} bytes refused in {1000 * (time.perf_counter() - start):.1f} ms")
    assert err.value.status == 413
    # within the scan count, over the scans x pixels budget: 30 scans of 6000 x 6000 x 3
    with pytest.raises(ImageTooLargeError, match="3240 megapixel passes"):
        decode_image(scan_bomb((6000, 6000), 20, "RGB"), draft_size=256)
    assert decode_image(encode(scene(400, 300), "JPEG", progressive=True)).size == (400, 300)
    with pytest.raises(ImageTooLargeError, match="max_jpeg_scans"):
        decode_image(encode(scene(), "JPEG", progressive=True), budget=DecodeBudget(max_jpeg_scans=4))


def test_per_image_work_runs_on_one_thread_and_restores_the_count(monkeypatch):
    from handler.preprocessing import intra_op_threads
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError):
            with intra_op_threads(1):
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        seen = []
        resize = torch.nn.functional.interpolate

        def recording(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return resize(*args, **kwargs)
        monkeypatch.setattr(torch.nn.functional, "interpolate", recording)
        tf = EvalTransform(crop_size=64, resize_size=73, interpolation="bicubic")
        assert tf.pixels(scene(150, 120, seed=3)).shape == (3, 64, 64)
        assert seen == [1]  # the resize ran on one thread
        assert torch.get_num_threads() == 2  # the worker's forward pass keeps its threads
    finally:
        torch.set_num_threads(before)
