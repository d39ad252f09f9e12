"""Export: ONNX and TorchScript equal PyTorch within tolerance, carry their preprocessing, and score via `score`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_score import write_model_folder

from cskd_ray.app.cli import main
from cskd_ray.app.commands import run_score_command
from cskd_ray.io.decode import decode_image
from cskd_ray.io.transforms import PreprocessSpec, normalize_batch, resize_crop
from cskd_ray.models.saved import ExportedScoringModel, load_scoring_model
from cskd_ray.stages import export
from cskd_ray.stages.export import export_model, sample_inputs


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A distribution-head and a scalar-head model folder (test_vit, seeded random weights)."""
    root = tmp_path_factory.mktemp("models")
    return {"distribution": write_model_folder(root / "dist", "distribution", seed=1),
            "scalar": write_model_folder(root / "scalar", "scalar", seed=2)}


@pytest.mark.parametrize(("fmt", "kind"), [("onnx", "distribution"), ("torchscript", "scalar")])
def test_export_equals_pytorch_and_documents_preprocessing(models: dict[str, Path], tmp_path: Path, capsys,
                                                           fmt: str, kind: str) -> None:
    out = tmp_path / fmt
    assert main(["export", "--model", str(models[kind]), "--format", fmt, "--output", str(out)]) == 0
    assert "max abs difference to PyTorch on 8 sample inputs" in capsys.readouterr().out
    sidecar = json.loads((out / "export.json").read_text())
    source = json.loads((models[kind] / "model.json").read_text())
    assert sidecar["format"] == fmt and (out / sidecar["file"]).is_file()
    assert PreprocessSpec.from_dict(sidecar["preprocess"]) == PreprocessSpec.from_dict(source["preprocess"])
    assert sidecar["head"] == source["head"] and sidecar["verification"]["max_abs_diff"] <= 1e-4
    reference, exported = load_scoring_model(str(models[kind])), load_scoring_model(str(out))
    assert isinstance(exported, ExportedScoringModel) and exported.model_id.startswith(reference.model_id + f"/{fmt}:")
    x = sample_inputs(reference.preprocess, 5, seed=7)  # another batch size than the traced one
    (want_score, want_dist), (got_score, got_dist) = reference.predict(x), exported.predict(x)
    torch.testing.assert_close(got_score, want_score, atol=1e-4, rtol=0)
    assert (got_dist is None) == (kind == "scalar")
    if got_dist is not None:
        torch.testing.assert_close(got_dist, want_dist, atol=1e-5, rtol=0)


@pytest.mark.ray
def test_score_accepts_exports_and_agrees_with_pytorch(ray_session, demo_data: Path, models: dict[str, Path],
                                                       tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    files = sorted((demo_data / "images").iterdir())[:10]
    for path in files:
        shutil.copy(path, images / path.name)
    reference = load_scoring_model(str(models["distribution"]))
    good = [p for p in files if decode_image(p.read_bytes()).ok]
    pixels = np.stack([resize_crop(decode_image(p.read_bytes()).image, reference.preprocess) for p in good])
    expected = reference.predict(normalize_batch(pixels, reference.preprocess))[0].numpy()
    for fmt in ("onnx", "torchscript"):
        export_model(str(models["distribution"]), fmt, str(tmp_path / fmt))
        summary = run_score_command(str(tmp_path / fmt), [str(images)], str(tmp_path / f"scores-{fmt}"),
                                    printer=lambda line: None)
        assert summary["table"]["rows"] == 10 and summary["model"].endswith(f"/{fmt}:" + summary["model"][-16:])
        import pyarrow.parquet as pq

        table = pq.read_table(str(tmp_path / f"scores-{fmt}"), columns=["uri", "score", "distribution"])
        by_uri = dict(zip(table.column("uri").to_pylist(), table.column("score").to_pylist(), strict=True))
        np.testing.assert_allclose([by_uri[str(images / p.name)] for p in good], expected, atol=1e-4)


def test_tampered_export_and_bad_arguments_exit_2(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "onnx"
    export_model(str(models["scalar"]), "onnx", str(out))
    (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes() + b"\0")
    (tmp_path / "a.jpg").write_bytes(b"x")
    status = main(["score", "--model", str(out), "--input", str(tmp_path / "a.jpg"), "--output", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "sha256 does not match export.json" in err[0]
    status = main(["export", "--model", str(models["scalar"]), "--format", "tflite", "--output", str(tmp_path / "t")])
    assert status == 2 and capsys.readouterr().err.strip().splitlines() == [
        "error: --format 'tflite': choose one of onnx, torchscript"]
    status = main(["export", "--model", str(out), "--format", "onnx", "--output", str(tmp_path / "again")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "already an export" in err[0]


def test_failed_verification_exits_1_and_writes_nothing(models: dict[str, Path], tmp_path: Path, capsys,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "max_abs_difference", lambda *args: 0.5)
    status = main(["export", "--model", str(models["scalar"]), "--format", "onnx", "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and "differs from PyTorch by 0.5 (max abs) > tolerance 0.0001" in err[0]
    assert not (tmp_path / "x").exists()
