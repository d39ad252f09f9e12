"""Robust image decoding: any bytes in, an RGB image or a readable error out — never an exception.

Handles what real photo collections contain: EXIF orientation (applied), palette / LA / RGBA / CMYK /
16-bit / 32-bit / float / 1-bit / grayscale modes (all become 8-bit RGB; transparency is composited on
white), animated images (first frame), decompression bombs (refused above ``max_pixels`` before any
pixel is decoded, without touching PIL's process-wide ``Image.MAX_IMAGE_PIXELS``), and truncated,
zero-byte and non-image files (error messages, not crashes).
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own bomb threshold (about 0.25 GB of 24-bit pixels)

# Our own ``max_pixels`` decides what is too large. PIL's process-wide ``Image.MAX_IMAGE_PIXELS`` is left as
# it is (other code in the process may rely on it): its warning is silenced locally, and when its error
# refuses an image, the header is parsed again without it (see _open_unchecked) and max_pixels decides.


@dataclass(frozen=True)
class Decoded:
    """The result of :func:`decode_image`: exactly one of ``image`` and ``error`` is set."""

    image: Image.Image | None
    error: str | None

    @property
    def ok(self) -> bool:
        """Whether decoding succeeded."""
        return self.error is None


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float images into 8 bits using their own range."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        scaled = arr / 257.0  # 16-bit: 65535 → 255, whatever the image's own range
    elif img.mode == "I" and arr.min(initial=0) >= 0 and arr.max(initial=0) <= 65535:
        scaled = arr / 257.0 if arr.max(initial=0) > 255 else arr  # 32-bit container of 8- or 16-bit data
    else:
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    gray = Image.fromarray(np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8), mode="L")
    return gray.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any PIL mode to 8-bit RGB (transparency composited on white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        has_alpha = "transparency" in img.info
        return _composite_on_white(img) if has_alpha else img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img)
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(img)
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _open_unchecked(data: bytes) -> Image.Image:
    """``Image.open`` without PIL's global bomb check: the first format plugin that accepts the header.

    Used only after PIL's check refused an image that our own ``max_pixels`` allows; nothing is decoded
    here (plugins read the header only), so the caller's size check still runs before any pixel is.
    """
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and accept(data[:16]) is not True:
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    raise UnidentifiedImageError("cannot identify image file")


def _open(data: bytes) -> Image.Image:
    """Open (header only); when PIL's global bomb check refuses, re-read the header so ``max_pixels`` decides."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return _open_unchecked(data)


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Decoded:
    """Decode image bytes to an 8-bit RGB PIL image with EXIF orientation applied.

    Args:
        data: The raw file bytes (None or empty gives an error result).
        max_pixels: Images with more pixels than this are refused before decoding (bombs).
        draft_size: When set, JPEGs are decoded at a reduced DCT scale whose shorter side stays at
            least this many pixels (much faster for large photos that are resized afterwards).

    Returns:
        A :class:`Decoded` holding the image, or an error message such as ``"empty file (0 bytes)"``,
        ``"not an image: cannot identify image file"`` or ``"truncated image: ..."``.
    """
    if not data:
        return Decoded(None, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, just below
            img = _open(data)
            width, height = img.size
            if width * height > max_pixels:
                return Decoded(
                    None, f"image too large: {width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
                )
            if getattr(img, "is_animated", False):
                img.seek(0)
            if draft_size and img.format == "JPEG":
                scale = min(width, height) / draft_size
                if scale >= 2:
                    img.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return Decoded(to_rgb(img), None)
    except UnidentifiedImageError:
        return Decoded(None, "not an image: unknown or unsupported image format")
    except (OSError, SyntaxError) as exc:
        message = str(exc)
        lowered = message.lower()
        kind = "truncated image" if "truncated" in lowered or "broken data stream" in lowered else "corrupt image"
        return Decoded(None, f"{kind}: {message}")
    except Image.DecompressionBombError as exc:
        return Decoded(None, f"image too large: {exc} (max_pixels {max_pixels})")
    except Exception as exc:  # noqa: BLE001 - no input file may crash a job; record what happened
        return Decoded(None, f"undecodable image: {type(exc).__name__}: {exc}")
