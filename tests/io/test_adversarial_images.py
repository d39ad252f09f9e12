"""Adversarial files in every stage that reads images: bombs, huge headers, truncated, empty, not images.

Each stage must give every file exactly one row (or, in training, one slot with ``valid = 0``), with an
error naming what is wrong, and never crash, hang or allocate the pixels a bomb announces.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from safetensors.torch import save_file
from test_decode import png_with_size, real_png_bomb

from cskd_ray.io.decode import decode_image
from cskd_ray.io.feature_cache import FeatureCache, ResultTable
from cskd_ray.io.transforms import PreprocessSpec
from cskd_ray.stages import load_config
from cskd_ray.train.ingest import decode_for_training

# file name -> expected error prefix (None: a valid image, whatever its extension says)
EXPECTED = {
    "good.png": None,
    "png_named.jpg": None,  # wrong extension: content decides
    "jpeg_named.png": None,
    "no_extension": None,
    "bomb.png": "image too large",  # real 1-bit PNG: 400 M pixels from ~50 KB
    "huge_header.png": "image too large",  # header claims 60000x60000
    "huge_header.gif": "image too large",
    "truncated.jpg": "truncated image",
    "zero_bytes.jpg": "empty file",
    "text.jpg": "not an image",
    "html_error_page.png": "not an image",
    "random.bin": "",  # some error (random bytes may look like a corrupt header of some format)
}


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _gif_with_size(width: int, height: int) -> bytes:
    gif = bytearray(_encode(Image.new("P", (4, 4)), "GIF"))
    gif[6:10] = width.to_bytes(2, "little") + height.to_bytes(2, "little")  # logical screen size
    return bytes(gif)


@pytest.fixture(scope="module")
def adversarial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adversarial")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    jpeg = _encode(photo, "JPEG", quality=90)
    files = {
        "good.png": _encode(photo, "PNG"),
        "png_named.jpg": _encode(photo, "PNG"),
        "jpeg_named.png": jpeg,
        "no_extension": jpeg,
        "bomb.png": real_png_bomb(20000),
        "huge_header.png": png_with_size(60000, 60000),
        "huge_header.gif": _gif_with_size(65535, 65535),
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "zero_bytes.jpg": b"",
        "text.jpg": b"this is a caption, not a photo\n" * 10,
        "html_error_page.png": b"<html><body><h1>403 Forbidden</h1></body></html>",
        "random.bin": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _check_errors(rows: dict[str, str | None], folder: Path) -> None:
    assert sorted(rows) == sorted(str(folder / n) for n in EXPECTED), "one row per input, no more, no less"
    for name, expected in EXPECTED.items():
        error = rows[str(folder / name)]
        if expected is None:
            assert error is None, f"{name}: {error}"
        else:
            assert error is not None and error.startswith(expected), f"{name}: {error!r}"


def test_decoder_refuses_every_bad_file_quickly_and_pil_globals_stay(adversarial: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    rows = {str(p): decode_image(p.read_bytes()).error for p in adversarial.iterdir()}
    assert time.perf_counter() - start < 10, "no bomb was decoded"
    _check_errors(rows, adversarial)
    assert Image.MAX_IMAGE_PIXELS == before


def test_training_decode_marks_bad_files_invalid(adversarial: Path) -> None:
    """align / teacher / distill read images through decode_for_training: bad files keep a slot, valid = 0."""
    uris = sorted(str(p) for p in adversarial.iterdir()) + [str(adversarial / "deleted_since_listing.jpg")]
    spec = PreprocessSpec(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    pixels, valid = decode_for_training(uris, spec, max_pixels=10_000_000)
    assert pixels.shape == (len(uris), 32, 32, 3) and valid.shape == (len(uris),)
    want = [EXPECTED.get(Path(u).name, "missing") is None for u in uris]
    assert valid.astype(bool).tolist() == want
    assert not pixels[~valid.astype(bool)].any(), "invalid rows stay zero"


@pytest.mark.ray
def test_features_stage_gives_every_bad_file_an_error_row(ray_session, adversarial: Path, tmp_path: Path) -> None:
    from cskd_ray.stages.features import run as run_features

    cfg = load_config(
        "features",
        REPO / "jobs" / "configs" / "demo" / "features.yaml",
        ["batch_size=8", "decode_batch_size=4"],
        input_uris=[str(adversarial)],
        output_uri=str(tmp_path / "features"),
    )
    result = run_features(cfg)
    table = FeatureCache(cfg.output).read()
    _check_errors(
        dict(zip(table.column("uri").to_pylist(), table.column("error").to_pylist(), strict=True)), adversarial
    )
    assert result.errors == sum(e is not None for e in EXPECTED.values())
    ok = table.filter(table.column("error").is_null())
    assert ok.column("feature").null_count == 0 and len(ok) == 4


def write_scoring_model(folder: Path) -> Path:
    """A scoring model folder (test_vit + 10-bin head, seeded random weights), as teacher writes it."""
    from cskd_ray.models import create_encoder
    from cskd_ray.models.heads import AestheticHead, EncoderWithHead

    torch.manual_seed(0)
    encoder = create_encoder("test_vit")
    model = EncoderWithHead(encoder.model, AestheticHead(encoder.dim, "distribution", 10))
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    description = {
        "stage": "teacher",
        "encoder": {"name": "test_vit", "pretrained": False, "projection": "linear"},
        "head": {"kind": "distribution", "bins": 10, "low": 1.0, "high": 10.0, "threshold": 5.0},
        "preprocess": encoder.preprocess.to_dict(),
    }
    (folder / "model.json").write_text(json.dumps(description))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scoring_model(tmp_path_factory.mktemp("model") / "model")


@pytest.mark.ray
@pytest.mark.parametrize("stage", ["label", "score"])
def test_label_and_score_give_every_bad_file_an_error_row(
    ray_session, adversarial: Path, model_dir: Path, tmp_path: Path, stage: str
) -> None:
    output = str(tmp_path / stage)
    overrides = [f"model={model_dir}", "batch_size=8", "decode_batch_size=4"]
    if stage == "label":
        from cskd_ray.stages.label import run as run_label

        run_label(
            load_config(
                "label",
                REPO / "jobs" / "configs" / "demo" / "label.yaml",
                overrides,
                input_uris=[str(adversarial)],
                output_uri=output,
            )
        )
    else:
        from cskd_ray.stages.score import run as run_score

        run_score(load_config("score", None, overrides, input_uris=[str(adversarial)], output_uri=output))
    from cskd_ray.io.feature_cache import LABEL_SCHEMA  # the score table has the label table's schema

    table = ResultTable(output, LABEL_SCHEMA).read()
    _check_errors(
        dict(zip(table.column("uri").to_pylist(), table.column("error").to_pylist(), strict=True)), adversarial
    )
    scored = table.filter(table.column("error").is_null())
    assert scored.column("score").null_count == 0 and len(scored) == 4
