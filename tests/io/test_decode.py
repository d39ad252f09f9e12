"""Tests for :mod:`cskd_ray.io.decode`: every mode to RGB, orientation, bombs, broken files, fuzzing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cskd_ray.io.decode import DEFAULT_MAX_PIXELS, Decoded, decode_image, to_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def pixels(data: bytes, **kwargs) -> np.ndarray:
    decoded = decode_image(data, **kwargs)
    assert decoded.ok and decoded.error is None, decoded.error
    assert decoded.image is not None and decoded.image.mode == "RGB"
    arr = np.asarray(decoded.image)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr


def close(actual: np.ndarray, expected: tuple[int, int, int], tol: int = 6) -> bool:
    return bool(np.all(np.abs(actual.astype(int) - np.array(expected)) <= tol))


def png_with_size(width: int, height: int) -> bytes:
    """A valid 4x4 PNG whose header claims another size (pixel data is then short: nothing is allocated)."""
    png = encode(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG")
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)), "JPEG", quality=90)


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize(
    ("orientation", "size", "corner"),
    [
        (1, (40, 20), "top_left"),
        (3, (40, 20), "bottom_right"),  # rotated 180
        (6, (20, 40), "top_right"),  # rotate 90 clockwise to display
        (8, (20, 40), "bottom_left"),  # rotate 90 counter-clockwise to display
    ],
)
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int], corner: str) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:] = BLUE
    arr[:8, :8] = RED  # mark the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data)
    assert decoded.image is not None and decoded.image.size == size
    out = np.asarray(decoded.image)
    corners = {
        "top_left": out[2, 2],
        "top_right": out[2, -3],
        "bottom_left": out[-3, 2],
        "bottom_right": out[-3, -3],
    }
    for name, value in corners.items():
        assert close(value, RED if name == corner else BLUE), (name, value)


# ---------------------------------------------------------------- modes


def _palette_image() -> Image.Image:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([*RED, *BLUE] + [0] * 762)
    img.putpixel((0, 0), 1)
    return img


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_palette_without_transparency(fmt: str) -> None:
    data = encode(_palette_image(), fmt)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = pixels(data)
    assert tuple(out[0, 0]) == BLUE and tuple(out[0, 1]) == RED and tuple(out[3, 3]) == RED


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_composited_on_white(fmt: str) -> None:
    data = encode(_palette_image(), fmt, transparency=0)
    out = pixels(data)
    assert tuple(out[0, 0]) == BLUE
    assert tuple(out[0, 1]) == WHITE and tuple(out[3, 3]) == WHITE


def test_la_is_composited_on_white() -> None:
    la = np.array([[[100, 255], [100, 0], [100, 128]]], dtype=np.uint8)
    data = encode(Image.fromarray(la, "LA"), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    out = pixels(data)
    assert out[0].tolist() == [[100, 100, 100], [255, 255, 255], [177, 177, 177]]


def test_rgba_is_composited_on_white() -> None:
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    out = pixels(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out[0].tolist() == [[10, 20, 30], [255, 255, 255], [127, 127, 127]]


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = pixels(data)
    assert close(out[4, 4], RED, tol=3)


def test_16_bit_grayscale_png_is_scaled_to_8_bits() -> None:
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = pixels(data)
    assert out[0, :, 0].tolist() == [0, 1, 127, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_dark_16_bit_png_is_scaled_like_any_16_bit_png() -> None:
    arr = np.array([[0, 200, 255 * 257]], dtype=np.uint16)
    bright = pixels(encode(Image.fromarray(arr), "PNG"))
    dark = pixels(encode(Image.fromarray(arr[:, :2].copy()), "PNG"))
    assert bright[0, 1, 0] == 0  # 200/257 → 0 in the image that also holds a bright pixel
    assert dark[0, 1, 0] == bright[0, 1, 0]  # the same 16-bit value must give the same 8-bit value


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 32768, 65535], [0, 127, 255]),  # non-negative ints up to 65535: 16-bit scale
        ([0, 1000, 65535], [0, 3, 255]),
        ([-100, 0, 100], [0, 127, 255]),  # other ranges: min-max
        ([0, 70000, 140000], [0, 127, 255]),
        ([5, 5, 5], [5, 5, 5]),
    ],
)
def test_mode_i_tiff(values: list[int], expected: list[int]) -> None:
    data = encode(Image.fromarray(np.array([values], dtype=np.int32), "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert pixels(data)[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0, 2.0], [0, 63, 127, 255]),
        ([-1.0, 0.0, 1.0, 1.0], [0, 127, 255, 255]),
        ([3.5, 3.5, 3.5, 3.5], [0, 0, 0, 0]),  # flat image: no range, black
    ],
)
def test_mode_f_tiff(values: list[float], expected: list[int]) -> None:
    data = encode(Image.fromarray(np.array([values], dtype=np.float32), "F"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = pixels(data)
    assert out[0, :, 0].tolist() == expected
    assert (out[..., 0] == out[..., 2]).all()


def test_float_image_with_nan_does_not_break() -> None:
    img = Image.fromarray(np.array([[np.nan, 0.0, 1.0]], dtype=np.float32), "F")
    out = np.asarray(to_rgb(img))
    assert out.dtype == np.uint8 and out[0, :, 0].tolist() == [0, 0, 255]


def test_one_bit_image() -> None:
    img = Image.new("1", (3, 1), 0)
    img.putpixel((1, 0), 1)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    assert pixels(data)[0].tolist() == [[0, 0, 0], [255, 255, 255], [0, 0, 0]]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP", "WEBP"])
def test_grayscale_l(fmt: str) -> None:
    img = Image.fromarray(np.full((8, 8), 77, dtype=np.uint8))
    out = pixels(encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert out.shape == (8, 8, 3)
    assert close(out[4, 4], (77, 77, 77), tol=1)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP", "WEBP"])
def test_rgb_formats_keep_size_and_colour(fmt: str) -> None:
    img = Image.new("RGB", (17, 9), (200, 100, 50))
    out = pixels(encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert out.shape == (9, 17, 3)
    assert close(out[4, 8], (200, 100, 50), tol=4)


@pytest.mark.parametrize(
    "mode", ["RGB", "RGBA", "LA", "PA", "P", "L", "1", "CMYK", "YCbCr", "I", "I;16", "F", "LAB", "HSV"]
)
def test_to_rgb_handles_every_mode(mode: str) -> None:
    out = to_rgb(Image.new(mode, (5, 3)))
    assert out.mode == "RGB" and out.size == (5, 3)
    assert np.asarray(out).dtype == np.uint8


# ---------------------------------------------------------------- animation


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_gives_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(0, 255, 0), RED, BLUE]]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **extra)
    assert Image.open(io.BytesIO(data)).is_animated
    out = pixels(data)
    assert tuple(out[4, 4]) == (0, 255, 0)


# ---------------------------------------------------------------- bombs


def test_pil_global_bomb_limit_is_left_alone() -> None:
    """Importing the decoder must not change PIL's process-wide setting that other code relies on."""
    import subprocess
    import sys

    code = (
        "from PIL import Image; before = Image.MAX_IMAGE_PIXELS; import cskd_ray.io.decode; "
        "print(before, Image.MAX_IMAGE_PIXELS)"
    )
    before, after = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert before == after == str(DEFAULT_MAX_PIXELS)


