"""Image decoding to RGB and CLIP-style train/eval transforms (Pillow + numpy, no torch).

* ``load_rgb(bytes_or_path)`` decodes any Pillow-readable image to an 8-bit RGB ``PIL.Image``:
  grayscale/1-bit/CMYK/YCbCr/LAB/HSV are converted; 16-bit and 32-bit integer images are scaled to
  8 bits (not clipped); images with transparency (``RGBA``, ``LA``, ``PA``, palette with a
  transparent colour) are **composited on white** (configurable ``background``): dropping alpha would
  expose whatever colour the encoder stored under transparent pixels (often black), while white is
  what a viewer shows for a logo or product photo. Anything else raises ``DecodeError``.
* Decompression bombs: ``max_pixels`` (default 2**28 ~ 268 Mpx) is checked on the header before any
  pixel is decoded; it replaces Pillow's own limit (``Image.MAX_IMAGE_PIXELS``, lifted while opening).
* ``train_transform``: random resized crop (area scale range default (0.9, 1.0), aspect ratio
  (3/4, 4/3), bicubic). The default follows open_clip's CLIP recipe: at web scale the captions, not
  heavy cropping, provide the variety, and small crops often cut away what the caption describes.
  Pass ``crop_scale=(0.08, 1.0)`` for the Inception-style augmentation of supervised training.
* ``eval_transform``: resize shortest side to ``size`` (bicubic) + centre crop, as CLIP; with
  ``resize_size`` > ``size``, resize the shortest side to ``resize_size`` and centre crop ``size`` (the
  "resize 256, crop 224" evaluation), as one box resize: the centred square of side
  ``min(w, h) * size / resize_size`` resampled to ``size`` (offsets floored).

Speed: colour JPEGs given as bytes take the fast path when simplejpeg and OpenCV are installed and
``HETCLIP_JPEG_DECODER`` is not ``pillow``: the header gives the size (pixel limit, crop box), simplejpeg
(libjpeg-turbo) decodes at a reduced scale (DCT-domain downscaling, 1/2, 1/4 or 1/8) whenever the crop
still covers at least ``size`` pixels on each side, the crop box is rounded to whole pixels of the decoded
image and only the crop is resampled, with OpenCV's SIMD bicubic (``cv2.resize``, ``INTER_CUBIC``) written
straight into the caller's array (``out=``, e.g. a row of a shared-memory batch). When the crop is larger than
``size`` it is first low-passed with a Gaussian of sigma ``sqrt(f**2 - 1) / 2`` pixels (``f`` the reduction
on that axis), the antialiasing that Pillow's bicubic gets from its widened kernel. On the benchmark's photos
this path takes a third of the CPU of Pillow's on 224-px JPEGs (half on 400-600-px ones, where decoding dominates)
and its pixels differ from Pillow's by 0.5 (224 px) and 1.6 (400-600 px) levels on average, at most 23 and
111 at sharp edges (``bench/results/data_*.md``). Anything else (PNG, grayscale or CMYK JPEG,
a JPEG simplejpeg rejects, no OpenCV) goes through Pillow: decode (JPEG at the same DCT-domain scales) and
crop + resize as one bicubic ``Image.resize(box=...)`` call.
``normalize`` multiplies row-long runs (``width * 3`` values) by a tiled per-channel scale instead of
broadcasting over a last axis of 3, so numpy's inner loop is long and contiguous: bit-identical to
``astype`` + broadcast and 2.2-3.2x faster on 64-224 px crops (``git show f52f245:bench/results/data.md``).
"""

from __future__ import annotations

import io
import math
import os
import random
import threading
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # libjpeg-turbo with its own wheel (Linux, macOS, Windows); Pillow is the fallback
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the platform
    _simplejpeg = None
try:  # SIMD resampling for the JPEG fast path; Pillow's resize is the fallback
    import cv2 as _cv2
except ImportError:  # pragma: no cover - depends on the platform
    _cv2 = None
if os.environ.get("HETCLIP_JPEG_DECODER", "").lower() == "pillow":
    _simplejpeg = None

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 1 << 28
DEFAULT_CROP_SCALE = (0.9, 1.0)
DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)
WHITE = (255, 255, 255)

_PASS_MODES = {"RGB"}
_CONVERT_MODES = {"L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}


class DecodeError(ValueError):
    """An image that cannot be used; ``reason`` is a short tag (``corrupt_image``, ``bomb``, ``mode``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_PILLOW_LIMIT = threading.Lock()


def _open_without_pillow_limit(fp) -> Image.Image:
    """``Image.open`` with Pillow's own pixel limit (``Image.MAX_IMAGE_PIXELS``, a module global read while
    opening) lifted for this call only: ``max_pixels`` is the one limit."""
    with _PILLOW_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(fp)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def open_image(src: bytes | str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (header only) and check the pixel count; pixels are decoded later, lazily."""
    try:
        img = _open_without_pillow_limit(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src)
    except UnidentifiedImageError:
        raise DecodeError("corrupt_image", "cannot identify image: not in a format Pillow reads") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DecodeError("corrupt_image", f"cannot identify image: {e}") from None
    try:
        check_size(*img.size, max_pixels)
    except DecodeError:
        img.close()
        raise
    return img


