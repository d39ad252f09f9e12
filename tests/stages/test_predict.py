"""``cskd_ray.load(...).score`` and ``cskd-ray predict``: in-process scoring (no Ray) equal to the score stage's."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_score import write_model_folder

import cskd_ray
from cskd_ray.app.cli import main, package_version
from cskd_ray.io.decode import decode_image
from cskd_ray.io.demo import make_demo_data
from cskd_ray.io.transforms import resize_crop
from cskd_ray.stages.label import ScoreActor
from cskd_ray.stages.predict import ImageInputError, Predictor


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Demo JPEGs (64 px), one large JPEG (decoded at a reduced DCT scale), one PNG, and the corrupt demo files."""
    root = tmp_path_factory.mktemp("images")
    make_demo_data(root, 5, 0.4, image_size=64, num_corrupt=2)
    files = sorted((root / "images").iterdir())
    good = [p for p in files if decode_image(p.read_bytes()).ok]
    corrupt = [p for p in files if p not in good]
    rng = np.random.default_rng(0)
    large = Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).resize((420, 360), Image.BICUBIC)
    large.save(root / "large.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(root / "small.png")
    return {"good": [*good, root / "large.jpg", root / "small.png"], "corrupt": corrupt}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("student") / "model")


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    return cskd_ray.load(str(model_dir), device="cpu")


def _score_stage(model_dir: Path, paths: list[Path]) -> tuple[list[float], list[list[float]]]:
    """What the score stage writes: read_decode_batch's decode and crop, then the ScoreActor called directly."""
    threads = torch.get_num_threads()
    scorer = ScoreActor(str(model_dir), "cpu", "auto", torch_threads=1)
    torch.set_num_threads(threads)  # the actor sets the process's torch threads; later tests keep theirs
    size = scorer.scorer.preprocess.image_size
    pixels = np.stack([resize_crop(decode_image(p.read_bytes(), draft_size=size).image, scorer.scorer.preprocess)
                       for p in paths])
    n = len(paths)
    table = scorer({"uri": np.array([str(p) for p in paths]), "sha256": np.array(["x"] * n), "pixels": pixels,
                    "error": np.array([""] * n), "deferred": np.zeros(n, dtype=bool)})
    return table.column("score").to_pylist(), table.column("distribution").to_pylist()


def test_scores_equal_the_score_stage(predictor: Predictor, model_dir: Path, images: dict) -> None:
    paths = images["good"]
    expected, expected_dist = _score_stage(model_dir, paths)
    scores = predictor.score([str(p) for p in paths])
    assert isinstance(scores, list) and all(isinstance(s, float) for s in scores)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert predictor.score(paths[-2]) == pytest.approx(expected[-2], rel=1e-6)  # the large JPEG, a Path
    dists = predictor.predict_distribution([str(p) for p in paths])
    assert dists.shape == (len(paths), 10)
    np.testing.assert_allclose(dists, expected_dist, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dists.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose((dists * np.arange(1, 11)).sum(1), scores, rtol=1e-5)
    assert predictor.predict_distribution(str(paths[0])).shape == (10,)


def test_pil_numpy_and_mixed_lists(predictor: Predictor, images: dict) -> None:
    png, jpg = images["good"][-1], images["good"][0]
    by_path = predictor.score([str(png), str(jpg)])
    pil = Image.open(png)
    array = np.asarray(Image.open(jpg).convert("RGB"))
    assert predictor.score(pil) == pytest.approx(by_path[0], rel=1e-6)
    assert predictor.score(array) == pytest.approx(by_path[1], rel=1e-6)
    assert predictor.score([pil, array]) == pytest.approx(by_path, rel=1e-6)
    assert predictor.score(pil.convert("RGBA")) == pytest.approx(by_path[0], rel=1e-6)  # opaque alpha changes nothing
    assert isinstance(predictor.score(np.zeros((40, 30), np.uint8)), float)  # grayscale
    with pytest.raises(ImageInputError, match=r"expected a uint8 array"):
        predictor.score(array.astype(np.float32))
    with pytest.raises(ImageInputError, match=r"expected a uint8 array"):
        predictor.score(np.stack([array, array]))


def test_bad_inputs_raise_naming_the_input(predictor: Predictor, images: dict, tmp_path: Path) -> None:
    corrupt = images["corrupt"][0]
    with pytest.raises(ImageInputError, match=rf"{corrupt.name}: (not an image|truncated image|corrupt image|empty)"):
        predictor.score([str(images["good"][0]), str(corrupt)])
    with pytest.raises(ImageInputError, match=r"read error: .*missing\.jpg"):
        predictor.score(str(tmp_path / "missing.jpg"))
    results = predictor.predict_many([str(corrupt), str(images["good"][0])])
    assert not results[0].ok and results[0].score is None and results[1].ok


def test_scalar_head_has_no_distribution(tmp_path: Path, images: dict) -> None:
    scalar = cskd_ray.load(write_model_folder(tmp_path / "scalar", kind="scalar"), device="cpu")
    assert isinstance(scalar.score(str(images["good"][0])), float)
    with pytest.raises(ValueError, match="scalar head"):
        scalar.predict_distribution(str(images["good"][0]))


def test_export_folders_score_the_same(predictor: Predictor, model_dir: Path, images: dict, tmp_path: Path) -> None:
    from cskd_ray.stages.export import export_model

    export_model(str(model_dir), "onnx", str(tmp_path / "onnx"))
    exported = cskd_ray.load(tmp_path / "onnx", device="cpu")
    paths = [str(p) for p in images["good"]]
    np.testing.assert_allclose(exported.score(paths), predictor.score(paths), atol=1e-4)
    assert exported.model_id.endswith(exported.scorer.description["sha256"][:16])


def test_cli_prints_scores_and_errors(predictor: Predictor, model_dir: Path, images: dict,
                                      capsys: pytest.CaptureFixture) -> None:
    good, corrupt = [str(p) for p in images["good"][:3]], str(images["corrupt"][0])
    assert main(["predict", str(model_dir), *good]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out] == good
    np.testing.assert_allclose([float(line.split("\t")[1]) for line in out], predictor.score(good), atol=1e-6)
    assert main(["predict", str(model_dir), good[0], corrupt, "--json"]) == 1
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["path"] == good[0] and record["score"] == pytest.approx(predictor.score(good[0]), rel=1e-6)
    assert len(record["distribution"]) == 10
    assert captured.err.startswith(f"{corrupt}\terror: ")


def test_cli_reads_globs_and_stdin(model_dir: Path, images: dict, capsys: pytest.CaptureFixture,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = images["good"][0].parent
    assert main(["predict", str(model_dir), str(folder / "1*.jpg")]) == 1  # the corrupt demo files are .jpg too
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == len(images["good"]) - 2 and captured.err.count("\terror: ") == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{images['good'][0]}\n\n{images['good'][-1]}\n"))
    assert main(["predict", str(model_dir), "-"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["predict", str(model_dir), str(folder / "nothing*.jpg")]) == 1
    assert "nothing*.jpg\terror: no files match" in capsys.readouterr().err


def test_cli_bad_model_and_version(tmp_path: Path, images: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", str(tmp_path), str(images["good"][0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a model folder" in err and len(err.splitlines()) == 1
    assert main(["predict", str(tmp_path), "x.jpg", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "error: --batch-size 0: must be at least 1\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cskd-ray {package_version()}" == f"cskd-ray {cskd_ray.__version__}"


def test_import_stays_cheap() -> None:
    code = "import sys, cskd_ray; assert callable(cskd_ray.load); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
