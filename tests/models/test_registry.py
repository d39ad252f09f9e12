"""Tests for :mod:`cskd_ray.models.registry`: CLIP towers and timm encoders by name, weights sources."""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from cskd_ray.io import storage
from cskd_ray.io.transforms import PreprocessSpec
from cskd_ray.models import registry
from cskd_ray.models.registry import (
    UnknownModelError,
    WeightsUnavailableError,
    create_clip,
    create_encoder,
    list_clip_models,
    list_encoders,
)

TINY = "cskd-tiny-vit"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _batch(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference() -> open_clip.CLIP:
    """A tiny CLIP with seeded weights different from create_clip's default seed 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = open_clip.create_model(TINY)
    return model.eval()


@pytest.fixture(scope="module")
def expected_features(reference: open_clip.CLIP) -> torch.Tensor:
    with torch.no_grad():
        return reference.visual(_batch())


@pytest.fixture
def safetensors_ckpt(tmp_path: Path, reference: open_clip.CLIP) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    return path


def _features(loaded: registry.LoadedModel, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(_batch() if x is None else x)


# ---------------------------------------------------------------- random CLIP


def test_tiny_clip_random_weights() -> None:
    loaded = create_clip(TINY)
    assert loaded.name == TINY
    assert loaded.dim == 32
    assert loaded.weights == "random:seed=0" and loaded.random_weights
    assert loaded.preprocess == PreprocessSpec(64, CLIP_MEAN, CLIP_STD, "bicubic", "shortest")
    out = _features(loaded)
    assert out.shape == (2, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("pretrained", [None, "", "random", "RANDOM", "none", "  random  "])
def test_random_weight_spellings(pretrained: str | None) -> None:
    assert create_clip(TINY, pretrained, seed=3).weights == "random:seed=3"


def test_tiny_clip_is_frozen_and_in_eval_mode() -> None:
    loaded = create_clip(TINY)
    assert not loaded.model.training
    assert all(not m.training for m in loaded.model.modules())
    params = list(loaded.model.parameters())
    assert params and not any(p.requires_grad for p in params)


def test_same_seed_same_outputs_different_seed_different() -> None:
    x = _batch()
    a = _features(create_clip(TINY, seed=5), x)
    b = _features(create_clip(TINY, seed=5), x)
    c = _features(create_clip(TINY, seed=6), x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_random_init_does_not_touch_global_rng() -> None:
    torch.manual_seed(99)
    before = torch.rand(3)
    torch.manual_seed(99)
    create_clip(TINY, seed=1)
    assert torch.equal(torch.rand(3), before)


def test_tower_output_matches_clip_encode_image() -> None:
    loaded = create_clip(TINY, seed=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = open_clip.create_model(TINY).eval()
    x = _batch()
    with torch.no_grad():
        assert torch.allclose(_features(loaded, x), model.encode_image(x), atol=1e-6)


def test_larger_tiny_config_is_registered() -> None:
    loaded = create_clip("cskd-tiny-vit-224")
    assert loaded.dim == 64 and loaded.preprocess.image_size == 224


def test_list_clip_models() -> None:
    names = list_clip_models()
    assert TINY in names and "cskd-tiny-vit-224" in names and "ViT-B-32" in names


# ---------------------------------------------------------------- names and tags


def test_unknown_clip_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownModelError, match=r"^unknown CLIP model 'ViT-B-33'; did you mean ViT-B-32\b"):
        create_clip("ViT-B-33")


def test_unknown_clip_name_without_close_match_points_to_list_models() -> None:
    with pytest.raises(
        UnknownModelError, match=r"unknown CLIP model 'zzzzzz'; see cskd-ray list-models \(CLIP\)"
    ):
        create_clip("zzzzzz")


def test_unknown_tag_lists_random() -> None:
    with pytest.raises(
        WeightsUnavailableError,
        match=r"cskd-tiny-vit has no pretrained tag 'openai'; choose one of "
        r"none, .*or 'random'",
    ):
        create_clip(TINY, "openai")


def test_unknown_tag_for_real_model_lists_its_tags() -> None:
    with pytest.raises(
        WeightsUnavailableError, match=r"ViT-B-32 has no pretrained tag 'nope'; choose one of \[.*'openai'"
    ):
        create_clip("ViT-B-32", "nope")


def test_open_clip_tag_offline_fails_fast() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.monotonic()
    with pytest.raises(
        WeightsUnavailableError, match=r"cannot fetch ViT-B-32/openai weights .*offline.*'random'"
    ):
        create_clip("ViT-B-32", "openai")
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------- checkpoints


def test_local_safetensors_checkpoint(safetensors_ckpt: Path, expected_features: torch.Tensor) -> None:
    loaded = create_clip(TINY, str(safetensors_ckpt))
    assert loaded.weights == f"sha256:{_sha256(safetensors_ckpt)}"
    assert not loaded.random_weights
    assert torch.allclose(_features(loaded), expected_features, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp"])
def test_local_pt_checkpoint(
    tmp_path: Path, reference: open_clip.CLIP, expected_features: torch.Tensor, wrap: str
) -> None:
    state = reference.state_dict()
    if wrap == "ddp":
        payload: dict = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "plain":
        payload = state
    else:
        payload = {wrap: state, "epoch": 3}
    path = tmp_path / "tiny.pt"
    torch.save(payload, path)
    loaded = create_clip(TINY, str(path))
    assert loaded.weights == f"sha256:{_sha256(path)}"
    assert torch.allclose(_features(loaded), expected_features, atol=1e-6)


def test_visual_only_checkpoint_is_enough(
    tmp_path: Path, reference: open_clip.CLIP, expected_features: torch.Tensor
) -> None:
    path = tmp_path / "visual.pth"
    torch.save({k: v for k, v in reference.state_dict().items() if k.startswith("visual.")}, path)
    assert torch.allclose(_features(create_clip(TINY, str(path))), expected_features, atol=1e-6)


def test_checkpoint_without_visual_weights_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"foo": torch.zeros(3)}, str(path))
    with pytest.raises(
        WeightsUnavailableError,
        match=rf"{re.escape(str(path))} does not fit cskd-tiny-vit: missing \['visual\.",
    ):
        create_clip(TINY, str(path))


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.safetensors"
    with pytest.raises(
        WeightsUnavailableError, match=rf"checkpoint file {re.escape(str(path))} does not exist"
    ):
        create_clip(TINY, str(path))


class _Payload:
    def __init__(self) -> None:
        self.weights = torch.zeros(2)


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save(_Payload(), path)
    with pytest.raises(
        WeightsUnavailableError, match=rf"cannot load {re.escape(str(path))} safely \(weights_only=True\)"
    ):
        create_clip(TINY, str(path))


@pytest.mark.s3
def test_s3_checkpoint_is_downloaded_to_cache(
    s3_bucket: str,
    safetensors_ckpt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    expected_features: torch.Tensor,
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CSKD_RAY_CACHE", str(cache))
    uri = f"{s3_bucket}/weights/tiny.safetensors"
    assert storage.write_bytes_once(uri, safetensors_ckpt.read_bytes())
    loaded = create_clip(TINY, uri)
    assert loaded.weights == f"sha256:{_sha256(safetensors_ckpt)}"
    assert torch.allclose(_features(loaded), expected_features, atol=1e-6)
    cached = cache / "weights" / hashlib.sha256(uri.encode()).hexdigest()[:16] / "tiny.safetensors"
    assert cached.read_bytes() == safetensors_ckpt.read_bytes()
    assert registry.fetch_checkpoint(uri) == cached


@pytest.mark.s3
def test_missing_s3_checkpoint(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSKD_RAY_CACHE", str(tmp_path))
    uri = f"{s3_bucket}/weights/none.safetensors"
    with pytest.raises(WeightsUnavailableError, match=rf"cannot fetch checkpoint {re.escape(str(uri))}: "):
        create_clip(TINY, uri)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_checkpoint_with_wrong_shapes_does_not_fit(tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        other = open_clip.create_model("cskd-tiny-vit-224")
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(WeightsUnavailableError, match=r"does not fit cskd-tiny-vit"):
        create_clip(TINY, str(path))


@pytest.mark.parametrize("kind", ["list.pt", "junk.safetensors"])
def test_unusable_checkpoint_file_is_weights_unavailable(tmp_path: Path, kind: str) -> None:
    path = tmp_path / kind
    if kind == "list.pt":
        torch.save([torch.zeros(2)], path)
    else:
        path.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsUnavailableError, match=re.escape(str(path))):
        create_clip(TINY, str(path))


# ---------------------------------------------------------------- timm encoders


def test_create_encoder_test_vit() -> None:
    loaded = create_encoder("test_vit")
    assert loaded.name == "test_vit" and loaded.weights == "random:timm-init" and loaded.random_weights
    assert isinstance(loaded.preprocess, PreprocessSpec)
    size = loaded.preprocess.image_size
    assert loaded.preprocess == PreprocessSpec(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "shortest")
    loaded.model.eval()
    with torch.no_grad():
        out = loaded.model(_batch(3, size))
    assert out.shape == (3, loaded.dim)
    assert loaded.dim == loaded.model.num_features == 64


def test_create_encoder_from_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_encoder("test_vit").model.eval()
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(1)
    loaded = create_encoder("test_vit", str(path))
    assert loaded.weights == f"sha256:{_sha256(path)}"
    x = _batch(2, loaded.preprocess.image_size)
    with torch.no_grad():
        assert torch.allclose(loaded.model.eval()(x), source(x), atol=1e-6)


def test_create_encoder_refuses_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"foo": torch.zeros(3)}, str(path))
    with pytest.raises(WeightsUnavailableError):
        create_encoder("test_vit", str(path))


def test_unknown_encoder_suggests_close_matches() -> None:
    with pytest.raises(
        UnknownModelError, match=r"^unknown timm encoder model 'test_vitt'; did you mean test_vit\b"
    ):
        create_encoder("test_vitt")


def test_list_encoders() -> None:
    names = list_encoders("test_*")
    assert "test_vit" in names and all(n.startswith("test_") for n in names)
    assert len(list_encoders()) > len(names)


@pytest.mark.parametrize("name", ["cskd-tiny-vit", "cskd-tiny-vit-224", "ViT-B-32"])
def test_describe_clip_matches_create_clip_without_building(name: str) -> None:
    from cskd_ray.models import describe_clip

    described, created = describe_clip(name, None, seed=3), create_clip(name, None, seed=3)
    assert (described.preprocess, described.dim, described.weights) == (
        created.preprocess, created.dim, created.weights)
    assert next(described.model.parameters()).device.type == "meta"


def test_describe_clip_fails_fast_offline_for_tags() -> None:
    from cskd_ray.models import describe_clip

    with pytest.raises(WeightsUnavailableError, match=r"ViT-B-32/openai.*offline"):
        describe_clip("ViT-B-32", "openai")


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "test_vit", "test_efficientnet"])
def test_encoder_dim_is_the_width_of_the_pooled_output(name: str) -> None:
    loaded = create_encoder(name)
    with torch.no_grad():
        out = loaded.model.eval()(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, loaded.dim)
