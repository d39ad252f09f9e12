"""``encoder.image_size``: a convolutional encoder's preprocessing at another size; patch models refuse it."""

from __future__ import annotations

import pytest
import torch

from cskd_ray.models.registry import UnknownModelError, create_encoder


def test_convolutional_encoder_takes_another_input_size() -> None:
    default, small = create_encoder("test_resnet"), create_encoder("test_resnet", image_size=64)
    assert default.preprocess.image_size == 160 and small.preprocess.image_size == 64
    assert small.preprocess.mean == default.preprocess.mean
    with torch.no_grad():
        assert small.model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, small.dim)


def test_patch_model_refuses_image_size() -> None:
    with pytest.raises(UnknownModelError, match=r"image_size=64: test_vit is a patch-based model built for 160"):
        create_encoder("test_vit", image_size=64)