def check_size(w: int, h: int, max_pixels: int | None) -> None:
    """``DecodeError`` for an image over ``max_pixels`` (``bomb``) or without pixels."""
    if max_pixels is not None and w * h > max_pixels:
        raise DecodeError("bomb", f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                                  "(possible decompression bomb; raise max_pixels to allow it)")
    if w < 1 or h < 1:
        raise DecodeError("corrupt_image", f"image has size {w}x{h}")


def to_rgb(img: Image.Image, *, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert a decoded image to 8-bit RGB (see module docstring for the rules)."""
    mode = img.mode
    try:
        if mode in _PASS_MODES:
            return img
        if mode in _CONVERT_MODES:
            return img.convert("RGB")
        if mode == "P":
            if "transparency" in img.info:
                return to_rgb(img.convert("RGBA"), background=background)
            return img.convert("RGB")
        if mode in _ALPHA_MODES:
            rgba = img.convert("RGBA")
            base = Image.new("RGBA", rgba.size, (*background, 255))
            return Image.alpha_composite(base, rgba).convert("RGB")
        if mode.startswith("I;16") or mode in ("I", "F"):
            a = np.asarray(img)
            if mode.startswith("I;16"):
                a8 = (a.astype(np.uint32) >> 8).astype(np.uint8)
            elif mode == "I":
                top = 65535 if a.max(initial=0) > 255 else 255
                a8 = (np.clip(a, 0, top).astype(np.float64) * (255.0 / top) + 0.5).astype(np.uint8)
            else:
                a8 = np.clip(a, 0, 255).astype(np.uint8)
            return Image.fromarray(a8, "L").convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise DecodeError("corrupt_image", f"cannot decode {mode} image: {e}") from None
    raise DecodeError("mode", f"image mode {mode!r} cannot be converted to RGB")


def load_rgb(src: bytes | str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             background: tuple[int, int, int] = WHITE, draft_size: int | None = None) -> Image.Image:
    """Decode ``src`` (encoded bytes or a path) to an RGB image (``DecodeError`` if unusable).

    ``draft_size``: allow JPEG decoding at a reduced scale keeping the shortest side >= draft_size.
    """
    img = open_image(src, max_pixels=max_pixels)
    try:
        if draft_size:
            _draft(img, (0, 0) + img.size, draft_size)
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        img.close()
        raise DecodeError("corrupt_image", f"cannot decode image: {e}") from None
    return to_rgb(img, background=background)


def _draft(img: Image.Image, box: tuple[float, float, float, float], size: int) -> tuple[float, ...]:
    """JPEG draft so that the ``box`` region still has >= ``size`` pixels per side; returns scaled box."""
    if img.format != "JPEG":
        return box
    w, h = img.size
    bw, bh = box[2] - box[0], box[3] - box[1]
    factor = min(bw, bh) / float(size)
    if factor < 2:
        return box
    req = (int(math.ceil(w / factor)), int(math.ceil(h / factor)))
    img.draft("RGB" if img.mode in ("RGB", "YCbCr") else img.mode, req)
    sx, sy = img.size[0] / w, img.size[1] / h
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def random_resized_crop_box(width: int, height: int, rng: random.Random, *,
                            scale: tuple[float, float] = DEFAULT_CROP_SCALE,
                            ratio: tuple[float, float] = DEFAULT_CROP_RATIO) -> tuple[int, int, int, int]:
    """Crop box (left, top, right, bottom) of an Inception-style random resized crop.

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); 10 attempts, then the largest
    centred crop within the ratio range (torchvision's rule).
    """
    area = width * height
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(lo, hi))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            x = rng.randint(0, width - w)
            y = rng.randint(0, height - h)
            return x, y, x + w, y + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def centre_crop_box(width: int, height: int, fraction: float = 1.0) -> tuple[float, float, float, float]:
    """The centred square of side ``min(width, height) * fraction`` (offsets floored).

    ``fraction = size / resize_size``: resize-shortest-side + centre-crop as one box. With the default 1
    the box is integral (``(x, y, x + s, y + s)``).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"centre crop fraction must be in (0, 1], got {fraction}")
    s = min(width, height)
    if fraction != 1:
        side = s * fraction
        x, y = (width - side) // 2, (height - side) // 2
        return x, y, x + side, y + side
    x, y = (width - s) // 2, (height - s) // 2
    return x, y, x + s, y + s