def real_png_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: a few hundred KB that decode to side² pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_real_decompression_bomb_is_refused_without_decoding() -> None:
    data = real_png_bomb(20000)  # 400 M pixels from about 50 KB
    assert len(data) < 200_000
    decoded = decode_image(data)
    assert decoded.error == f"image too large: 20000x20000 = 400000000 pixels > max_pixels {DEFAULT_MAX_PIXELS}"
    assert Image.open(io.BytesIO(real_png_bomb(64))).size == (64, 64)  # the generator makes valid PNGs
    assert pixels(real_png_bomb(64)).shape == (64, 64, 3)


def test_image_over_max_pixels_is_refused_before_decoding() -> None:
    decoded = decode_image(png_with_size(10000, 10000))
    assert decoded == Decoded(
        None, f"image too large: 10000x10000 = 100000000 pixels > max_pixels {DEFAULT_MAX_PIXELS}"
    )
    assert decode_image(png_with_size(100, 100), max_pixels=9999).error == (
        "image too large: 100x100 = 10000 pixels > max_pixels 9999"
    )


def test_image_at_max_pixels_is_not_refused() -> None:
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")
    assert decode_image(data, max_pixels=10000).ok
    assert decode_image(data, max_pixels=9999).error == "image too large: 100x100 = 10000 pixels > max_pixels 9999"


def test_pil_decompression_bomb_error_never_raises() -> None:
    # 13500² pixels is above twice PIL's own limit, where Image.open would raise DecompressionBombError;
    # with a larger max_pixels the decoder goes on (and finds the data short), it never refuses as a bomb.
    decoded = decode_image(png_with_size(13500, 13500), max_pixels=10**9)
    assert decoded.image is None
    assert decoded.error == "truncated image: image file is truncated (0 bytes not processed)"


