"""Tests for :mod:`cskd_ray.io.transforms`: resize/crop shapes and content, normalisation, spec keys."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from cskd_ray.io.transforms import RESIZE_MODES, PreprocessSpec, normalize_batch, resize_crop

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def spec(**kwargs) -> PreprocessSpec:
    base = {"image_size": 32, "mean": CLIP_MEAN, "std": CLIP_STD}
    return PreprocessSpec(**{**base, **kwargs})


def solid(size: tuple[int, int], colour=(255, 0, 0)) -> Image.Image:
    return Image.new("RGB", size, colour)


# ---------------------------------------------------------------- resize_crop


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("size", [(100, 50), (50, 100), (32, 32), (7, 300), (1000, 999), (10, 10)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest", "lanczos"])
def test_resize_crop_shape_and_dtype(mode: str, size: tuple[int, int], interpolation: str) -> None:
    out = resize_crop(solid(size, (10, 20, 30)), spec(resize_mode=mode, interpolation=interpolation))
    assert out.shape == (32, 32, 3)
    assert out.dtype == np.uint8


def test_shortest_keeps_the_whole_image_colour() -> None:
    out = resize_crop(solid((100, 50), (10, 20, 30)), spec(resize_mode="shortest"))
    assert (out == np.array([10, 20, 30], np.uint8)).all()


def test_shortest_centre_crop_takes_the_centre() -> None:
    # 96x48, blue everywhere except a red 48x48 square in the middle: the crop is all red.
    arr = np.zeros((48, 96, 3), np.uint8)
    arr[:] = (0, 0, 255)
    arr[:, 24:72] = (255, 0, 0)
    out = resize_crop(Image.fromarray(arr), spec(resize_mode="shortest", interpolation="nearest"))
    assert (out == np.array([255, 0, 0], np.uint8)).all()
    # and a portrait image crops top and bottom
    out = resize_crop(Image.fromarray(arr.transpose(1, 0, 2).copy()), spec(interpolation="nearest"))
    assert (out == np.array([255, 0, 0], np.uint8)).all()


def test_shortest_centre_pixel_is_centre() -> None:
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:] = (0, 0, 255)
    arr[24:40, 24:40] = (255, 0, 0)
    out = resize_crop(Image.fromarray(arr), spec(image_size=32, interpolation="bilinear"))
    assert tuple(out[16, 16]) == (255, 0, 0)
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[31, 31]) == (0, 0, 255)


def test_squash_keeps_all_content() -> None:
    arr = np.zeros((50, 100, 3), np.uint8)
    arr[:, :50] = (255, 0, 0)
    arr[:, 50:] = (0, 0, 255)
    out = resize_crop(Image.fromarray(arr), spec(resize_mode="squash", interpolation="nearest"))
    assert (out[:, :16] == np.array([255, 0, 0], np.uint8)).all()
    assert (out[:, 16:] == np.array([0, 0, 255], np.uint8)).all()


def test_longest_pads_with_black() -> None:
    out = resize_crop(solid((100, 50), (200, 200, 200)), spec(resize_mode="longest", interpolation="nearest"))
    # 100x50 → 32x16 centred vertically at rows 8..23
    assert (out[:8] == 0).all() and (out[24:] == 0).all()
    assert (out[8:24] == 200).all()
    out = resize_crop(solid((50, 100), (200, 200, 200)), spec(resize_mode="longest", interpolation="nearest"))
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all()
    assert (out[:, 8:24] == 200).all()


def test_resize_crop_does_not_modify_input() -> None:
    img = solid((80, 40), (1, 2, 3))
    before = np.asarray(img).copy()
    resize_crop(img, spec())
    assert (np.asarray(img) == before).all() and img.size == (80, 40)


# ---------------------------------------------------------------- normalize_batch


def test_normalize_batch_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    s = spec()
    out = normalize_batch(images, s)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32 and out.device.type == "cpu"
    expected = (images.astype(np.float64) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    expected = expected.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    # channel c of pixel (n, y, x) is images[n, y, x, c]
    assert out[1, 2, 5, 7].item() == pytest.approx(
        (images[1, 5, 7, 2] / 255 - CLIP_MEAN[2]) / CLIP_STD[2], abs=1e-5
    )


def test_normalize_batch_accepts_tensor_and_dtype_and_keeps_input() -> None:
    images = np.full((2, 8, 8, 3), 255, np.uint8)
    tensor = torch.from_numpy(images.copy())
    s = spec(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = normalize_batch(tensor, s, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.ones(2, 3, 8, 8, dtype=torch.float64))
    assert torch.equal(tensor, torch.from_numpy(images))  # the uint8 input is untouched
    zeros = normalize_batch(np.zeros((1, 8, 8, 3), np.uint8), s)
    assert torch.equal(zeros, torch.full((1, 3, 8, 8), -1.0))


def test_normalize_batch_values_are_channels_first_regardless_of_memory_format() -> None:
    images = np.zeros((1, 8, 8, 3), np.uint8)
    images[..., 0] = 255  # red channel only
    s = spec(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = normalize_batch(images, s).contiguous()
    assert torch.equal(out[0, 0], torch.ones(8, 8))
    assert torch.equal(out[0, 1:], torch.zeros(2, 8, 8))


# ---------------------------------------------------------------- PreprocessSpec


def test_spec_rejects_bad_interpolation_listing_choices() -> None:
    with pytest.raises(
        ValueError,
        match=r"interpolation 'cubic': choose one of "
        r"\['bicubic', 'bilinear', 'lanczos', 'nearest'\]",
    ):
        spec(interpolation="cubic")


def test_spec_rejects_bad_resize_mode_listing_choices() -> None:
    with pytest.raises(
        ValueError, match=r"resize_mode 'crop': choose one of \['shortest', 'squash', 'longest'\]"
    ):
        spec(resize_mode="crop")


def test_spec_rejects_tiny_image_size() -> None:
    with pytest.raises(ValueError, match=r"image_size 4 is too small \(minimum 8\)"):
        spec(image_size=4)


def test_spec_to_dict() -> None:
    assert spec().to_dict() == {
        "image_size": 32,
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def test_spec_key_is_stable() -> None:
    key = spec().key()
    assert len(key) == 16 and int(key, 16) >= 0
    assert spec().key() == key
    assert PreprocessSpec(32, CLIP_MEAN, CLIP_STD, "bicubic", "shortest").key() == key


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 33},
        {"mean": (0.5, 0.4578275, 0.40821073)},
        {"std": (0.26862954, 0.26130258, 0.3)},
        {"interpolation": "bilinear"},
        {"resize_mode": "squash"},
        {"resize_mode": "longest"},
    ],
)
def test_spec_key_changes_with_every_field(change: dict) -> None:
    base = spec()
    assert dataclasses.replace(base, **change).key() != base.key()


def test_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec().image_size = 64  # type: ignore[misc]