def jpeg_decoder() -> str:
    """The decoder used for colour JPEG bytes: ``"simplejpeg"`` or ``"pillow"``."""
    return "pillow" if _simplejpeg is None else "simplejpeg"


def _simplejpeg_rgb(data: bytes, img: Image.Image, box: tuple[float, ...], size: int):
    """(RGB image, box scaled to it) from simplejpeg, or None to let Pillow decode."""
    decoded = _decode_scaled(data, *img.size, box, size)
    return None if decoded is None else (Image.fromarray(decoded[0], "RGB"), decoded[1])


def _decode_scaled(data: Any, w: int, h: int, box: tuple[float, ...], size: int):
    """(RGB array decoded by simplejpeg at the DCT-domain scale the box allows, the box scaled to it), or None
    when simplejpeg rejects the data (corrupt or unusual: Pillow then decodes it or names the error)."""
    scale = _dct_scale(w, h, box, size)
    try:
        arr = _simplejpeg.decode_jpeg(data, "RGB", min_height=-(-h // scale) if scale > 1 else 0,
                                      min_width=-(-w // scale) if scale > 1 else 0)
    except ValueError:
        return None
    sx, sy = arr.shape[1] / w, arr.shape[0] / h
    return arr, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _dct_scale(w: int, h: int, box: tuple[float, ...], size: int) -> int:
    """The largest of 1/8, 1/4, 1/2 (as 8, 4, 2; 1: full size) keeping ``size`` pixels across the box
    (Pillow's draft rule)."""
    factor = min(box[2] - box[0], box[3] - box[1]) / float(size)
    if factor < 2:
        return 1
    req_w, req_h = int(math.ceil(w / factor)), int(math.ceil(h / factor))
    return next(a for a in (8, 4, 2, 1) if min(w // req_w, h // req_h) >= a)


def resample(image: np.ndarray, box: tuple[float, ...], size: int, out: np.ndarray | None = None) -> np.ndarray:
    """The ``box`` of a uint8 ``[H, W, 3]`` array resampled to ``[size, size, 3]`` with OpenCV's bicubic: the
    box rounded to whole pixels, a Gaussian low-pass (sigma ``sqrt(f**2 - 1) / 2``) on an axis reduced by
    ``f > 1``; written into ``out`` when given."""
    h, w = image.shape[:2]
    x0, y0 = min(w - 1, max(0, int(round(box[0])))), min(h - 1, max(0, int(round(box[1]))))
    x1, y1 = max(x0 + 1, min(w, int(round(box[2])))), max(y0 + 1, min(h, int(round(box[3]))))
    crop = image[y0:y1, x0:x1]
    fx, fy = (x1 - x0) / size, (y1 - y0) / size
    if fx > 1 or fy > 1:
        crop = _cv2.GaussianBlur(crop, (0, 0), sigmaX=max(0.5 * math.sqrt(max(fx * fx - 1, 0.0)), 1e-3),
                                 sigmaY=max(0.5 * math.sqrt(max(fy * fy - 1, 0.0)), 1e-3),
                                 borderType=_cv2.BORDER_REPLICATE)
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    _cv2.resize(crop, (size, size), dst=out, interpolation=_cv2.INTER_CUBIC)
    return out


def fast_path() -> bool:
    """Whether colour JPEG bytes take the simplejpeg + OpenCV path (else Pillow decodes and resamples)."""
    return _simplejpeg is not None and _cv2 is not None


def _fast_jpeg(data: Any, size: int, box_of: Any, max_pixels: int | None, out: np.ndarray | None):
    """The fast path's crop of colour JPEG bytes, or None to let Pillow decode (not a colour JPEG, or one
    simplejpeg rejects: Pillow then decodes it or names the error)."""
    if not fast_path() or bytes(data[:2]) != b"\xff\xd8":
        return None
    try:
        h, w, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "RGB"):
        return None
    check_size(w, h, max_pixels)
    decoded = _decode_scaled(data, w, h, box_of(w, h), size)
    return None if decoded is None else resample(*decoded, size, out)


def _into(out: np.ndarray | None, image: Image.Image) -> np.ndarray:
    if out is None:
        return np.asarray(image, dtype=np.uint8)
    out[...] = np.asarray(image, dtype=np.uint8)
    return out


def _crop_resize(img: Image.Image, box: tuple[float, ...], size: int, background: tuple[int, int, int],
                 data: Any = None, out: np.ndarray | None = None) -> np.ndarray:
    if data is not None and _simplejpeg is not None and img.format == "JPEG" and img.mode == "RGB":
        fast = _simplejpeg_rgb(bytes(data), img, box, size)
        if fast is not None:
            img.close()
            return _into(out, fast[0].resize((size, size), Image.Resampling.BICUBIC, box=fast[1]))
    box = _draft(img, box, size)
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        img.close()
        raise DecodeError("corrupt_image", f"cannot decode image: {e}") from None
    rgb = to_rgb(img, background=background)
    return _into(out, rgb.resize((size, size), Image.Resampling.BICUBIC, box=box))


def train_transform_uint8(src: bytes | str | os.PathLike | Image.Image, size: int, rng: random.Random, *,
                          scale: tuple[float, float] = DEFAULT_CROP_SCALE,
                          ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
                          max_pixels: int | None = DEFAULT_MAX_PIXELS,
                          background: tuple[int, int, int] = WHITE, out: np.ndarray | None = None) -> np.ndarray:
    """Random resized crop to ``size`` x ``size``: uint8 [size, size, 3] (written into ``out`` when given)."""
    box_of = _once(lambda w, h: random_resized_crop_box(w, h, rng, scale=scale, ratio=ratio))

    data = _bytes_or_none(src)
    if data is not None:
        fast = _fast_jpeg(data, size, box_of, max_pixels, out)
        if fast is not None:
            return fast
    img = src if isinstance(src, Image.Image) else open_image(src, max_pixels=max_pixels)
    return _crop_resize(img, box_of(*img.size), size, background, data, out)


def eval_transform_uint8(src: bytes | str | os.PathLike | Image.Image, size: int, *,
                         resize_size: int | None = None,
                         max_pixels: int | None = DEFAULT_MAX_PIXELS,
                         background: tuple[int, int, int] = WHITE, out: np.ndarray | None = None) -> np.ndarray:
    """Resize shortest side to ``resize_size`` (default ``size``; bicubic) and centre crop ``size``:
    uint8 [size, size, 3] (written into ``out`` when given)."""
    short = int(resize_size) if resize_size is not None else int(size)
    if short < size:
        raise ValueError(f"resize_size {short} is smaller than the crop size {size}")
    box_of = _once(lambda w, h: centre_crop_box(w, h, size / short))

    data = _bytes_or_none(src)
    if data is not None:
        fast = _fast_jpeg(data, size, box_of, max_pixels, out)
        if fast is not None:
            return fast
    img = src if isinstance(src, Image.Image) else open_image(src, max_pixels=max_pixels)
    return _crop_resize(img, box_of(*img.size), size, background, data, out)


def _once(box_of: Any) -> Any:
    """``box_of`` computed once: a JPEG the fast path gives up on after drawing its random box keeps that box."""
    memo: list = []

    def get(w: int, h: int) -> tuple:
        if not memo:
            memo.append(box_of(w, h))
        return memo[0]
    return get


def _bytes_or_none(src: Any) -> Any:
    return src if isinstance(src, (bytes, bytearray, memoryview)) else None


# float32(x) * NORM_SCALE - NORM_SHIFT == (x / 255 - CLIP_MEAN) / CLIP_STD (host and device use these).
NORM_SCALE = (1.0 / (255.0 * np.asarray(CLIP_STD, np.float64))).astype(np.float32)
NORM_SHIFT = (np.asarray(CLIP_MEAN, np.float64) / np.asarray(CLIP_STD, np.float64)).astype(np.float32)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 ``(x / 255 - CLIP_MEAN) / CLIP_STD``.

    Computed as ``float32(x) * (1 / (255 std)) - mean / std`` in float32 (one rounding per operation).
    """
    images = np.asarray(images)
    if images.ndim == 0 or images.shape[-1] != 3:
        raise ValueError(f"normalize expects [..., 3] RGB values, got shape {images.shape}")
    run = 3 * (images.shape[-2] if images.ndim >= 2 else 1)
    if images.size == 0 or run == 0:
        return images.astype(np.float32)
    reps = run // 3
    out = np.multiply(images.reshape(-1, run), np.tile(NORM_SCALE, reps), dtype=np.float32, casting="unsafe")
    out -= np.tile(NORM_SHIFT, reps)
    return out.reshape(images.shape)


def train_transform(src: Any, size: int, rng: random.Random, **kw: Any) -> np.ndarray:
    """Random resized crop + CLIP normalisation: float32 [size, size, 3]."""
    return normalize(train_transform_uint8(src, size, rng, **kw))


def eval_transform(img: Any, size: int, **kw: Any) -> np.ndarray:
    """Resize shortest side (to ``resize_size=``, default ``size``) + centre crop + CLIP normalisation:
    float32 [size, size, 3].

    ``img`` may be a PIL image (any mode), encoded bytes or a path.
    """
    return normalize(eval_transform_uint8(img, size, **kw))
