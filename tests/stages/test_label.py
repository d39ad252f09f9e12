"""Phase 2b: pseudo-labels, one row per input, equal to the model's own scores, resumable, deduplicated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import save_file

from cskd_ray.app.cli import main
from cskd_ray.io.decode import decode_image
from cskd_ray.io.feature_cache import LABEL_SCHEMA, ResultTable
from cskd_ray.io.transforms import normalize_batch, resize_crop
from cskd_ray.models import create_encoder
from cskd_ray.models.heads import AestheticHead, EncoderWithHead
from cskd_ray.models.saved import load_scoring_model
from cskd_ray.stages import load_config
from cskd_ray.stages.label import run as run_label

pytestmark = [pytest.mark.ray]
CONFIG = REPO / "jobs" / "configs" / "demo" / "label.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model folder (test_vit + 10-bin distribution head) with seeded random weights."""
    torch.manual_seed(0)
    encoder = create_encoder("test_vit")
    model = EncoderWithHead(encoder.model, AestheticHead(encoder.dim, "distribution", 10))
    folder = tmp_path_factory.mktemp("teacher") / "model"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    description = {"stage": "teacher", "encoder": {"name": "test_vit", "pretrained": False, "projection": "linear"},
                   "head": {"kind": "distribution", "bins": 10, "low": 1.0, "high": 10.0, "threshold": 5.0},
                   "preprocess": encoder.preprocess.to_dict()}
    (folder / "model.json").write_text(json.dumps(description))
    return folder


def _cfg(images: Path, output: Path, model: Path):
    return load_config("label", CONFIG, [f"model={model}", "batch_size=16", "decode_batch_size=8"],
                       input_uris=[str(images)], output_uri=str(output))


def test_pseudo_labels_match_the_model_and_rerun_adds_nothing(ray_session, demo_data: Path, model_dir: Path,
                                                               tmp_path: Path) -> None:
    images = Path(shutil.copytree(demo_data / "images", tmp_path / "images"))
    good = sorted(p for p in images.iterdir() if decode_image(p.read_bytes()).ok)
    shutil.copy(good[0], images / "same-content-as-first")
    result = run_label(_cfg(images, tmp_path / "labels", model_dir))
    assert (result.inputs, result.new_rows, result.errors, result.reused) == (65, 65, 4, 1)
    table = ResultTable(str(tmp_path / "labels"), LABEL_SCHEMA).read()
    assert table.schema.equals(LABEL_SCHEMA) and len(set(table.column("uri").to_pylist())) == 65
    ok = table.filter(table.column("error").is_null())
    dists = np.asarray(ok.column("distribution").to_pylist())
    np.testing.assert_allclose(dists.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ok.column("score").to_numpy(), (dists * np.arange(1, 11)).sum(1), atol=1e-4)
    assert set(ok.column("model").to_pylist()) == {result.model} and result.model.startswith("teacher:test_vit:")
    scorer = load_scoring_model(str(model_dir))
    by_uri = dict(zip(ok.column("uri").to_pylist(), ok.column("score").to_pylist(), strict=True))
    pixels = np.stack([resize_crop(decode_image(p.read_bytes()).image, scorer.preprocess) for p in good[:3]])
    with torch.inference_mode():
        expected = scorer.to_score(scorer.model(normalize_batch(pixels, scorer.preprocess)))
    np.testing.assert_allclose([by_uri[str(p)] for p in good[:3]], expected.numpy(), rtol=1e-4)
    assert by_uri[str(images / "same-content-as-first")] == by_uri[str(good[0])]
    again = run_label(_cfg(images, tmp_path / "labels", model_dir))
    assert again.new_rows == 0 and len(ResultTable(str(tmp_path / "labels"), LABEL_SCHEMA).read()) == 65


def test_label_cli_rejects_a_folder_that_is_not_a_model(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    status = main(["label", str(CONFIG), "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                   "--set", f"model={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [f"error: model {tmp_path}: not a model folder (no model.json); run `teacher` first and pass its "
                   "output/model"]