def test_max_pixels_decides_whatever_pil_global_limit_says(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: over 2x, PIL's open would raise
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no DecompressionBombWarning leaks out
        assert pixels(encode(Image.new("RGB", (64, 64), RED), "PNG")).shape == (64, 64, 3)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # between 1x and 2x: PIL would only warn
        assert pixels(encode(Image.new("RGB", (50, 50), RED), "PNG")).shape == (50, 50, 3)
    decoded = decode_image(encode(Image.new("RGB", (64, 64)), "PNG"), max_pixels=1000)
    assert decoded == Decoded(None, "image too large: 64x64 = 4096 pixels > max_pixels 1000")
    assert Image.MAX_IMAGE_PIXELS == 2000  # left as the caller set it


# ---------------------------------------------------------------- broken input


def test_truncated_jpeg(jpeg_bytes: bytes) -> None:
    decoded = decode_image(jpeg_bytes[: len(jpeg_bytes) // 2])
    assert decoded.image is None
    assert decoded.error is not None
    assert decoded.error.startswith("truncated image: image file is truncated (")


@pytest.mark.parametrize("cut", [100, 300, 600])
def test_jpeg_cut_in_header_is_reported_as_truncated(jpeg_bytes: bytes, cut: int) -> None:
    assert decode_image(jpeg_bytes[:cut]) == Decoded(None, "truncated image: Truncated File Read")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "empty file (0 bytes)"),
        (None, "empty file (0 bytes)"),
        (b"\x00", "not an image: unknown or unsupported image format"),
        (b"hello, this is a text file\n" * 20, "not an image: unknown or unsupported image format"),
        (
            bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8)),
            "not an image: unknown or unsupported image format",
        ),
        (b"<html><body>404 not found</body></html>", "not an image: unknown or unsupported image format"),
    ],
)
def test_not_images(data: bytes | None, error: str) -> None:
    assert decode_image(data) == Decoded(None, error)
    assert not decode_image(data).ok


# ---------------------------------------------------------------- draft


@pytest.mark.parametrize(
    ("size", "draft", "expected"),
    [
        ((2000, 1500), 224, (500, 375)),
        ((1500, 2000), 224, (375, 500)),
        ((2000, 1500), 100, (250, 188)),
        ((2000, 1500), 1000, (2000, 1500)),  # less than 2x: no draft
        ((2000, 1500), None, (2000, 1500)),
    ],
)
def test_draft_size_decodes_large_jpeg_smaller(
    size: tuple[int, int], draft: int | None, expected: tuple[int, int]
) -> None:
    data = encode(Image.new("RGB", size, (10, 200, 30)), "JPEG")
    decoded = decode_image(data, draft_size=draft)
    assert decoded.image is not None and decoded.image.mode == "RGB"
    assert decoded.image.size == expected
    assert min(decoded.image.size) >= (draft or 0)
    assert close(np.asarray(decoded.image)[10, 10], (10, 200, 30), tol=4)


def test_draft_size_never_goes_below_requested_side() -> None:
    for short in range(224 * 2, 224 * 9, 37):
        data = encode(Image.new("L", (short + 5, short), 128), "JPEG")
        decoded = decode_image(data, draft_size=224)
        assert decoded.image is not None and min(decoded.image.size) >= 224, short
        assert decoded.image.size[0] < short + 5


def test_draft_size_ignored_for_png() -> None:
    data = encode(Image.new("RGB", (900, 600), RED), "PNG")
    assert decode_image(data, draft_size=100).image.size == (900, 600)


# ---------------------------------------------------------------- fuzzing


def _mutations(good: bytes, n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        data = bytearray(good)
        kind = int(rng.integers(0, 5))
        if kind == 0:  # byte flips anywhere
            for _ in range(int(rng.integers(1, 20))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
        elif kind == 1:  # truncation
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 2:  # insertion of random bytes
            pos = int(rng.integers(len(data)))
            data[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 50)), dtype=np.uint8))
        elif kind == 3:  # flips inside the header (markers, sizes, tables)
            for _ in range(int(rng.integers(1, 5))):
                data[int(rng.integers(2, min(len(data), 700)))] ^= 1 << int(rng.integers(8))
        else:  # a chunk removed
            a = int(rng.integers(len(data)))
            del data[a : a + int(rng.integers(1, 200))]
        yield bytes(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF"])
def test_random_mutations_never_raise(jpeg_bytes: bytes, fmt: str) -> None:
    good = jpeg_bytes if fmt == "JPEG" else encode(Image.open(io.BytesIO(jpeg_bytes)).convert("RGB"), fmt)
    seen_ok = seen_error = 0
    for data in _mutations(good, 200, seed=1234):
        decoded = decode_image(data)
        assert isinstance(decoded, Decoded)
        assert (decoded.image is None) != (decoded.error is None)
        if decoded.image is not None:
            assert decoded.image.mode == "RGB" and decoded.ok
            seen_ok += 1
        else:
            assert isinstance(decoded.error, str) and decoded.error and not decoded.ok
            seen_error += 1
    assert seen_error > 0
